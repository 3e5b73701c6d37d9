"""The block scan's float64-capable sequential reference, and the BD-LRU gated scan's: one step at
a time, easy to read; every fast path and kernel is tested against these (they are slow: a
Python loop over T). Outputs are in the accumulation dtype: float32 for half/float inputs,
float64 for float64.

`reset` below is a per-step cut (B, T) bool: reset[b, t] zeroes A_t (the state entering step t is
dropped), as in the companion reference. Document starts in reverse scans are turned into cuts by
`transition_mask`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.scan import acc_dtype, check_block, check_reset, check_tensor, normalize_rows

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


def _cut(x: Tensor, reset: Optional[Tensor]) -> Tensor:
    """Zero x[b, t, ...] where reset[b, t]."""
    if reset is None:
        return x
    keep = (~reset).to(x.dtype)
    return x * keep.reshape(*keep.shape, *([1] * (x.dim() - 2)))


def check_bdlru(logits: Tensor, v: Tensor, h0: Optional[Tensor], reset: Optional[Tensor]) -> None:
    """logits: (B, T, N, m, m + 1), v: (B, T, N, m), h0: (B, N, m), reset: (B, T) bool."""
    check_tensor("v", v, [None, None, None, None], "(B, T, N, m)")
    B, T, N, m = v.shape
    check_tensor("logits", logits, [B, T, N, m, m + 1], f"(B, T, N, m, m + 1) = {(B, T, N, m, m + 1)}")
    if h0 is not None:
        check_tensor("h0", h0, [B, N, m], f"(B, N, m) = {(B, N, m)}")
    check_reset(reset, B, T)


def bdlru_gates(logits: Tensor, v: Tensor, norm: str = "softmax", reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """BD-LRU transitions from gate logits: A = P[..., :m] (cut at resets), u = P[..., m] * v.

    logits: (B, T, N, m, m + 1), v: (B, T, N, m) -> A: (B, T, N, m, m), u: (B, T, N, m).
    """
    P = normalize_rows(logits, norm)
    m = P.shape[-2]
    return _cut(P[..., :m], reset), P[..., m] * v.to(P.dtype)


def bdlru_scan_reference(logits: Tensor, v: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                         reset: Optional[Tensor] = None, norm: str = "softmax") -> Tuple[Tensor, Tensor]:
    """BD-LRU scan: h_t = A_t h_{t-1} + a0_t * v_t with (A_t, a0_t) = normalize_rows(logits_t).

    logits: (B, T, N, m, m + 1)  v: (B, T, N, m)  h0: (B, N, m)  reset: (B, T) bool
    returns h: (B, T, N, m), h_last: (B, N, m) (block_scan_ref semantics).
    """
    check_bdlru(logits, v, h0, reset)
    A, u = bdlru_gates(logits, v, norm, reset)
    return block_scan_ref(A, u, h0, reverse)
