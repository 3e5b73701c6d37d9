"""Apply parallelism to a model from outside it, torchtitan style: the model never imports this package.

    mesh = init_mesh(cfg.parallel)
    model = parallelize(HybridLM(cfg.model), mesh, cfg.parallel,
                        activation_checkpointing=cfg.train.activation_checkpointing)

One concern per function, in place, each a no-op where it has nothing to do:
- `apply_sp`: every module with a ScanOp attribute `scan` (the recurrent mixers) gets an SPScan
  over the mesh's SP group, every module with an `attend` function (the attention mixers) an
  SPAttention (and its `extend_cache` KV-cache seam, where it has one, an SPCache). The caller
  then feeds each rank its slice and pos_offset = mesh.pos_offset(T_local).
- `apply_activation_checkpointing`: each block of `model.layers` recomputes its forward in
  backward.

    with unsplit(model): ...   # work every rank repeats whole (one-token decoding): sp = 1 seams
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Dict, Iterator

import torch
import torch.nn as nn
import torch.utils.checkpoint

from llm_lru.kernels import ScanOp

from .attention import SPAttention, SPCache
from .mesh import Mesh
from .scan import CARRIES, SPScan


def parallelize(model: nn.Module, mesh: Mesh, parallel: Any = None, activation_checkpointing: bool = False,
                final_state: bool = True) -> nn.Module:
    """Sequence parallelism over `mesh` and, if asked, activation checkpointing; returns the model.

    parallel: the run config's `parallel` section (its `carry`) or None (the all-gather carry).
    final_state=False suits training, where the recurrent states after the sequence are not used
    (see SPScan); keep True for chunked prefill / return_state.
    """
    apply_sp(model, mesh, getattr(parallel, "carry", "allgather"), final_state)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def apply_sp(model: nn.Module, mesh: Mesh, carry: str = "allgather", final_state: bool = True) -> nn.Module:
    """Swap the scan / attend seams of `model` (in place) for their SP versions over mesh.sp_group.

    A mesh with sp = 1 leaves the model untouched. Calling it twice is harmless (already
    wrapped seams are rebound to this mesh rather than wrapped again).
    """
    if carry not in CARRIES:
        raise ValueError(f"parallel.carry: must be one of {', '.join(CARRIES)}, got '{carry}'")
    if mesh.sp == 1:
        return model
    for module in model.modules():
        scan = module.__dict__.get("scan", getattr(type(module), "scan", None))
        if isinstance(scan, SPScan):
            scan = scan.inner
        if isinstance(scan, ScanOp):
            setattr(module, "scan", SPScan(scan, mesh.sp_group, carry, final_state))
        attend = getattr(module, "attend", None)
        if isinstance(attend, SPAttention):
            attend = attend.inner
        if attend is not None and callable(attend):
            setattr(module, "attend", SPAttention(attend, mesh.sp_group))
            cache = getattr(module, "extend_cache", None)
            if isinstance(cache, SPCache):
                cache = cache.inner
            if cache is not None and callable(cache):
                setattr(module, "extend_cache", SPCache(cache, mesh.sp_group))
    _check_every_mixer_wrapped(model, mesh.sp)
    return model


def _check_every_mixer_wrapped(model: nn.Module, sp: int) -> None:
    """Refuse a model whose block mixer has no seam SP wrapped: a mixer that calls a kernel directly
    would scan each slice from a zero state (or attend within its slice), silently wrong."""
    for i, block in enumerate(getattr(model, "layers", ())):
        mixer = getattr(block, "mixer", None)
        if mixer is None:
            continue
        wrapped = any(isinstance(m.__dict__.get("scan"), SPScan) or isinstance(m.__dict__.get("attend"), SPAttention)
                      for m in mixer.modules())
        if not wrapped:
            raise ValueError(f"parallel.sp={sp}: layers.{i}.mixer ({type(mixer).__name__}) has no scan or attend "
                             "seam for sequence parallelism to wrap: its slices would not see each other. Give it "
                             "a `scan` (a kernels ScanOp) or `attend` seam, or train it with parallel.sp=1")


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block of `model.layers` in the backward pass (non-reentrant checkpointing).

    The block's forward is wrapped in place, so parameter names stay unchanged (checkpoints and
    exports see the same state dict); without autograd (evaluation, generation) it runs as it is.
    Calling it twice wraps once.
    """
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError("train.activation_checkpointing: the model has no `layers` to checkpoint")
    for block in layers:
        if "forward" not in block.__dict__:
            block.forward = _checkpointed(block.forward)
    return model


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


_WRAPPERS = {"scan": SPScan, "attend": SPAttention, "extend_cache": SPCache}


@contextmanager
def unsplit(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every SP seam of `model` is its inner (sp = 1) version, so each rank runs
    whole inputs on its own, with no collective: for work that every rank repeats identically,
    such as decoding one token at a time from a replicated state (the state layout is the same).
    A model without SP seams is left as it is."""
    swapped = []
    for module in model.modules():
        for attr, wrapper in _WRAPPERS.items():
            seam = module.__dict__.get(attr)
            if isinstance(seam, wrapper):
                swapped.append((module, attr, seam))
                setattr(module, attr, seam.inner)
    try:
        yield model
    finally:
        for module, attr, seam in swapped:
            setattr(module, attr, seam)


def sp_seams(model: nn.Module) -> Dict[str, str]:
    """{module name: 'scan' | 'attend'} for every SP-wrapped seam (for logs and tests)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "scan", None), SPScan):
            out[name] = "scan"
        elif isinstance(getattr(module, "attend", None), SPAttention):
            out[name] = "attend"
    return out
