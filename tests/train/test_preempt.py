"""Preemption: a save signal to one rank, a second signal during the save, a kill during the save,
time-based checkpoints, and the LR schedule across skipped steps; on real gloo processes.

The torchrun-agent case (SIGTERM to the agent) is in tests/launch/test_torchrun.py, the SLURM
case in tests/launch/test_slurm.py.
"""
import json
import math
import os
import signal
import warnings
from pathlib import Path

import pytest

from tests.distributed import run_world
from tests.train.worlds import metrics, nan_at, on_train_batches, tiny_cfg

GAS = 2          # tiny_cfg: global batch 4 / dp 2 / micro 1
RUN = dict(train={"max_steps": 6}, deepspeed={"zero_stage": 2})


def signal_at(batch: int, sig=signal.SIGUSR1, only_rank=None):
    """Send `sig` to this process when the train loader yields its `batch`-th batch (1-based)."""
    from torch import distributed as dist

    def send(i, _):
        if i == batch and only_rank in (None, dist.get_rank()):
            os.kill(os.getpid(), sig)
    return on_train_batches(send)


def signal_during_save(sig):
    """Send `sig` to this process in the middle of the next checkpoint save (after DeepSpeed's files)."""
    from llm_lru.train import checkpoint as ck

    inner = ck.rng_state

    def rng_state():
        os.kill(os.getpid(), sig)
        return inner()

    ck.rng_state = rng_state
    return lambda: setattr(ck, "rng_state", inner)


def _listing(out):
    ck = Path(out) / "checkpoints"
    return {"dirs": sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")),
            "latest": (ck / "latest").read_text().strip(),
            "status": json.loads((Path(out) / "status.json").read_text())}


def preempt_world(rank, world, root):
    """All 2-process scenarios of this file in one world (process start-up is the cost)."""
    from torch import distributed as dist

    from llm_lru.train import trainer

    root = Path(root)
    out = {}

    def run(name, **over):
        summary = trainer.train(tiny_cfg(root / name, **over))
        dist.barrier()
        if rank == 0:
            out.setdefault(name, []).append({"summary": summary, "metrics": metrics(root / name),
                                             **_listing(root / name)})

    run("ref", **RUN)
    # SIGUSR1 to rank 1 only, while it fetches step 4's batches; SIGTERM to it again mid-save.
    undo = [signal_at(3 * GAS + 1, only_rank=1), signal_during_save(signal.SIGTERM)]
    run("sig", **RUN)
    for u in undo:
        u()
    run("sig", **RUN)   # resume=auto
    # checkpoint.every_minutes: tiny, so due after every step (decided on rank 0, obeyed by both).
    run("timed", train={"max_steps": 3}, checkpoint={"every_minutes": 1e-9, "keep": 5})
    # The schedule: warmup over 4 steps, step 2 skipped (non-finite loss).
    undo = nan_at({2}, GAS)
    run("nan", train={"max_steps": 4, "warmup_steps": 4})
    undo()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    return run_world(preempt_world, 2, str(root), timeout=600)[0]


def test_signal_to_one_rank_saves_the_current_step_and_exits(world):
    first = world["sig"][0]
    assert first["summary"]["preempted"] is True and first["summary"]["step"] == 4
    assert [m["step"] for m in first["metrics"]] == [1, 2, 3, 4]
    # The SIGTERM that arrived during the save changed nothing: the save is complete.
    assert first["dirs"] == ["step_00000004"] and first["latest"] == "step_00000004"
    assert first["status"] == {"status": "preempted", "step": 4}


def test_resume_after_the_signal_matches_the_uninterrupted_run(world):
    ref, second = world["ref"][0], world["sig"][1]
    assert second["summary"]["preempted"] is False and second["status"] == {"status": "finished", "step": 6}
    assert [m["step"] for m in second["metrics"]] == list(range(1, 7))
    for a, b in zip(ref["metrics"], second["metrics"]):
        assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"], a["step"]   # exact on CPU fp32


def test_every_minutes_saves_on_every_rank(world):
    timed = world["timed"][0]
    assert timed["dirs"] == ["step_00000001", "step_00000002", "step_00000003"]


def test_skipped_step_does_not_advance_the_schedule(world):
    from llm_lru.train.schedule import lr_at

    m = world["nan"][0]["metrics"]
    assert [r.get("skipped", False) for r in m] == [False, True, False, False]
    t = tiny_cfg("unused", train={"max_steps": 4, "warmup_steps": 4}).train
    # Step 2 applied nothing; step 3 gets the LR step 2 would have had.
    assert [r["lr"] for r in m] == [lr_at(t, 0), lr_at(t, 1), lr_at(t, 1), lr_at(t, 2)]
    assert len({r["lr"] for r in m}) == 3


def _kill_during_save(out):
    """A world of one whose step-4 save dies by SIGKILL half-way (no handler can run)."""
    from tests.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch.distributed as dist

    from llm_lru.train import checkpoint as ck
    from llm_lru.train import trainer

    dist.init_process_group("gloo", rank=0, world_size=1)
    inner = ck.rng_state
    calls = [0]

    def rng_state():
        calls[0] += 1
        if calls[0] == 2:           # the second save: step 4
            os.kill(os.getpid(), signal.SIGKILL)
        return inner()

    ck.rng_state = rng_state
    trainer.train(tiny_cfg(out, checkpoint={"every": 2, "keep": 3}, **RUN))


def _resume_one(rank, world, out):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from llm_lru.train import trainer

        trainer.train(tiny_cfg(out, checkpoint={"every": 2, "keep": 3}, **RUN))
    return {"metrics": metrics(out), "warnings": [str(w.message) for w in caught]}


def _plain_one(rank, world, out):
    from llm_lru.train import trainer

    trainer.train(tiny_cfg(out, **RUN))
    return metrics(out)


@pytest.mark.slow
def test_kill_during_the_save_leaves_the_previous_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "killed"
    p = mp.get_context("spawn").Process(target=_kill_during_save, args=(str(out),))
    p.start()
    p.join(timeout=300)
    assert p.exitcode == -signal.SIGKILL
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert not (ck / "step_00000004" / "COMPLETE").exists()
    got = run_world(_resume_one, 1, str(out), timeout=300)[0]
    assert any("step_00000004" in w for w in got["warnings"]), got["warnings"]
    ref = run_world(_plain_one, 1, str(tmp_path / "ref"), timeout=300)[0]
    assert [m["step"] for m in got["metrics"]] == list(range(1, 7))
    for a, b in zip(ref, got["metrics"]):
        assert math.isfinite(a["loss"]) and b["loss"] == a["loss"], a["step"]
