"""The companion (H-LRU) scan's sequential reference and H-LRU's gated reference: one step at a time,
float64-capable; the chunked path and the Triton kernels are tested against them. Outputs in the
accumulation dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.scan import acc_dtype, check_companion, check_reset, check_tensor, normalize_rows

Tensor = torch.Tensor


def companion_scan_ref(a: Tensor, x: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                       reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Order-m recurrence per channel: y_t = sum_k a_t[k-1] * y_{t-k} + x_t (k = 1..m).

    As a block scan: state s_t = (y_t, y_{t-1}, ..., y_{t-m+1}), A_t the companion matrix of a_t
    (first row a_t, ones on the sub-diagonal), u_t = (x_t, 0, ..., 0). reset[b, t] zeroes A_t,
    which clears the whole history (the shift too). In reverse, t-k reads t+k.

    a: (B, T, N, m)  x: (B, T, N)  h0: (B, N, m) or None  reset: (B, T) bool or None
    returns y: (B, T, N) (= s_t[0]) and s_last: (B, N, m).
    """
    check_companion(a, x, h0, reset)
    B, T, N = x.shape
    m = a.shape[-1]
    dt = acc_dtype(a, x, h0)
    s = h0.to(dt) if h0 is not None else x.new_zeros(B, N, m, dtype=dt)
    out = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if reset is not None:
            s = s * (~reset[:, t]).to(dt)[:, None, None]
        y = (a[:, t].to(dt) * s).sum(-1) + x[:, t].to(dt)
        s = torch.cat([y[..., None], s[..., :-1]], -1)
        out[t] = y
    return torch.stack(out, 1), s


def companion_matrix(a: Tensor) -> Tensor:
    """(..., m) coefficients -> (..., m, m) companion matrix (first row a, ones below the diagonal)."""
    m = a.shape[-1]
    shift = torch.diag(torch.ones(m - 1, dtype=a.dtype, device=a.device), -1)
    C = shift.expand(*a.shape[:-1], m, m).clone()
    C[..., 0, :] = a
    return C


def check_hlru(logits: Tensor, v: Tensor, h0: Optional[Tensor], reset: Optional[Tensor]) -> None:
    """logits: (B, T, N, m + 1), v: (B, T, N), h0: (B, N, m), reset: (B, T) bool."""
    check_tensor("v", v, [None, None, None], "(B, T, N)")
    B, T, N = v.shape
    check_tensor("logits", logits, [B, T, N, None], f"(B, T, N, m + 1) with B, T, N = {(B, T, N)}")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits: need m + 1 >= 2 entries per channel, got {logits.shape[-1]}")
    if h0 is not None:
        check_tensor("h0", h0, [B, N, logits.shape[-1] - 1], f"(B, N, m) = {(B, N, logits.shape[-1] - 1)}")
    check_reset(reset, B, T)


def hlru_scan_reference(logits: Tensor, v: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                        reset: Optional[Tensor] = None, norm: str = "softmax") -> Tuple[Tensor, Tensor]:
    """H-LRU scan: y_t = sum_k a_{t,k} y_{t-k} + a_{t,0} v_t, (a_{t,1..m}, a_{t,0}) = normalize_rows(logits_t).

    logits: (B, T, N, m + 1) (entries 0..m-1 are a_1..a_m, entry m is a_0)  v: (B, T, N)
    h0: (B, N, m)  reset: (B, T) bool  ->  y: (B, T, N), s_last: (B, N, m) (companion_scan_ref).
    """
    check_hlru(logits, v, h0, reset)
    P = normalize_rows(logits, norm)
    m = P.shape[-1] - 1
    return companion_scan_ref(P[..., :m], P[..., m] * v.to(P.dtype), h0, reverse, reset)
