"""Preemption on real gloo processes, real shards and one loader worker per rank: a save signal to
one rank, a second signal during the save, a signal in the first step (before any checkpoint),
during validation and during a periodic save, a kill during the save, a full disk during the
save, time-based checkpoints, and the LR schedule across skipped steps.

The signal to a whole process group is in tests/launch/test_signals.py, the torchrun-agent case
(SIGTERM to the agent, and to every process) in tests/launch/test_torchrun.py, the SLURM case in
tests/launch/test_slurm.py.
"""
import json
import math
import os
import signal
import warnings
from pathlib import Path

import pytest

from tests.distributed import run_world
from tests.train.worlds import metrics, nan_at, on_train_batches, shard_cfg, tiny_cfg

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


def signal_during_validation(sig):
    """Send `sig` to this process as the next validation starts."""
    from llm_lru.train import trainer

    inner = trainer.evaluate

    def evaluate(*a, **k):
        os.kill(os.getpid(), sig)
        return inner(*a, **k)

    trainer.evaluate = evaluate
    return lambda: setattr(trainer, "evaluate", inner)


def _listing(out):
    ck = Path(out) / "checkpoints"
    return {"dirs": sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")),
            "latest": (ck / "latest").read_text().strip(),
            "status": json.loads((Path(out) / "status.json").read_text())}


def preempt_world(rank, world, root, shards):
    """All 2-process scenarios of this file in one world (process start-up is the cost)."""
    from torch import distributed as dist

    from llm_lru.train import trainer

    root = Path(root)
    out = {}

    def run(name, **over):
        summary = trainer.train(shard_cfg(root / name, shards, **over))
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
    # SIGTERM to rank 0 in the first step, before any checkpoint exists.
    undo = signal_at(1, sig=signal.SIGTERM, only_rank=0)
    run("first", **RUN)
    undo()
    run("first", **RUN)
    # A signal while validation runs (its own loader workers are up): the step ends, then the save.
    val = {**RUN, "train": {**RUN["train"], "val_every": 2, "val_batches": 1}}
    undo = signal_during_validation(signal.SIGUSR1)
    run("val", **val)
    undo()
    run("val", **val)
    # SIGTERM while the periodic step-2 checkpoint is written: it completes, the next step saves and exits.
    every = {"checkpoint": {"every": 2, "keep": 3}}
    undo = signal_during_save(signal.SIGTERM)
    run("periodic", **RUN, **every)
    undo()
    run("periodic", **RUN, **every)
    # checkpoint.every_minutes: tiny, so due after every step (decided on rank 0, obeyed by both).
    run("timed", train={"max_steps": 3}, checkpoint={"every_minutes": 1e-9, "keep": 5})
    # The schedule: warmup over 4 steps, step 2 skipped (non-finite loss).
    undo = nan_at({2}, GAS)
    run("nan", train={"max_steps": 4, "warmup_steps": 4})
    undo()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, stdlib_shards):
    root = tmp_path_factory.mktemp("preempt")
    return run_world(preempt_world, 2, str(root), str(stdlib_shards(16)), timeout=900)[0]


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


def _resumed_equals_ref(world, name, saved):
    ref, second = world["ref"][0], world[name][1]
    assert second["summary"]["preempted"] is False and second["status"] == {"status": "finished", "step": 6}
    assert [m["step"] for m in second["metrics"]] == list(range(1, 7))
    assert [m["loss"] for m in second["metrics"]] == [m["loss"] for m in ref["metrics"]]
    assert world[name][0]["summary"]["step"] == saved


def test_signal_in_the_first_step_saves_step_one_and_resumes(world):
    first = world["first"][0]
    assert first["summary"]["preempted"] and first["dirs"] == ["step_00000001"]
    assert first["latest"] == "step_00000001" and first["status"] == {"status": "preempted", "step": 1}
    _resumed_equals_ref(world, "first", 1)


def test_signal_during_validation_finishes_it_then_saves(world):
    first = world["val"][0]
    assert first["summary"]["preempted"] and first["status"] == {"status": "preempted", "step": 2}
    assert first["latest"] == "step_00000002" and "val_loss" in first["metrics"][-1]
    _resumed_equals_ref(world, "val", 2)


def test_signal_during_a_periodic_save_completes_it_and_saves_the_next_step(world):
    first = world["periodic"][0]
    assert first["dirs"] == ["step_00000002", "step_00000003"] and first["latest"] == "step_00000003"
    assert first["status"] == {"status": "preempted", "step": 3}
    _resumed_equals_ref(world, "periodic", 3)


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


def _kill_during_save(out, shards):
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
    trainer.train(shard_cfg(out, shards, checkpoint={"every": 2, "keep": 3}, **RUN))


def _resume_one(rank, world, out, shards):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from llm_lru.train import trainer

        trainer.train(shard_cfg(out, shards, checkpoint={"every": 2, "keep": 3}, **RUN))
    return {"metrics": metrics(out), "warnings": [str(w.message) for w in caught]}


def _plain_one(rank, world, out, shards):
    from llm_lru.train import trainer

    trainer.train(shard_cfg(out, shards, **RUN))
    return metrics(out)


@pytest.mark.slow
def test_kill_during_the_save_leaves_the_previous_checkpoint(tmp_path, stdlib_shards):
    import torch.multiprocessing as mp

    shards = str(stdlib_shards(16))
    out = tmp_path / "killed"
    p = mp.get_context("spawn").Process(target=_kill_during_save, args=(str(out), shards))
    p.start()
    p.join(timeout=300)
    assert p.exitcode == -signal.SIGKILL
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert not (ck / "step_00000004" / "COMPLETE").exists()
    got = run_world(_resume_one, 1, str(out), shards, timeout=300)[0]
    assert any("step_00000004" in w for w in got["warnings"]), got["warnings"]
    ref = run_world(_plain_one, 1, str(tmp_path / "ref"), shards, timeout=300)[0]
    assert [m["step"] for m in got["metrics"]] == list(range(1, 7))
    for a, b in zip(ref, got["metrics"]):
        assert math.isfinite(a["loss"]) and b["loss"] == a["loss"], a["step"]


def _fill_disk_then_train(rank, world, out, shards):
    """Train with checkpoints every 2 steps on a small disk that a filler file fills (64 KiB left)
    in step 3: the step-4 save fails. Returns the error and what the run left on disk."""
    import shutil

    from llm_lru.train import trainer

    out = Path(out)

    def fill(i, _):
        if i == 3 * GAS and rank == 0:
            free = shutil.disk_usage(out).free
            with open(out.parent / "filler", "wb") as f:
                f.write(b"\0" * (free - 8192))
    undo = on_train_batches(fill)
    try:
        trainer.train(shard_cfg(out, shards, checkpoint={"every": 2, "keep": 3}, **RUN))
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        undo()
    return {"error": error, "metrics_lines": (out / "metrics.jsonl").read_text(),
            **_listing(out)}


def _resume_two(rank, world, out, shards):
    from llm_lru.train import trainer

    trainer.train(shard_cfg(out, shards, checkpoint={"every": 2, "keep": 3}, **RUN))
    return metrics(out) if rank == 0 else None


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs, unmounted afterwards (skipped where mounting is not permitted)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_during_a_save_is_one_clear_error_and_the_run_resumes(small_disk, tmp_path, stdlib_shards):
    shards = str(stdlib_shards(16))
    out = small_disk / "run"
    got = run_world(_fill_disk_then_train, 2, str(out), shards, timeout=600)[0]
    err = got["error"]
    assert err and err.startswith("CheckpointWriteError: checkpoint ") and "step_00000004" in err, err
    assert "the disk is full" in err and "bytes are free" in err and "needs about" in err, err
    assert "'latest' still names" in err and "step_00000002" in err, err
    assert got["dirs"] == ["step_00000002"] and got["latest"] == "step_00000002"     # the partial one is gone
    assert got["status"] == {"status": "failed", "step": 4}
    assert [json.loads(line)["step"] for line in got["metrics_lines"].splitlines()] == [1, 2, 3, 4]
    (small_disk / "filler").unlink()
    resumed = run_world(_resume_two, 2, str(out), shards, timeout=600)[0]
    ref = run_world(_resume_two, 2, str(tmp_path / "ref"), shards, timeout=600)[0]
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in ref]
