"""A new run that starts from another run's weights: `checkpoint.init_from: PATH`.

    init = load_init(cfg, model)     # the weights are now in `model`; None without init_from
    ...build the engine (universal_load_config(cfg) when init.universal)...
    load_init_optimizer(engine, init)   # checkpoint.init_optimizer: the AdamW moments too

PATH is a trainer checkpoint (step_N), a run dir (its newest complete checkpoint) or an export
folder (`llm-lru export`). Unlike a resume, everything but the weights starts fresh: step 0, the
data from its start, this run's train.seq_len, parallel.sp, schedule and world size; the optimizer
is new unless `checkpoint.init_optimizer: true`, which loads the checkpoint's AdamW moments and
step counts (not from an export, which has none). The model section must equal the source's
except RESUMABLE_MODEL_FIELDS (model.rope_theta and model.window among them): the long-context
continuation of a 2K model at 128K with sp = 8 is `configs/hybrid-350m-extend-128k.yaml`.

A run that already has its own checkpoints resumes them (checkpoint.resume) and ignores init_from,
so a continuation that is preempted continues, not restarts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from llm_lru.config import RESUMABLE_MODEL_FIELDS, ConfigError, ModelConfig, RunConfig
from llm_lru.train import checkpoint as ckpt_lib
from llm_lru.train.engine import resolve_precision


@dataclass
class InitSource:
    """Where the weights came from; `checkpoint` and `universal` matter for init_optimizer."""

    path: Path
    kind: str                           # "checkpoint" | "export"
    step: Optional[int] = None          # the source run's step, when known
    checkpoint: Optional[Path] = None   # trainer checkpoint dir (kind "checkpoint")
    optimizer: bool = False             # checkpoint.init_optimizer: load its optimizer state too
    universal: bool = False             # ... from its universal checkpoint


def check_init_model(saved: ModelConfig, model: ModelConfig, where: str) -> None:
    """ConfigError naming every model key that differs from the source's, RESUMABLE_MODEL_FIELDS aside."""
    diffs = [f"model.{f.name}: {getattr(saved, f.name)!r} in {where}, {getattr(model, f.name)!r} in this run"
             for f in dataclasses.fields(saved)
             if f.name not in RESUMABLE_MODEL_FIELDS and getattr(saved, f.name) != getattr(model, f.name)]
    if diffs:
        raise ConfigError("checkpoint.init_from: the model differs from the one it starts from: " + "; ".join(diffs)
                          + f". Only {', '.join('model.' + k for k in RESUMABLE_MODEL_FIELDS)} may change")


def _is_export(path: Path) -> bool:
    """An `llm-lru export` folder: config.json with model_type llm_lru."""
    import json

    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "llm_lru"
    except (OSError, ValueError):
        return False


def read_weights(path: str | Path):
    """(fp32 state dict, ModelConfig, InitSource) of a checkpoint, run dir or export folder."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint.init_from: {p} does not exist (a checkpoint, a run dir or an export folder)")
    if _is_export(p):
        from llm_lru.export.load import load_hybrid

        model = load_hybrid(p, torch.float32)
        return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.cfg,
                InitSource(p, "export"))
    from llm_lru.export.source import consolidate, resolve_source

    try:
        src = resolve_source(p)
    except ValueError as e:
        raise ValueError(f"checkpoint.init_from: {e}") from None
    return consolidate(src), src.config.model, InitSource(p, "checkpoint", src.meta.get("step"), src.checkpoint)


def load_init(cfg: RunConfig, model: torch.nn.Module) -> Optional[InitSource]:
    """Load checkpoint.init_from's weights into `model` (on every rank); None when not set.

    With checkpoint.init_optimizer, also decides (rank 0 converts, every rank hears) whether the
    optimizer state must come from DeepSpeed's universal checkpoint: under ZeRO or bf16 when the
    world size changed."""
    c = cfg.checkpoint
    if not c.init_from:
        return None
    from llm_lru.export.source import match_keys

    sd, saved_model, init = read_weights(c.init_from)
    check_init_model(saved_model, cfg.model, str(init.path))
    sd = match_keys(sd, model.state_dict().keys(), f"checkpoint.init_from={init.path}")
    model.load_state_dict(sd)
    if not c.init_optimizer:
        return init
    if init.kind != "checkpoint" or init.checkpoint is None:
        raise ConfigError(f"checkpoint.init_optimizer: {init.path} is an export, which holds no optimizer state; "
                          "set checkpoint.init_optimizer=false")
    init.optimizer = True
    meta = ckpt_lib.read_meta(init.checkpoint)
    for key, saved, now in (("deepspeed.zero_stage", meta["zero_stage"], cfg.deepspeed.zero_stage),
                            ("train.precision", meta["precision"], resolve_precision(cfg.train))):
        if saved != now:
            raise ConfigError(f"checkpoint.init_optimizer: {key} is {now!r} here, {saved!r} in {init.checkpoint}; "
                              "keep it to load the optimizer state, or set checkpoint.init_optimizer=false")
    sharded = cfg.deepspeed.zero_stage > 0 or resolve_precision(cfg.train) == "bf16"
    if sharded and meta["world_size"] != dist.get_world_size():
        err = [None]
        if dist.get_rank() == 0:
            try:
                ckpt_lib.to_universal(init.checkpoint)
            except Exception as e:  # every rank must hear of it
                err[0] = f"{type(e).__name__}: {e}"
        dist.broadcast_object_list(err, src=0)
        if err[0]:
            raise ValueError(f"checkpoint.init_optimizer: {init.checkpoint} could not be made a universal "
                             f"checkpoint: {err[0]}")
        init.universal = True
    return init


def load_init_optimizer(engine, init: Optional[InitSource]) -> None:
    """checkpoint.init_optimizer: the source checkpoint's AdamW moments and step counts into the
    engine (weights too, the same ones); this run's own optimizer settings stay."""
    if init is None or not init.optimizer:
        return
    ds_dir = init.checkpoint / (ckpt_lib.UNIVERSAL_SUBDIR if init.universal else ckpt_lib.DS_SUBDIR)
    hyper = ckpt_lib.group_hyperparams(engine.optimizer)
    path, _ = engine.load_checkpoint(str(ds_dir), tag=ckpt_lib.DS_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"checkpoint.init_optimizer: DeepSpeed could not load {ds_dir}")
    # The settings (betas, weight decay) are this run's; only the state comes from the checkpoint.
    ckpt_lib.repair_universal_load(engine.optimizer, hyper)
