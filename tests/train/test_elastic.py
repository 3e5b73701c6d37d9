"""Resume at another DP size: 2 -> 1 -> 2 processes against an uninterrupted 2-process run.

Each leg is stopped by a save signal (the preemption path) and the next one resumes with
checkpoint.resume=auto in a world of another size. ZeRO 1-3 go through DeepSpeed's universal
checkpoint, ZeRO-0 through its ordinary one. Real shards; every sample a rank trains on is
recorded, so exactly-once is checked on the samples themselves.
"""
import random
from collections import Counter
from pathlib import Path

import pytest

from tests.distributed import run_world
from tests.train.test_preempt import signal_at
from tests.train.worlds import metrics, on_train_batches, tiny_cfg

STAGES = (0, 1, 2, 3)
STEPS = 6


def _cfg(out, prep, stage):
    import json

    vocab = json.loads((Path(prep) / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    return tiny_cfg(out, data={"source": "shards", "path": str(prep), "num_workers": 1, "shuffle_buffer": 8},
                    model={"vocab_size": vocab}, deepspeed={"zero_stage": stage},
                    train={"max_steps": STEPS, "global_batch_size": 4, "micro_batch_size": 1})


def _recording(rows):
    """Every train batch's rows (as bytes) are appended to `rows`."""
    return on_train_batches(lambda i, b: rows.extend(r.numpy().tobytes() for r in b["input_ids"]))


def leg(rank, world, root, prep, runs):
    """Train each (name, stop_after_step) of `runs`; a save signal ends the leg after that step."""
    from llm_lru.train import trainer

    out = {}
    gas = 4 // world
    for name, stage, stop in runs:
        rows = []
        undo = [_recording(rows)]
        if stop:
            # The leg starts a fresh iterator: its n-th batch belongs to its step ceil(n / gas).
            done = _done(Path(root) / name)
            undo.append(signal_at((stop - done) * gas, only_rank=world - 1))
        summary = trainer.train(_cfg(Path(root) / name, prep, stage))
        for u in reversed(undo):
            u()
        out[name] = {"summary": summary, "rows": rows, "metrics": metrics(Path(root) / name) if rank == 0 else None}
    return out


def _done(run):
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.exists() else 0


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    from llm_lru.data_prep.prep import PrepConfig, run_prep

    root = tmp_path_factory.mktemp("elastic_corpus")
    rng = random.Random(0)
    for i in range(4):   # random letters: every 16-token sample is distinct
        (root / f"d{i}.txt").write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(900)))
    out = root / "prep"
    run_prep(PrepConfig(inputs=[str(root / f"d{i}.txt") for i in range(4)], tokenizer="bytes", seq_len=16,
                        shard_size=20), out, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def legs(prep, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("elastic"))
    first = run_world(leg, 2, root, str(prep), [(f"ref{s}", s, 0) for s in STAGES] +
                      [(f"el{s}", s, 2) for s in STAGES], timeout=900)
    second = run_world(leg, 1, root, str(prep), [(f"el{s}", s, 4) for s in STAGES], timeout=900)
    third = run_world(leg, 2, root, str(prep), [(f"el{s}", s, 0) for s in STAGES], timeout=900)
    return first, second, third


@pytest.mark.parametrize("stage", STAGES)
def test_two_one_two_matches_the_uninterrupted_run(legs, stage):
    first, second, third = legs
    ref = first[0][f"ref{stage}"]["metrics"]
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert first[0][f"el{stage}"]["summary"]["preempted"] and first[0][f"el{stage}"]["summary"]["step"] == 2
    assert second[0][f"el{stage}"]["summary"]["preempted"] and second[0][f"el{stage}"]["summary"]["step"] == 4
    got = third[0][f"el{stage}"]
    assert not got["summary"]["preempted"] and got["summary"]["step"] == STEPS
    assert [r["step"] for r in got["metrics"]] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got["metrics"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert b["lr"] == a["lr"]


@pytest.mark.parametrize("stage", STAGES)
def test_each_sample_exactly_once_across_the_changes(legs, stage):
    ref = Counter(r for rank in legs[0] for r in rank[f"ref{stage}"]["rows"])
    assert sum(ref.values()) == STEPS * 4 and max(ref.values()) == 1
    seen = Counter(r for world in legs for rank in world for r in rank[f"el{stage}"]["rows"])
    assert seen == ref   # the same samples, each once, although dp went 2 -> 1 -> 2
