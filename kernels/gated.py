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


class _GatedScan(ScanOp):
    """Gate logits in, normalised rows to `inner` (or the fused Triton kernels on CUDA)."""

    inner: ScanOp

    def __init__(self, norm: str = "softmax"):
        self.norm = norm

    def split(self, logits: Tensor):
        """Normalised rows -> (transitions, input weight a0)."""
        P = normalize_rows(logits, self.norm)
        return P[..., :-1], P[..., -1]

    def __call__(self, logits, v, h0=None, reverse=False, reset=None):
        if _use_triton(logits):
            return self.fused_scan(logits, v, h0, reverse, transition_mask(reset, reverse), norm=self.norm)
        inner, trans, u = self.prepare(logits, v)
        return inner(trans, u, h0, reverse, reset)

    def prepare(self, logits, v):
        """The normalised rows and weighted input for `inner` (differentiable); on the Triton
        path nothing: the fused kernel keeps the transitions out of memory, which is worth more."""
        if _use_triton(logits):
            return self, logits, v
        trans, a0 = self.split(logits)
        return self.inner, trans, a0 * v.to(a0.dtype)

    def local(self, logits, v, reverse=False, reset=None):
        """The split scan (ops module doc); on Triton the fused kernels' native split, the gates
        normalised in registers in every pass."""
        if _use_triton(logits):
            return self.fused_local(logits, v, reverse, transition_mask(reset, reverse), norm=self.norm, op=self)
        return super().local(logits, v, reverse, reset)

    def product(self, logits, reverse=False, reset=None):
        return self.inner.product(self.split(logits)[0], reverse, reset)

    def apply(self, P, h):
        return self.inner.apply(P, h)

    def carry(self, logits, v, reverse=False, reset=None):
        """(P, s) of the slice in one pass, the gates normalised once. Values only (no autograd)."""
        with torch.no_grad():
            if _use_triton(logits):  # the fused split's carry-free pass: gates normalised in registers
                part = self.local(logits, v, reverse, reset)
                return part.P, part.s
            trans, a0 = self.split(logits)
            return self.inner.carry(trans, a0 * v.to(a0.dtype), reverse, reset)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.norm!r})"


class GatedBlockScan(_GatedScan):
    """BD-LRU. trans = gate logits (B, T, N, m, m+1), u = values v (B, T, N, m); state (B, N, m).

    Rows normalised over m+1 entries: A_t = P[..., :m], u_t = P[..., m] * v_t.
    """

    name = "bdlru"
    inner = BLOCK

    @staticmethod
    def fused_scan(*args, **kw):
        from .triton import bdlru_scan_triton
        return bdlru_scan_triton(*args, **kw)

    @staticmethod
    def fused_local(*args, **kw):
        from .triton.local import block_local_triton
        return block_local_triton(*args, **kw)


class GatedCompanionScan(_GatedScan):
    """H-LRU. trans = gate logits (B, T, N, m+1), u = values v (B, T, N); state (B, N, m).

    Rows normalised over m+1 entries: a_{t,1..m} = P[..., :m], a_{t,0} = P[..., m];
    y_t = sum_k a_{t,k} y_{t-k} + a_{t,0} v_t.
    """

    name = "hlru"
    inner = COMPANION

    @staticmethod
    def fused_scan(*args, **kw):
        from .triton import hlru_scan_triton
        return hlru_scan_triton(*args, **kw)

    @staticmethod
    def fused_local(*args, **kw):
        from .triton.local import companion_local_triton
        return companion_local_triton(*args, **kw)
