"""Sequential reference scans: one step at a time, float64-capable, easy to read.

Every fast path and kernel is tested against these. They are slow (a Python loop over T).
Outputs are in the accumulation dtype: float32 for half/float inputs, float64 for float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .checks import acc_dtype, check_block, check_companion, check_diag

Tensor = torch.Tensor


def block_scan_ref(A: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """h_t[n] = A_t[n] @ h_{t-1}[n] + u_t[n]  (reverse: h_t = A_t h_{t+1} + u_t).

    A: (B, T, N, m, m)  u: (B, T, N, m)  h0: (B, N, m) or None
    returns h: (B, T, N, m), h_last: (B, N, m) (state after the last step in scan order).
    """
    check_block(A, u, h0)
    B, T, N, m = u.shape
    dt = acc_dtype(A, u, h0)
    h = h0.to(dt) if h0 is not None else u.new_zeros(B, N, m, dtype=dt)
    out = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = torch.einsum("bnij,bnj->bni", A[:, t].to(dt), h) + u[:, t].to(dt)
        out[t] = h
    return torch.stack(out, 1), h


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


def block_product_ref(A: Tensor, reverse: bool = False) -> Tensor:
    """Transition of a whole slice: P with h_last(h0) = P h0 + h_last(0).

    Forward: P = A_T ... A_1; reverse: P = A_1 ... A_T. A: (B, T, N, m, m) -> (B, N, m, m).
    """
    B, T, N, m, _ = A.shape
    dt = acc_dtype(A)
    P = torch.eye(m, dtype=dt, device=A.device).expand(B, N, m, m)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        P = A[:, t].to(dt) @ P
    return P
