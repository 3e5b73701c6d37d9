"""Rank-0 logs: metrics.jsonl lines, TensorBoard scalars, plain lines with ETA or a tqdm bar."""
import json

from llm_lru.config import from_dict
from llm_lru.train.engine import lr_at
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


def test_lr_schedule_warmup_then_cosine():
    t = _cfg("/tmp", "lines").train  # lr 3e-3, min 3e-4, warmup 10, 4 steps: still warming up
    t.max_steps, t.warmup_steps = 110, 10
    assert lr_at(t, 0) == t.lr / 10 and lr_at(t, 9) == t.lr
    assert lr_at(t, 10) == t.lr and abs(lr_at(t, 60) - (t.lr + t.min_lr) / 2) < 1e-12
    assert lr_at(t, 110) == t.min_lr and lr_at(t, 500) == t.min_lr
