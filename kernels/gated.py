"""Gated scan ops: the selective mixers hand over raw gate logits, not transitions.

On CUDA (or backend "triton") the fused Triton kernels normalise the rows in registers so the
m x m transitions never reach memory; elsewhere the rows are normalised here and the block /
companion scans run on the result. Both keep the ScanOp interface (h0, reverse, reset, product).
"""
from __future__ import annotations

from typing import Optional

import torch

from .gates import normalize_rows
from .ops import BLOCK, COMPANION, ScanOp, get_backend, transition_mask

Tensor = torch.Tensor


def _use_triton(x: Tensor) -> bool:
    backend = get_backend()
    return backend == "triton" or (backend == "auto" and x.is_cuda)


class GatedBlockScan(ScanOp):
    """BD-LRU. trans = gate logits (B, T, N, m, m+1), u = values v (B, T, N, m); state (B, N, m).

    Rows normalised over m+1 entries: A_t = P[..., :m], u_t = P[..., m] * v_t.
    """

    name = "bdlru"

    def __init__(self, norm: str = "softmax"):
        self.norm = norm

    def split(self, logits: Tensor):
        P = normalize_rows(logits, self.norm)
        return P[..., :-1], P[..., -1]

    def __call__(self, logits, v, h0=None, reverse=False, reset=None):
        if _use_triton(logits):
            from .triton import bdlru_scan_triton
            return bdlru_scan_triton(logits, v, h0, reverse, transition_mask(reset, reverse), norm=self.norm)
        A, a0 = self.split(logits)
        return BLOCK(A, a0 * v.to(a0.dtype), h0, reverse, reset)

    def product(self, logits, reverse=False, reset=None):
        return BLOCK.product(self.split(logits)[0], reverse, reset)

    def carry(self, logits, v, reverse=False, reset=None):
        """(P, s) of the slice in one pass, the gates normalised once. Values only (no autograd)."""
        with torch.no_grad():
            if _use_triton(logits):
                from .triton import block_carry_triton
                return block_carry_triton(logits, v, reverse, transition_mask(reset, reverse), norm=self.norm)
            A, a0 = self.split(logits)
            return BLOCK.carry(A, a0 * v.to(a0.dtype), reverse, reset)

    def __repr__(self) -> str:
        return f"GatedBlockScan(norm={self.norm!r})"


class GatedCompanionScan(ScanOp):
    """H-LRU. trans = gate logits (B, T, N, m+1), u = values v (B, T, N); state (B, N, m).

    Rows normalised over m+1 entries: a_{t,1..m} = P[..., :m], a_{t,0} = P[..., m];
    y_t = sum_k a_{t,k} y_{t-k} + a_{t,0} v_t.
    """

    name = "hlru"

    def __init__(self, norm: str = "softmax"):
        self.norm = norm

    def split(self, logits: Tensor):
        P = normalize_rows(logits, self.norm)
        return P[..., :-1], P[..., -1]

    def __call__(self, logits, v, h0=None, reverse=False, reset=None):
        if _use_triton(logits):
            from .triton import hlru_scan_triton
            return hlru_scan_triton(logits, v, h0, reverse, transition_mask(reset, reverse), norm=self.norm)
        a, a0 = self.split(logits)
        return COMPANION(a, a0 * v.to(a0.dtype), h0, reverse, reset)

    def product(self, logits, reverse=False, reset=None):
        return COMPANION.product(self.split(logits)[0], reverse, reset)

    def apply(self, P, h):
        return COMPANION.apply(P, h)

    def carry(self, logits, v, reverse=False, reset=None):
        """(P, s) of the slice in one pass, the gates normalised once. Values only (no autograd)."""
        with torch.no_grad():
            if _use_triton(logits):
                from .triton import companion_carry_triton
                return companion_carry_triton(logits, v, reverse, transition_mask(reset, reverse), norm=self.norm)
            a, a0 = self.split(logits)
            return COMPANION.carry(a, a0 * v.to(a0.dtype), reverse, reset)

    def __repr__(self) -> str:
        return f"GatedCompanionScan(norm={self.norm!r})"
