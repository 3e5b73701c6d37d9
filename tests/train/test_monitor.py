"""Rank-0 logs: metrics.jsonl lines, TensorBoard scalars, plain lines with ETA or a tqdm bar."""
import json

from llm_lru.config import from_dict
from llm_lru.train.monitor import Monitor


def _cfg(tmp_path, progress):
    return from_dict({"out_dir": str(tmp_path), "model": {"vocab_size": 64}, "data": {"source": "random"},
                      "train": {"max_steps": 4}, "logging": {"progress": progress, "log_every": 2}})


def test_jsonl_tensorboard_and_lines(tmp_path, capsys):
    mon = Monitor(_cfg(tmp_path, "lines"), tmp_path, 0, enabled=True)
    for s in (1, 2):
        mon.log(s, {"loss": 3.0 / s, "lr": 1e-3, "grad_norm": 0.5, "tokens": 64 * s, "tokens_per_s": 100.0})
    mon.log(3, {"loss": float("nan"), "skipped": True, "tokens": 192, "tokens_per_s": 100.0})
    mon.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] is None  # NaN -> null
    out = capsys.readouterr().out
    assert "step 2/4 | loss 1.5" in out and "eta" in out and "step 1/4" not in out  # log_every=2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [3.0, 1.5]
    assert "train/tokens_per_s" in acc.Tags()["scalars"]


def test_bar_mode_and_disabled_rank(tmp_path, capsys):
    mon = Monitor(_cfg(tmp_path, "bar"), tmp_path, 0, enabled=True)
    mon.log(1, {"loss": 2.0, "lr": 1e-3, "tokens": 64, "tokens_per_s": 100.0})
    assert mon.bar is not None and mon.bar.n == 1
    mon.close()
    quiet = Monitor(_cfg(tmp_path / "other", "lines"), tmp_path / "other", 0, enabled=False)
    quiet.log(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_resume_supersedes_the_interrupted_attempts_records(tmp_path):
    """A run killed after logging steps 1-5 resumes from its step-3 checkpoint: metrics.jsonl keeps
    steps 1-3 then the new 4-5, each once; the old 4-5 and a torn last line go to
    metrics.superseded.jsonl."""
    cfg = _cfg(tmp_path, "lines")
    first = Monitor(cfg, tmp_path, 0, enabled=True)
    for s in range(1, 6):
        first.log(s, {"loss": float(s)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    again = Monitor(cfg, tmp_path, 3, enabled=True)
    for s in (4, 5):
        again.log(s, {"loss": 10.0 * s})
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    old = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in old[:2]] == [4, 5] and old[2] == '{"step": 6, "lo'
    Monitor(cfg, tmp_path, 5, enabled=True).close()  # resuming at the last step moves nothing
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def _memory_steps(rank, world):
    """In a fresh process: the records of two steps holding 256 MiB and then 64 MiB."""
    import torch

    from llm_lru.train.monitor import MemoryMeter

    meter = MemoryMeter()
    recs = []
    for mib in (256, 64):
        x = torch.ones(mib << 18)          # mib MiB of fp32, every page touched
        del x
        recs.append(meter.record())
    return meter.baseline / 2**30, recs


def test_memory_step_is_the_peak_above_the_baseline():
    """memory_step_gb is each step's own peak above the baseline (the second step's 64 MiB, not the
    first's 256 MiB still in the max RSS); memory_gb keeps the process's peak, imports included."""
    from tests.distributed import run_world

    (base, (a, b)), = run_world(_memory_steps, 1)
    assert a["memory_baseline_gb"] == base and "memory_baseline_gb" not in b
    gib = 1 / 1024
    assert 256 * gib <= a["memory_step_gb"] < 256 * gib + 0.03    # + the interpreter's small allocations
    assert 64 * gib <= b["memory_step_gb"] < 64 * gib + 0.03
    assert b["memory_gb"] >= a["memory_gb"] >= base + 256 * gib
