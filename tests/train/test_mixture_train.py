"""A training run on a two-source mixture of real shards (data.sources): tokens per source in
metrics.jsonl and TensorBoard, a source's new epoch in the log, mixture validation, and a crash
mid-mixture resumed to the uninterrupted run's losses and source positions."""
import contextlib
import io
from pathlib import Path

from tests.distributed import run_world
from tests.train.worlds import Crash, crashing_loader, metrics, tiny_cfg


def _mixture_runs(rank, world, root):
    from llm_lru.data_prep.prep import PrepConfig, run_prep
    from llm_lru.train import trainer

    root = Path(root)
    texts = {"big": "a long document of ordinary words, " * 15, "small": "def f(x): return x\n"}
    for name, text in texts.items():
        (root / f"c_{name}").mkdir(parents=True)
        for k in range(8):  # documents: prep moves a quarter of them to the val split
            (root / f"c_{name}" / f"d{k}.txt").write_text(f"{k} {text}")
        run_prep(PrepConfig(inputs=[str(root / f"c_{name}")], tokenizer="bytes", seq_len=16, shard_size=20,
                            val_fraction=0.25), root / name, progress=False)
    over = dict(model={"vocab_size": 512},
                data={"source": "shards", "sources": [{"path": str(root / "big"), "weight": 1.5},
                                  {"path": str(root / "small"), "weight": 1.0, "name": "code"}],
                      "num_workers": 2},
                train={"max_steps": 6, "val_every": 3}, checkpoint={"every": 2},
                logging={"tensorboard": True})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.train(tiny_cfg(root / "ref", **over))
    undo = crashing_loader(after_batches=3 * 4)   # in step 4 (4 micro batches per step)
    try:
        trainer.train(tiny_cfg(root / "resumed", **over))
    except Crash:
        pass
    undo()
    trainer.train(tiny_cfg(root / "resumed", **over))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(root / "ref" / "tb"))
    tb.Reload()
    return {"ref": metrics(root / "ref"), "resumed": metrics(root / "resumed"), "printed": printed.getvalue(),
            "tb_code": [e.value for e in tb.Scalars("train/tokens/code")]}


def test_mixture_run_logs_sources_and_resumes_exactly(tmp_path):
    got = run_world(_mixture_runs, 1, str(tmp_path), timeout=600)[0]
    ref, resumed = got["ref"], got["resumed"]
    assert [m["step"] for m in resumed] == [m["step"] for m in ref] == list(range(1, 7))
    for a, b in zip(ref, resumed):
        assert b["loss"] == a["loss"] and b["lr"] == a["lr"], a["step"]   # exact on CPU fp32
        assert b["tokens/big"] == a["tokens/big"] and b["tokens/code"] == a["tokens/code"]
        assert a["tokens/big"] + a["tokens/code"] == a["tokens"]
        assert ("val_loss" in a) == (a["step"] % 3 == 0)
    assert 0 < ref[-1]["tokens/code"] < ref[-1]["tokens/big"]
    assert got["tb_code"] == [float(m["tokens/code"]) for m in ref]
    # the small source (a few samples) ran out and started again, and the log says so
    assert "data source 'code'" in got["printed"] and "now in its epoch 1" in got["printed"]
