"""LR schedules (llm_lru/train/schedule.py) against hand-computed values, their config keys, and a
real resumed run that continues the schedule exactly (lrs from metrics.jsonl)."""
import math
from pathlib import Path

import pytest

from llm_lru.config import ConfigError, from_dict, load_config
from llm_lru.train.schedule import lr_at
from tests.distributed import run_world
from tests.train.worlds import Crash, crashing_loader, metrics, tiny_cfg


def _train(**t):
    return from_dict({"model": {"vocab_size": 64}, "data": {"source": "random"}, "train": t}).train


def test_cosine_is_the_default_with_the_values_it_always_had():
    t = _train(max_steps=110, warmup_steps=10, lr=3e-3, min_lr=3e-4)
    assert t.schedule == "cosine"
    assert lr_at(t, 0) == t.lr / 10 and lr_at(t, 9) == t.lr
    assert lr_at(t, 10) == t.lr and abs(lr_at(t, 60) - (t.lr + t.min_lr) / 2) < 1e-12
    assert lr_at(t, 110) == t.min_lr and lr_at(t, 500) == t.min_lr
    for step in range(10, 120):  # bit for bit the formula of the schedule before train.schedule existed
        frac = min(max(step - 10, 0) / 100, 1.0)
        assert lr_at(t, step) == t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * frac))


# lr 1.0, min_lr 0.1, warmup 2, max_steps 10; wsd decay_fraction 0.4: the last 4 steps decay
# (progress 0, 1/4, 1/2, 3/4 at steps 6..9). Values worked out by hand: 0.1 + 0.9 x shape.
WSD = {
    "linear": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1],
    "cosine": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1 + 0.9 * 0.8535533905932737, 0.55,
               0.1 + 0.9 * 0.14644660940672624, 0.1],
    "1-sqrt": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55, 0.1 + 0.9 * 0.2928932188134524,
               0.1 + 0.9 * 0.1339745962155614, 0.1],
}


@pytest.mark.parametrize("shape", sorted(WSD))
def test_wsd_warmup_stable_then_decay_in_each_shape(shape):
    t = _train(schedule="wsd", decay_shape=shape, decay_fraction=0.4, lr=1.0, min_lr=0.1,
               warmup_steps=2, max_steps=10)
    got = [lr_at(t, s) for s in range(11)]
    assert got == pytest.approx(WSD[shape], abs=1e-12)
    assert lr_at(t, 50) == 0.1


def test_linear_and_constant():
    lin = _train(schedule="linear", lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10)
    assert [lr_at(lin, s) for s in range(11)] == pytest.approx([1 - s / 10 for s in range(11)], abs=1e-12)
    const = _train(schedule="constant", lr=0.5, min_lr=0.1, warmup_steps=4, max_steps=10)
    assert [lr_at(const, s) for s in range(8)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5, 0.5]


def test_schedule_keys_from_a_config_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("data: {source: random}\nmodel: {vocab_size: 64}\n"
                 "train:\n  max_steps: 1000\n  warmup_steps: 100\n  schedule: wsd\n"
                 "  decay_fraction: 0.1\n  decay_shape: cosine\n")
    t = load_config(f).train
    assert (t.schedule, t.decay_fraction, t.decay_shape) == ("wsd", 0.1, "cosine")
    assert lr_at(t, 899) == t.lr and lr_at(t, 900) == t.lr and lr_at(t, 901) < t.lr


@pytest.mark.parametrize("over, key", [
    (["train.schedule=step"], "train.schedule"),
    (["train.decay_shape=exp"], "train.decay_shape"),
    (["train.decay_fraction=0"], "train.decay_fraction"),
    (["train.schedule=wsd", "train.max_steps=10", "train.warmup_steps=5", "train.decay_fraction=0.6"],
     "train.decay_fraction"),
])
def test_bad_schedule_keys_are_named(over, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["data.source=random", "model.vocab_size=64", *over])


def _wsd_runs(rank, world, root):
    """wsd over 8 steps on real shards (a loader worker), uninterrupted and crashed in step 6 then
    resumed from step 3."""
    from llm_lru.data_prep.prep import PrepConfig, run_prep
    from llm_lru.train import trainer

    corpus = Path(root) / "corpus"
    corpus.mkdir()
    for k in range(6):
        (corpus / f"d{k}.txt").write_text(f"document {k}: " + "words of a short schedule test, " * 12)
    run_prep(PrepConfig(inputs=[str(corpus)], tokenizer="bytes", seq_len=16, shard_size=40), Path(root) / "data",
             progress=False)
    over = dict(train={"max_steps": 8, "schedule": "wsd", "decay_fraction": 0.5, "decay_shape": "1-sqrt"},
                checkpoint={"every": 3}, model={"vocab_size": 512},
                data={"source": "shards", "path": str(Path(root) / "data"), "num_workers": 1})
    trainer.train(tiny_cfg(f"{root}/ref", **over))
    undo = crashing_loader(after_batches=5 * 4)  # world of 1: 4 micro batches per step
    try:
        trainer.train(tiny_cfg(f"{root}/resumed", **over))
    except Crash:
        pass
    undo()
    first = metrics(f"{root}/resumed")
    trainer.train(tiny_cfg(f"{root}/resumed", **over))
    return {"ref": metrics(f"{root}/ref"), "first": first, "resumed": metrics(f"{root}/resumed")}


def test_resumed_run_continues_the_wsd_schedule_exactly(tmp_path):
    got = run_world(_wsd_runs, 1, str(tmp_path), timeout=300)[0]
    assert [m["step"] for m in got["first"]] == [1, 2, 3, 4, 5]
    assert [m["step"] for m in got["resumed"]] == list(range(1, 9))
    ref_lrs = [m["lr"] for m in got["ref"]]
    assert [m["lr"] for m in got["resumed"]] == ref_lrs
    assert [m["loss"] for m in got["resumed"]] == [m["loss"] for m in got["ref"]]
    t = tiny_cfg("unused", train={"max_steps": 8, "schedule": "wsd", "decay_fraction": 0.5}).train
    assert ref_lrs == [lr_at(t, s) for s in range(8)]
    assert ref_lrs[1:4] == [t.lr] * 3 and ref_lrs[4] == t.lr and ref_lrs[7] < ref_lrs[5] < t.lr  # decays
