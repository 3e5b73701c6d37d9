"""Gate normalisations of BD-LRU and H-LRU (DESIGN.md §2), and their PyTorch reference scans.

This is the ONE definition of the normalisations: the gated scan ops (kernels/gated.py, which the
BD-LRU and H-LRU mixers hold) import `normalize_rows` from here, and the fused Triton kernels
(llm_lru.kernels.triton) are tested against these functions.
It does not import triton, so CPU users never pay for it.

    normalize_rows(logits, norm) -> P        each row over its last axis (size m + 1)
      softmax:  P = softmax(g)
      sigmoid:  P = sigmoid(g) / sum sigmoid(g)
      relu:     P = relu(g)    / (sum relu(g)    + eps)
      tanh:     P = tanh(g)    / (sum |tanh(g)|  + eps)
      lin_l1:   P = g          / (sum |g|        + eps)
    Every row of P has L1 norm <= 1, so the state of the recurrence stays bounded.

`reset` in the two scans below is a per-step cut (B, T) bool: reset[b, t] zeroes A_t (the state
entering step t is dropped), exactly as in `companion_scan_ref`. Document starts in reverse scans
are turned into cuts by `llm_lru.kernels.ops.transition_mask`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .checks import check_reset, check_tensor
from .reference import block_scan_ref, companion_scan_ref

Tensor = torch.Tensor

NORMS = ("softmax", "sigmoid", "relu", "tanh", "lin_l1")  # also fused in the Triton kernels (codes 1..5)
# Keeps relu/tanh/lin_l1 rows finite when every entry is zero; small enough not to matter otherwise.
EPS = 1e-6
_EPS = EPS


# torch's CPU softmax vectorises along the row: on rows shorter than this it runs 2-3x slower
# than the same softmax from elementwise ops and reductions (bench/gates_cpu.py).
_SHORT_ROW = 8


class _ShortRowSoftmax(torch.autograd.Function):
    """softmax over a short last axis, from elementwise ops; backward from the saved output."""

    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:
        p = (g - g.amax(-1, keepdim=True)).exp_()
        p.div_(p.sum(-1, keepdim=True))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, gp: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        gg = gp * p
        return gg.sub_(p * gg.sum(-1, keepdim=True))


def _softmax(g: Tensor) -> Tensor:
    if g.device.type == "cpu" and g.shape[-1] < _SHORT_ROW:
        return _ShortRowSoftmax.apply(g)
    return torch.softmax(g, -1)


def check_norm(norm: str) -> None:
    """Raise ValueError naming the unknown normalisation."""
    if norm not in NORMS:
        raise ValueError(f"norm: unknown gate normalisation '{norm}' (one of {', '.join(NORMS)})")


def normalize_rows(logits: Tensor, norm: str = "softmax") -> Tensor:
    """Normalise each row of gate logits over the last axis; returns P with the same shape.

    logits: (..., m + 1). Computed in the accumulation dtype (fp32 for half inputs).
    """
    check_norm(norm)
    g = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if norm == "softmax":
        return _softmax(g)
    if norm == "sigmoid":
        s = torch.sigmoid(g)
        return s / s.sum(-1, keepdim=True)
    if norm == "relu":
        s = torch.relu(g)
        return s / (s.sum(-1, keepdim=True) + EPS)
    s = torch.tanh(g) if norm == "tanh" else g  # lin_l1: the logits themselves
    return s / (s.abs().sum(-1, keepdim=True) + EPS)


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


__all__ = ["NORMS", "EPS", "normalize_rows", "bdlru_gates", "bdlru_scan_reference", "hlru_scan_reference",
           "check_norm", "check_bdlru", "check_hlru"]
