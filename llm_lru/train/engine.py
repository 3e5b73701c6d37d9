"""DeepSpeed engine for a RunConfig: ZeRO stage, precision, AdamW, LR schedule.

    engine, optimizer = build_engine(model, cfg, world_size)

The optimizer is a torch AdamW passed in as a client optimizer (fused on CUDA). DeepSpeed's
own Adam ops JIT-compile for ~80 s on CPU, so they are never asked for here. The learning rate
is set by `set_lr(optimizer, lr_at(cfg.train, step))` (llm_lru/train/schedule.py) before each optimizer step rather than by
a DeepSpeed scheduler, with step = the number of applied (not skipped) steps so far: a skipped
(NaN) step applied no update, so it must not eat into warmup or decay (the convention of
DeepSpeed's and Megatron's schedulers on overflow); and a resumed run, at any world size, gets
its LR from the trainer's step counters alone.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from llm_lru.config import RunConfig, TrainConfig


def disable_cpu_shm_comm() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory comm op (~50 s) on a CPU run.

    DeepSpeed's TorchBackend builds `deepspeed_shm_comm` whenever `__compatible_ops__` says it
    can; the op only serves `inference_all_reduce`, never training collectives, which stay on
    gloo. Marking it incompatible (the dict is cached in the module, so the edit persists)
    skips the build. Call before `deepspeed.initialize` / `deepspeed.init_distributed`.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def resolve_precision(cfg: TrainConfig) -> str:
    """'bf16' on CUDA and 'fp32' on CPU for precision=auto; else the configured value."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def batch_geometry(cfg: RunConfig, dp: int) -> Tuple[int, int]:
    """(micro_batch, grad_accum) of a DP size (config.check_world's), with
    global_batch_size = micro * grad_accum * dp."""
    per_rank = cfg.train.global_batch_size // dp
    micro = cfg.train.micro_batch_size or per_rank
    return micro, per_rank // micro


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg: RunConfig, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config dict for this run (deepspeed.overrides merged in last).

    DeepSpeed sees every rank (dp x sp) as data parallel: it averages gradients over the whole
    world and ZeRO shards over all ranks. Its `train_batch_size` therefore counts each sequence
    once per SP rank; the loss scaling in the trainer makes the average the global token mean.
    """
    micro, gas = batch_geometry(cfg, world_size // cfg.parallel.sp)
    ds = cfg.deepspeed
    zero: Dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    conf: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(cfg.train) == "bf16"},
        # A client torch optimizer, also under ZeRO and offload: DeepSpeed must not insist on its own.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(conf, ds.overrides)


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next step can be turned into a no-op (non-finite loss).

    DeepSpeed's own overflow check differs across stages and precisions (stage 0 fp32 has none),
    so the skip is made here, under every wrapper: moments, step counts and weights stay as
    they were, and DeepSpeed still zeroes the gradients.
    """

    skip_next: bool = False

    def step(self, closure=None):  # noqa: D401 - torch signature
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on matrices only; vectors (norms, biases, gate biases, LRU nu/theta) are exempt."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> SkippableAdamW:
    """AdamW (fused on CUDA) over the model's parameters."""
    fused = torch.cuda.is_available()
    return SkippableAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                          eps=cfg.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def build_engine(model: nn.Module, cfg: RunConfig, world_size: int):
    """deepspeed.initialize on `model` with the run's ZeRO stage and precision.

    Returns (engine, optimizer): the DeepSpeed engine and the underlying SkippableAdamW (the
    object whose `skip_next` and `param_groups[i]['lr']` the trainer sets).
    """
    import deepspeed

    disable_cpu_shm_comm()
    optimizer = make_optimizer(model, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, world_size))
    return engine, optimizer
