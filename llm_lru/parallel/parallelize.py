"""Apply sequence parallelism to a model, torchtitan style: the model never imports this package.

    model = parallelize(HybridLM(cfg.model), mesh, carry=cfg.parallel.carry)

Every module with a ScanOp attribute `scan` (the recurrent mixers) gets an SPScan over the mesh's
SP group, and every module with an `attend` function (the attention mixers) an SPAttention
(and its `extend_cache` KV-cache seam, where it has one, an SPCache).
The caller then feeds each rank its slice and pos_offset = mesh.pos_offset(T_local).

    with unsplit(model): ...   # work every rank repeats whole (one-token decoding): sp = 1 seams
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch.nn as nn

from llm_lru.kernels.ops import ScanOp

from .attention import SPAttention, SPCache
from .mesh import Mesh
from .scan import CARRIES, SPScan


def parallelize(model: nn.Module, mesh: Mesh, carry: str = "allgather", final_state: bool = True,
                recompute: Optional[bool] = None) -> nn.Module:
    """Swap the scan / attend seams of `model` (in place) for their SP versions; returns the model.

    A mesh with sp = 1 leaves the model untouched. Calling it twice is harmless (already
    wrapped seams are rebound to this mesh rather than wrapped again). final_state=False suits
    training, where the recurrent states after the sequence are not used (see SPScan); keep
    True for chunked prefill / return_state. recompute: see SPScan.
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
            setattr(module, "scan", SPScan(scan, mesh.sp_group, carry, recompute, final_state))
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
    return model


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
