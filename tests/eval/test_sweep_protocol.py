"""The paper protocol of the recall lab (issue 30): scoring at lengths beyond training (against a
hand-computed case), parameter matching for every mixer kind, and a cut-short sweep resumed
from its JSON (done cells kept, not rerun; the same table as an uninterrupted sweep)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from llm_lru.config import MIXER_KINDS, ModelConfig, from_dict
from llm_lru import lab
from llm_lru.models.hybrid import HybridLM

BENCH = Path(__file__).resolve().parents[2] / "bench"


class ParityFor(torch.nn.Module):
    """Parity (the Z2 word problem, `every` layout: answer id 3 + prefix parity) right while fewer
    than k tokens have been read, wrong from then on: its accuracy at every length is known."""

    def __init__(self, k):
        super().__init__()
        self.cfg = type("C", (), {"vocab_size": 6})()
        self.embed = torch.nn.Embedding(1, 1)
        self.k = k

    def forward(self, ids, doc_start=None, state=None, return_state=False):
        B, T = ids.shape
        pos0, par0 = state if state is not None else (0, torch.zeros(B, dtype=torch.long))
        par = (par0[:, None] + ids.cumsum(1)) % 2
        pos = pos0 + torch.arange(T)
        pred = torch.where(pos < self.k, 3 + par, 4 - par)
        logits = torch.nn.functional.one_hot(pred, 6).float()
        return (logits, (pos0 + T, par[:, -1])) if return_state else logits


def test_length_scores_hand_computed():
    res = lab.length_scores(ParityFor(8), "word_problem", {"group": "Z", "n": 2, "layout": "every"},
                               [8, 16, 32], n=5)
    # right on the first 8 positions of each sample: 8/8, 8/16, 8/32
    assert {L: r["accuracy"] for L, r in res.items()} == {"8": 1.0, "16": 0.5, "32": 0.25}
    assert {L: r["sequence_accuracy"] for L, r in res.items()} == {"8": 1.0, "16": 0.0, "32": 0.0}
    assert res["32"]["answers"] == 5 * 32
    # buckets by context position [2^i, 2^(i+1)): right through [4, 8), wrong from 8 on
    assert res["32"]["accuracy_by_position"] == {"[0, 1)": 1.0, "[1, 2)": 1.0, "[2, 4)": 1.0, "[4, 8)": 1.0,
                                                 "[8, 16)": 0.0, "[16, 32)": 0.0}
    with pytest.raises(ValueError, match="eval_lengths"):
        lab.length_scores(ParityFor(8), "word_problem", {"group": "Z", "n": 2}, [1], n=2)


KIND_CASES = {"attn": "A", "swa": "S", "lru": "L", "glru": "G", "bdlru": "B", "hlru": "H", "blur": "R",
              "lstm": "C", "deltanet": "D"}


@pytest.mark.parametrize("kind", MIXER_KINDS)
@pytest.mark.parametrize("target", [30000, 80000])
def test_match_params_within_5_percent_for_every_kind(kind, target):
    block = {"bdlru": 4, "hlru": 2}.get(kind, 1)
    cfg = from_dict({"model": {"vocab_size": 16, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64,
                               "pattern": KIND_CASES[kind], "block_size": block, "causal": kind != "blur"},
                     "data": {"source": "random"}, "train": {"seq_len": 16}})
    matched, n = lab.match_params(cfg, target)
    assert abs(n - target) <= 0.05 * target
    assert HybridLM(matched.model).num_params() == n  # the count of the model the run builds
    changed = "d_model" if kind in ("attn", "swa") else "d_state"
    assert getattr(matched.model, changed) != getattr(cfg.model, changed) or n == HybridLM(cfg.model).num_params()


def test_match_params_refuses_what_no_width_reaches():
    cfg = from_dict({"model": {"vocab_size": 16, "d_model": 32, "n_layers": 2, "pattern": "B"},
                     "data": {"source": "random"}, "train": {"seq_len": 16}})
    with pytest.raises(ValueError, match="match_params 100"):
        lab.match_params(cfg, 100)


@pytest.fixture(autouse=True)
def no_world_left_behind():
    """A sweep trains in this process (the lab starts a world of one): end it after each test, so
    that later tests find no process group, as they would in a fresh process."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def tiny_sweep(steps=3):
    return {"eval_samples": 8, "seeds": [1, 2],
            "base": {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32},
                     "data": {"source": "synthetic", "num_workers": 0},
                     "train": {"global_batch_size": 4, "max_steps": steps, "seq_len": 8, "warmup_steps": 1},
                     "logging": {"tensorboard": False, "progress": "lines", "log_every": 100},
                     "checkpoint": {"keep": 1}},
            "mixers": {"bd2": {"model": {"pattern": "B", "block_size": 2}}, "lstm": {"model": {"pattern": "C"}}},
            "tasks": {"parity": {"model": {"vocab_size": 6}, "eval_lengths": [8, 16], "mixers": ["bd2", "lstm"],
                                 "data": {"task": "word_problem", "task_args": {"group": "Z", "n": 2}}}}}


SCORES = ("accuracy", "sequence_accuracy", "by_length", "final_loss", "params")


def test_cut_short_sweep_resumes_from_its_json(tmp_path):
    sys.path.insert(0, str(BENCH))
    import recall_sweep

    sweep = tiny_sweep()
    full = recall_sweep.run(sweep, "sweep.yaml", tmp_path / "a", "s", str(tmp_path / "runs_a"))
    assert [(r["mixer"], r["seed"]) for r in full] == [("bd2", 1), ("bd2", 2), ("lstm", 1), ("lstm", 2)]
    assert all(set(r["by_length"]) == {"8", "16"} for r in full)
    # Cut short after two cells (seed-major order: every mixer's first seed first)
    out = tmp_path / "b"
    out.mkdir()
    cut = [r for r in full if r["seed"] == 1]
    (out / "s.json").write_text(json.dumps({"meta": {}, "results": cut}))
    lines = []
    recall_sweep.print = lambda *a, **k: lines.append(" ".join(map(str, a)))
    try:
        resumed = recall_sweep.run(sweep, "sweep.yaml", out, "s", str(tmp_path / "runs_b"))
    finally:
        del recall_sweep.print
    assert lines[0].startswith("recall sweep: 2 of 4 runs already done")
    ran = [ln for ln in lines if ln.startswith("[")]
    assert len(ran) == 2 and all("seed 2" in ln and "ETA" in ln for ln in ran)
    assert [{k: r[k] for k in SCORES} for r in resumed] == [{k: r[k] for k in SCORES} for r in full]
    assert recall_sweep.cells(resumed) == recall_sweep.cells(full)
    # a changed config reruns its cells
    assert json.loads((out / "s.json").read_text())["results"] == resumed
    changed = lab.run_sweep(tiny_sweep(steps=4), tmp_path / "runs_c", 8, done=resumed, log=lines.append,
                               show_progress=False)
    assert all(r["steps"] == 4 for r in changed["results"])


@pytest.mark.slow
def test_parallel_jobs_give_the_same_rows(tmp_path):
    one = lab.run_sweep(tiny_sweep(), tmp_path / "one", 8, show_progress=False, log=lambda s: None)["results"]
    two = lab.run_sweep(tiny_sweep(), tmp_path / "two", 8, show_progress=False, log=lambda s: None,
                           jobs=2)["results"]
    assert [r.get("error") for r in two] == [None] * 4
    assert [{k: r[k] for k in SCORES} for r in two] == [{k: r[k] for k in SCORES} for r in one]


def test_a_save_signal_stops_the_sweep_and_its_cell_reruns_on_resume(tmp_path, monkeypatch):
    calls = []

    def fake(cfg, eval_samples=256, seed=0, eval_lengths=None):
        calls.append(cfg.out_dir)
        cut = len(calls) == 2  # the second cell is cut short by a signal
        return {"accuracy": 0.5, "steps": 1 if cut else cfg.train.max_steps, "preempted": cut, "seconds": 0.0}

    monkeypatch.setattr(lab, "train_and_score", fake)
    lines = []
    first = lab.run_sweep(tiny_sweep(), tmp_path, 8, show_progress=False, log=lines.append)["results"]
    assert len(calls) == 2 and "stopped by a signal" in lines[-1]
    assert "error" not in first[0] and "step 1 of 3" in first[1]["error"]
    again = lab.run_sweep(tiny_sweep(), tmp_path, 8, show_progress=False, log=lines.append, done=first)["results"]
    assert len(calls) == 5 and all("error" not in r for r in again)  # 3 left, the cut cell among them
