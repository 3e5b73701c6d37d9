"""Apply sequence parallelism to a model, torchtitan style: the model never imports this package.

    model = parallelize(HybridLM(cfg.model), mesh, carry=cfg.parallel.carry)

Every module with a ScanOp attribute `scan` (the recurrent mixers) gets an SPScan over the mesh's
SP group, and every module with an `attend` function (the attention mixers) an SPAttention.
The caller then feeds each rank its slice and pos_offset = mesh.pos_offset(T_local).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn as nn

from llm_lru.kernels.ops import ScanOp

from .attention import SPAttention
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
    return model


def sp_seams(model: nn.Module) -> Dict[str, str]:
    """{module name: 'scan' | 'attend'} for every SP-wrapped seam (for logs and tests)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "scan", None), SPScan):
            out[name] = "scan"
        elif isinstance(getattr(module, "attend", None), SPAttention):
            out[name] = "attend"
    return out
