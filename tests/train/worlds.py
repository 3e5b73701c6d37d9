"""Module-level rank functions for the training tests (run_world needs picklable functions).

The runs use the real tiny HybridLM (a BD-LRU block and an attention block) on real gloo
processes; model-level checks read the loader's random source, the paths around the model
(signals, restarts, resume, resize) real shards with loader workers (shard_cfg).
"""
from __future__ import annotations

import json
from pathlib import Path


def tiny_cfg(out, **over):
    """A seconds-long CPU run config; `over` is a nested dict merged on top."""
    from llm_lru.config import from_dict
    from omegaconf import OmegaConf

    base = {"out_dir": str(out), "data": {"source": "random"},
            "model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "pattern": "BA", "n_heads": 2,
                      "block_size": 4},
            "train": {"seq_len": 16, "global_batch_size": 4, "micro_batch_size": 1, "max_steps": 4,
                      "warmup_steps": 1},
            "logging": {"tensorboard": False, "progress": "lines"}}
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(over)))
    return from_dict(merged)


def shard_cfg(out, shards, workers: int = 1, **over):
    """tiny_cfg on real shards (the stdlib_shards fixture at seq_len 16) read by `workers` loader
    worker processes; `over` is merged on top as in tiny_cfg."""
    from omegaconf import OmegaConf

    vocab = json.loads((Path(shards) / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    base = {"data": {"source": "shards", "path": str(shards), "num_workers": workers, "shuffle_buffer": 64},
            "model": {"vocab_size": vocab}}
    return tiny_cfg(out, **OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(over))))


def metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def train_runs(rank, world, runs):
    """Train each (out_dir, overrides) in turn in this world; rank 0 returns their metrics."""
    from llm_lru.train import trainer

    results = []
    for out, over in runs:
        try:
            summary = trainer.train(tiny_cfg(out, **over))
        except trainer.TooManyBadSteps as e:
            summary = {"error": str(e)}
        results.append({"summary": summary, "metrics": metrics(out) if rank == 0 else None})
    return results


class Crash(RuntimeError):
    """Raised by a loader wrapper to simulate a process dying mid-run."""


def on_train_batches(hook):
    """Wrap trainer.make_loader so that hook(i, batch) (i = 1, 2, ...) sees every batch of the
    train split before the trainer does (to crash, signal or record); returns the undo."""
    from llm_lru.train import trainer

    inner = trainer.make_loader

    class Wrapped:
        def __init__(self, loader):
            self.loader = loader

        def state_dict(self):
            return self.loader.state_dict()

        def load_state_dict(self, s):
            self.loader.load_state_dict(s)

        def __iter__(self):
            for i, b in enumerate(self.loader, 1):
                hook(i, b)
                yield b

    def make(cfg, split, *a, **k):
        loader = inner(cfg, split, *a, **k)
        return Wrapped(loader) if split == "train" else loader

    trainer.make_loader = make
    return lambda: setattr(trainer, "make_loader", inner)


def crashing_loader(after_batches):
    """The train split raises Crash after `after_batches` batches."""
    def crash(i, _):
        if i > after_batches:
            raise Crash(f"simulated crash after {after_batches} batches")
    return on_train_batches(crash)


def nan_at(steps, gas):
    """Make the loss non-finite at the given 1-based optimizer steps (every micro batch of them)."""
    from llm_lru.train import trainer

    inner = trainer._loss
    calls = [0]

    def loss(*a, **k):
        step = calls[0] // gas + 1
        calls[0] += 1
        out, value = inner(*a, **k)
        if step in steps:
            return out * float("nan"), value * float("nan")
        return out, value

    trainer._loss = loss
    return lambda: setattr(trainer, "_loss", inner)


def _state_dict(ckpt):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # numpy, not tensors: tensors cross run_world's queue through torch's fd sharing, which
    # races with the worker's exit.
    return {k: v.detach().numpy().copy() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt) / "ds")).items()}


def scenarios(rank, world, root, shards):
    """Everything the default 2-process tests check, in one world (process start-up is the cost).
    The crash-and-resume runs read `shards` (real shards, a loader worker per rank).

    Returns (rank 0) a dict of metrics / facts per scenario.
    """
    import warnings

    from llm_lru.train import trainer

    root = Path(root)
    out = {}

    def run(name, data_path=None, **over):
        cfg = shard_cfg(root / name, data_path, **over) if data_path else tiny_cfg(root / name, **over)
        try:
            summary = trainer.train(cfg)
        except (trainer.TooManyBadSteps, Crash) as e:
            summary = {"error": f"{type(e).__name__}: {e}"}
        out[name] = {"summary": summary, "metrics": metrics(root / name) if rank == 0 else None}
        return cfg

    # ZeRO stages: same losses and grad norms as stage 0.
    for stage in (0, 1, 2, 3):
        run(f"stage{stage}", deepspeed={"zero_stage": stage}, train={"val_every": 2})

    # Per-block activation checkpointing recomputes the same numbers.
    run("act_ckpt", train={"activation_checkpointing": True, "val_every": 2}, deepspeed={"zero_stage": 2})

    # Sequence parallelism (dp 1 x sp 2): compared with single_runs() on one process.
    for stage in (2, 3):
        run(f"sp2_stage{stage}", parallel={"sp": 2}, train={"micro_batch_size": 2, "val_every": 2},
            deepspeed={"zero_stage": stage})

    # NaN: constant LR, so that the skipped step can be compared with a run that stops before it.
    const = {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0}
    gas = 2  # tiny_cfg: global 4 / dp 2 / micro 1
    undo = nan_at({2}, gas)
    run("nan", train={**const, "max_steps": 2}, deepspeed={"zero_stage": 1})
    undo()
    run("nan_ref", train={**const, "max_steps": 1}, deepspeed={"zero_stage": 1})
    undo = nan_at(set(range(2, 100)), gas)
    run("nan_stop", train={**const, "max_steps": 10, "max_bad_steps": 2}, checkpoint={"every": 1, "keep": 2},
        deepspeed={"zero_stage": 1})
    undo()
    if rank == 0:
        out["nan_sd"] = {"after_skip": _state_dict(root / "nan/checkpoints/step_00000002"),
                         "before": _state_dict(root / "nan_ref/checkpoints/step_00000001")}
        ck = root / "nan_stop/checkpoints"
        out["nan_stop_ckpts"] = {"dirs": sorted(p.name for p in ck.iterdir()), "latest": (ck / "latest").read_text().strip()}

    # Resume: crash during step 5, a partial step-4 checkpoint left behind, resume=auto.
    resume_cfg = dict(train={"max_steps": 6}, checkpoint={"every": 3, "keep": 2}, deepspeed={"zero_stage": 2})
    run("uninterrupted", shards, **resume_cfg)
    undo = crashing_loader(after_batches=4 * gas)
    run("resumed", shards, **resume_cfg)
    undo()
    if rank == 0:
        import shutil

        ck = root / "resumed/checkpoints"
        shutil.copytree(ck / "step_00000003", ck / "step_00000004")
        (ck / "step_00000004" / "COMPLETE").unlink()
    from torch import distributed as dist

    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("resumed", shards, **resume_cfg)
    out["resume_warnings"] = [str(w.message) for w in caught if "skipping checkpoint" in str(w.message)]
    return out


def single_runs(rank, world, root):
    """The one-process reference for the sp = 2 runs of scenarios()."""
    from llm_lru.train import trainer

    trainer.train(tiny_cfg(Path(root) / "single", train={"micro_batch_size": 2, "val_every": 2}))
    # micro batch 1 x 4 accumulation steps: validation must still read the same sequences
    trainer.train(tiny_cfg(Path(root) / "single_micro1", train={"micro_batch_size": 1, "val_every": 2}))
    return {name: {"metrics": metrics(Path(root) / name)} for name in ("single", "single_micro1")}


def no_val_run(rank, world, root, val_fraction=0.0):
    """Shards with no 'val' split (val_fraction 0) and train.val_every set: the run trains with
    validation off and says so once (returns the metrics and what the run printed). With a
    val_fraction, a val split smaller than train.val_batches global batches."""
    import contextlib
    import io

    from llm_lru.data_prep.prep import PrepConfig, run_prep
    from llm_lru.train import trainer

    root = Path(root)
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("one small document of text, " * 40)
    run_prep(PrepConfig(inputs=[str(corpus)], tokenizer="bytes", seq_len=16, shard_size=50,
                        val_fraction=val_fraction), root / "data", progress=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.train(tiny_cfg(root / "run", model={"vocab_size": 512}, train={"val_every": 2},
                               data={"source": "shards", "path": str(root / "data"), "num_workers": 0}))
    return {"metrics": metrics(root / "run"), "printed": printed.getvalue()}


def changed_model_resume(rank, world, root, shards):
    """Train 2 steps, then resume the run with another d_model: the error (before DeepSpeed loads
    anything) and the run's config.yaml before and after."""
    from llm_lru.config import ConfigError
    from llm_lru.train import trainer

    root = Path(root)
    trainer.train(shard_cfg(root / "run", shards, train={"max_steps": 2}))  # saves at the end
    before = (root / "run" / "config.yaml").read_text()
    try:
        trainer.train(shard_cfg(root / "run", shards, model={"d_model": 48}, train={"max_steps": 4},
                                checkpoint={"resume": "auto"}))
        error = None
    except ConfigError as e:
        error = str(e)
    return {"error": error, "config_kept": (root / "run" / "config.yaml").read_text() == before}
