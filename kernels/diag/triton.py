"""Triton diagonal scan (m = 1 blocks of the block kernels, block/triton.py), and its split phase.

    diag_scan_triton(a, u, h0=None, reverse=False) -> (h, h_last)       a, u (B, T, N)
    diag_local_triton(a, u, reverse, reset) -> LocalScan                 states (B, N), P (B, N)

Importing this module imports triton: on a machine without a GPU set TRITON_INTERPRET=1 first.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..block.triton import BlockTritonLocal, _BlockScanFn
from ..common.scan import LocalGrad, LocalScan, ScanOp, check_diag, check_reset

Tensor = torch.Tensor


def diag_scan_triton(a: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                     chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Triton diagonal scan h_t = a_t * h_{t-1} + u_t (m = 1 blocks), differentiable.

    a, u: (B, T, N)  h0: (B, N) or None  ->  h: (B, T, N), h_last: (B, N).
    (fla's fused_recurrent_hgrn takes log-gates, so it cannot run a signed a_t; this kernel can.)
    """
    check_diag(a, u, h0)
    h, last = _BlockScanFn.apply(a[..., None, None], u[..., None], None if h0 is None else h0[..., None],
                                 bool(reverse), None, 0, chunk)
    return h[..., 0], last[..., 0]


class _DiagLocal(LocalScan):
    """The diagonal split as the block split with m = 1: states (B, N), P (B, N)."""

    def __init__(self, a: Tensor, u: Tensor, reverse: bool, reset: Optional[Tensor], chunk: Optional[int],
                 op: Optional[ScanOp] = None):
        self.op = op
        self.part = BlockTritonLocal(ScanOp(), a[..., None, None], u[..., None], reverse, reset, 0, 1, chunk)
        self.P, self.s = self.part.P[..., 0, 0], self.part.s[..., 0]

    def finish(self, h0):
        h, last = self.part.finish(None if h0 is None else h0[..., None])
        return h[..., 0], last[..., 0]

    def saved(self):
        return self.part.saved()

    def adjoint(self, g_h, saved):
        return _DiagGrad(self, g_h, saved)


class _DiagGrad(LocalGrad):
    def __init__(self, part: _DiagLocal, g_h: Optional[Tensor], saved):
        super().__init__(part.op, part.P)
        self.inner = part.part.adjoint(None if g_h is None else g_h[..., None], saved)
        self.a = self.inner.a[..., 0]

    def h0_grad(self, g_last: Tensor) -> Tensor:
        """a + P g_last: the diagonal map is elementwise."""
        return self.a + self.P * g_last.to(self.a.dtype)

    def finish(self, g_last):
        dA, du, dh0 = self.inner.finish(None if g_last is None else g_last[..., None])
        return dA[..., 0, 0], du[..., 0], None if dh0 is None else dh0[..., 0]


def diag_local_triton(a: Tensor, u: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                      chunk: Optional[int] = None, op: Optional[ScanOp] = None) -> LocalScan:
    """The split diagonal scan: a, u (B, T, N), states (B, N), P (B, N). reset (B, T) bool zeroes a_t.
    op: the calling ScanOp (kept as the part's op; the map's adjoint is elementwise here)."""
    check_diag(a, u, None)
    check_reset(reset, u.shape[0], u.shape[1])
    return _DiagLocal(a, u, reverse, reset, chunk, op)
