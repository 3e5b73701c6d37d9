"""The recall lab (llm_lru.lab): sweep expansion, and (slow) a tiny model trained by the normal
trainer on an easy MQAR setting reaching high accuracy. Its accuracy measure, the eval `task`
suite: tests/eval/test_task.py."""
from pathlib import Path

import pytest

from llm_lru import lab

SWEEP = Path(__file__).resolve().parents[1] / "configs/sweeps/recall.yaml"


def test_sweep_config_expands_to_valid_runs(tmp_path):
    from omegaconf import OmegaConf

    sweep = OmegaConf.to_container(OmegaConf.load(SWEEP))
    assert len(sweep["tasks"]) >= 3
    # every mixer on one task, one mixer on every task (config building is slow-ish: omegaconf)
    runs = lab.sweep_runs({**sweep, "only_tasks": [next(iter(sweep["tasks"]))]}, tmp_path)
    per_task = lab.sweep_runs({**sweep, "only_mixers": ["glru"]}, tmp_path)
    assert {r["config"].data.task for r in per_task} >= {"mqar", "s3", "s5"}
    mixers = {r["mixer"] for r in runs}
    assert len(runs) == len(sweep["mixers"])
    kinds = {(r["config"].model.pattern, r["config"].model.block_size) for r in runs}
    assert {("G", 4), ("L", 4), ("B", 2), ("B", 4), ("H", 2), ("H", 4), ("A", 4), ("BA", 4)} <= kinds
    assert len(mixers) == 8
    # equal width everywhere
    assert {r["config"].model.d_model for r in runs} == {64}
    assert len({r["config"].out_dir for r in runs}) == len(runs)
    sweep["mixers"]["bad"] = {"model": {"pattern": "Q"}}
    with pytest.raises(ValueError, match="mixer 'bad'"):
        lab.sweep_runs(sweep, tmp_path)


def test_paper_sweep_expands_over_seeds(tmp_path):
    from omegaconf import OmegaConf

    sweep = OmegaConf.to_container(OmegaConf.load(SWEEP.parent / "paper.yaml"))
    runs = lab.sweep_runs({**sweep, "only_mixers": ["bdlru_m1", "hlru_m2"]}, tmp_path)
    seeds = sweep["seeds"]
    assert len(seeds) >= 2 and len(runs) == 2 * len(sweep["tasks"]) * len(seeds)
    assert {(r["seed"], r["config"].train.seed) for r in runs} == {(s, s) for s in seeds}
    assert len({r["config"].out_dir for r in runs}) == len(runs)
    tasks_ = {r["config"].data.task: r["config"].data.task_args for r in runs}
    assert tasks_["word_problem"]["layout"] == "episodes" and "compression" in tasks_
    assert {r["config"].model.hlru_readout for r in runs if r["mixer"] == "hlru_m2"} == {"state"}
    with pytest.raises(ValueError, match="seeds"):
        lab.sweep_runs({**sweep, "seeds": ["a"]}, tmp_path)


def test_sweep_table_shape():
    rows = [{"task": "s3", "mixer": "glru", "accuracy": 0.5}, {"task": "s3", "mixer": "attn", "error": "x"},
            {"task": "mqar", "mixer": "glru", "accuracy": 0.25}]
    t = lab.sweep_table(rows)
    assert t["columns"] == ["task", "glru", "attn"]
    assert t["rows"] == [["s3", 0.5, None], ["mqar", 0.25, None]]
    # several seeds: the mean of those that ran
    rows.append({"task": "s3", "mixer": "glru", "accuracy": 0.7})
    assert lab.sweep_table(rows)["rows"][0] == ["s3", 0.6, None]


@pytest.mark.slow
def test_tiny_model_learns_easy_mqar(tmp_path):
    """Through the normal trainer (DeepSpeed, world of one), then loaded back as `llm-lru eval` does.

    2 pairs, 8 possible values: chance is 1/8. Measured on the 2-core CPU (~4.5 min): up to ~1000
    steps the model sits on the 'elimination' plateau (0.73-0.75: the first query right half the
    time, the second always); by 3000 steps key-value association has formed: accuracy 0.88
    (first query 0.84, second 0.93).
    """
    from llm_lru.config import from_dict

    cfg = from_dict({
        "out_dir": str(tmp_path / "run"),
        "model": {"vocab_size": 16, "d_model": 64, "n_layers": 2, "pattern": "AA", "n_heads": 2},
        "data": {"source": "synthetic", "task": "mqar", "task_args": {"num_kv_pairs": 2}},
        "train": {"seq_len": 16, "global_batch_size": 32, "max_steps": 3000, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 10, "weight_decay": 0.0},
        "logging": {"tensorboard": False, "progress": "lines", "log_every": 100}, "checkpoint": {"keep": 1}})
    res = lab.train_and_score(cfg, eval_samples=256)
    assert res["steps"] == 3000
    assert res["accuracy"] >= 0.8, res


@pytest.mark.slow
def test_sweep_through_the_cli(tmp_path):
    """`llm-lru eval --sweep FILE --out DIR`: every run trained and scored, one table."""
    import json

    import yaml

    from llm_lru.cli import main

    sweep = {"eval_samples": 8,
             "base": {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2}, "data": {"source": "synthetic"},
                      "train": {"global_batch_size": 4, "max_steps": 3, "seq_len": 32},
                      "logging": {"tensorboard": False, "progress": "lines"}},
             "mixers": {"glru": {"model": {"pattern": "G"}}, "hybrid": {"model": {"pattern": "BA", "block_size": 2}}},
             "tasks": {"s3": {"model": {"vocab_size": 16}, "data": {"task": "s3", "task_args": {"max_len": 6}}}}}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "out"
    assert main(["eval", "--sweep", str(f), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "recall.json").read_text())
    assert [(r["task"], r["mixer"], r["steps"]) for r in results] == [("s3", "glru", 3), ("s3", "hybrid", 3)]
    assert all(0 <= r["accuracy"] <= 1 for r in results)
    assert "| s3 |" in (out / "report.md").read_text()
