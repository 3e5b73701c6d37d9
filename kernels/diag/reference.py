"""The diagonal scan's sequential reference (m = 1): one step at a time, float64-capable; the chunked
path and the Triton kernel are tested against it. Outputs in the accumulation dtype."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.scan import acc_dtype, check_diag

Tensor = torch.Tensor


def diag_scan_ref(a: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + u_t, elementwise (m = 1).

    a, u: (B, T, N)  h0: (B, N) or None  ->  h: (B, T, N), h_last: (B, N).
    """
    check_diag(a, u, h0)
    B, T, N = u.shape
    dt = acc_dtype(a, u, h0)
    h = h0.to(dt) if h0 is not None else u.new_zeros(B, N, dtype=dt)
    out = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = a[:, t].to(dt) * h + u[:, t].to(dt)
        out[t] = h
    return torch.stack(out, 1), h
