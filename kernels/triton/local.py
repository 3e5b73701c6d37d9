"""The split-phase Triton scans (ops.LocalScan / LocalGrad, DESIGN.md §3): the kernels' own two
levels cut where the carry enters, so sequence parallelism pays no extra pass over its slice.

    part = block_local_triton(G, U, reverse, reset, norm)    # pass 1: chunks from zero, P_c, s_c
    part.P, part.s                                           # fold of the chunk maps (no pass)
    h, h_last = part.finish(h0)                              # fold from h0, pass 2 writes h
    grad = part.adjoint(g_h, part.saved())                   # adjoint chunks from zero (carry only)
    grad.a                                                   # fold of their carries (no pass)
    g_G, g_U, g_h0 = grad.finish(g_last)                     # fold from g_last, full adjoint pass

Forward: pass 1 is _block_fwd_kernel / _comp_fwd_kernel with WANT_P over the C chunks of a
Launch; the slice map is P = P_{C-1} ... P_0 (a log-depth product of the chunk maps) and
s = P_{C-1} init_{C-1} + s_{C-1} with init the chunks' carries folded from zero. Only the fold from
h0 and pass 2 wait for the carry; with one chunk (the interpreter, long rows on the GPU) pass 1 is
the whole slice's carry pass and finish is pass 2 from h0.
Backward: the carry-only adjoint pass from zero gives each chunk's local adjoint carry; folded
from zero they give a = dL/dh0 for dL/dh_last = 0; finish folds them from g_last and runs the
full adjoint pass (gradients of every input), whose last carry is dL/dh0.
reset: per-step cuts (B, T) bool (zeroes A_t, ops.transition_mask of document starts), as the
kernels take them; the cut steps get no transition gradient, like the mask they stand for.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import acc_dtype, check_block, check_companion, check_diag, check_reset
from ..chunked import block_product_tree
from ..gates import check_bdlru, check_hlru
from ..ops import BLOCK, COMPANION, DIAG, LocalGrad, LocalScan, ScanOp
from ._common import norm_code, scan_order_last_cut
from .block import Launch, _block_bwd_kernel, _block_fwd_kernel, _device, _fold_backward, _fold_forward, scan_meta
from .companion import _comp_bwd_kernel, _comp_fwd_kernel

Tensor = torch.Tensor


class TritonLocal(LocalScan):
    """The split block (companion=False) or companion scan on the Triton kernels (module doc).

    Block: G = A (B, T, N, m, m) or gate logits (B, T, N, m, m + 1) with a norm, U = u / v
    (B, T, N, m), h (B, T, N, m). Companion: G = a (B, T, N, m) or logits (B, T, N, m + 1),
    U = x / v (B, T, N), y (B, T, N). State (B, N, m); P (B, N, m, m), s (B, N, m).
    """

    def __init__(self, op: ScanOp, G: Tensor, U: Tensor, reverse: bool, reset: Optional[Tensor], NORM: int,
                 M: int, companion: bool, chunk: Optional[int] = None):
        self.op, self.reverse, self.companion, self.M = op, bool(reverse), companion, M
        B, T, N = U.shape[:3]
        W = M + 1 if NORM else M
        self.shape, R = (B, T, N), B * N
        self.dt, self.h0_dtype = acc_dtype(G, U), None
        self.lc = lc = Launch(M, R, T, G.device, chunk, companion=companion)
        self.G, self.U = G.detach().contiguous(), U.detach().contiguous()
        self.reset = reset
        self.rst = reset.to(torch.int8).contiguous() if reset is not None else None
        self.common = dict(scan_meta(M, W, NORM, reverse, reset is not None, self.dt, lc), **lc.opts)
        C = lc.C
        # pass 1: every chunk from zero, its map P_c and its end state s_c
        self.Pc = self.U.new_empty(B, C, N, M, M, dtype=self.dt)
        self.sc = self.U.new_empty(B, C, N, M, dtype=self.dt)
        zero = self.U.new_zeros(B, C, N, M, dtype=self.dt)
        self._fwd(zero, self.sc, self.sc, self.Pc, store=False, want_p=True)
        if C == 1:
            self.init0 = None
            self.P, self.s = self.Pc[:, 0], self.sc[:, 0]
        else:
            self.init0 = _fold_forward(self.Pc, self.sc, zero[:, 0]).contiguous()
            self.P = block_product_tree(self.Pc)
            self.s = torch.einsum("bnij,bnj->bni", self.Pc[:, C - 1], self.init0[:, C - 1]) + self.sc[:, C - 1]
        self._saved = None

    def _fwd(self, init, out, last, prod, store: bool, want_p: bool):
        lc = self.lc
        B, T, N = self.shape
        kernel = _comp_fwd_kernel if self.companion else _block_fwd_kernel
        flag = {"STORE_Y" if self.companion else "STORE_H": store}
        rst = self.U if self.rst is None else self.rst  # no reset: any pointer, never read
        with _device(self.G):
            kernel[lc.grid(self.M, want_p)](self.G, self.U, init, out, last, prod, rst, T, N, B * N, lc.L,
                                            lc.C, WANT_P=want_p, NCOL=lc.NCOL if want_p else 1, **flag,
                                            **self.common)

    def finish(self, h0):
        B, T, N = self.shape
        M, C = self.M, self.lc.C
        self.h0_dtype = None if h0 is None else h0.dtype
        h0c = None if h0 is None else h0.to(self.dt).contiguous()
        if C == 1:
            init = (self.U.new_zeros(B, N, M, dtype=self.dt) if h0c is None else h0c)[:, None]
        else:
            init = self.init0 if h0c is None else _fold_forward(self.Pc, self.sc, h0c).contiguous()
        h = self.U.new_empty(*((B, T, N) if self.companion else (B, T, N, M)), dtype=self.dt)
        last = self.U.new_empty(B, C, N, M, dtype=self.dt)
        self._fwd(init, h, last, h, store=True, want_p=False)
        self._saved = (self.G, self.U, h0c, h, self.Pc if C > 1 else None)
        self.G = self.U = self.Pc = self.sc = self.init0 = None
        return h, last[:, C - 1]

    def saved(self):
        out, self._saved = self._saved, None
        return out

    def adjoint(self, g_h, saved):
        return _TritonGrad(self, g_h, *saved)


class _TritonGrad(LocalGrad):
    def __init__(self, part: TritonLocal, g_h: Optional[Tensor], G: Tensor, U: Tensor, h0c: Optional[Tensor],
                 h: Tensor, Pc: Optional[Tensor]):
        super().__init__(part.op, part.P)
        self.part, self.G, self.U, self.h0c, self.h, self.Pc = part, G, U, h0c, h, Pc
        B, T, N = part.shape
        self.dh = torch.zeros_like(h) if g_h is None else g_h.to(part.dt).contiguous()
        self.rst = U if part.rst is None else part.rst  # no reset: any pointer, never read
        # the companion backward rebuilds its state window from y, cut at the last reset
        self.lr = (scan_order_last_cut(part.reset, part.reverse) if part.companion and part.reset is not None
                   else self.rst)
        zero = U.new_zeros(B, part.lc.C, N, part.M, dtype=part.dt)
        self.local = torch.empty_like(zero)
        self._bwd(zero, G, U, self.local, carry_only=True)  # G, U: unwritten, the dtypes of dG, dU
        if Pc is None:
            self.lamin0 = zero
            self.a = self.local[:, 0]
        else:
            self.lamin0 = _fold_backward(Pc, self.local, zero[:, 0]).contiguous()
            self.a = torch.einsum("bnji,bnj->bni", Pc[:, 0], self.lamin0[:, 0]) + self.local[:, 0]

    def _bwd(self, lamin, dG, dU, lamout, carry_only: bool):
        part, lc = self.part, self.part.lc
        B, T, N = part.shape
        h0 = self.h0c if self.h0c is not None else self.U
        flags = dict(HAS_H0=self.h0c is not None, CARRY_ONLY=carry_only, **part.common)
        grid = lc.grid(part.M, False)
        with _device(self.G):
            if part.companion:
                _comp_bwd_kernel[grid](self.G, self.U, self.h, h0, self.lr, self.dh, lamin, dG, dU, lamout, self.rst,
                                       T, N, B * N, lc.L, lc.C, **flags)
            else:
                _block_bwd_kernel[grid](self.G, self.U, self.h, h0, self.dh, lamin, dG, dU, lamout, self.rst,
                                        T, N, B * N, lc.L, lc.C, **flags)

    def finish(self, g_last):
        part = self.part
        if g_last is None:
            lamin = self.lamin0
        elif self.Pc is None:
            lamin = g_last.to(part.dt)[:, None].contiguous()
        else:
            lamin = _fold_backward(self.Pc, self.local, g_last.to(part.dt).contiguous()).contiguous()
        dG, dU = torch.empty_like(self.G), torch.empty_like(self.U)
        lamout = torch.empty_like(self.local)
        self._bwd(lamin, dG, dU, lamout, carry_only=False)
        g_h0 = None if part.h0_dtype is None else lamout[:, 0].to(part.h0_dtype)
        self.G = self.U = self.h = self.h0c = self.Pc = self.dh = self.local = self.lamin0 = self.rst = self.lr = None
        return dG, dU, g_h0


class _DiagLocal(LocalScan):
    """The diagonal split as the block split with m = 1: states (B, N), P (B, N)."""

    def __init__(self, a: Tensor, u: Tensor, reverse: bool, reset: Optional[Tensor], chunk: Optional[int]):
        self.part = TritonLocal(DIAG, a[..., None, None], u[..., None], reverse, reset, 0, 1, False, chunk)
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
        super().__init__(DIAG, part.P)
        self.inner = part.part.adjoint(None if g_h is None else g_h[..., None], saved)
        self.a = self.inner.a[..., 0]

    def finish(self, g_last):
        dA, du, dh0 = self.inner.finish(None if g_last is None else g_last[..., None])
        return dA[..., 0, 0], du[..., 0], None if dh0 is None else dh0[..., 0]


def block_local_triton(G: Tensor, U: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                       norm: Optional[str] = None, op: Optional[ScanOp] = None,
                       chunk: Optional[int] = None) -> LocalScan:
    """The split block scan (ops.LocalScan). norm=None: G = A (B, T, N, m, m), U = u (B, T, N, m);
    else G = gate logits (B, T, N, m, m + 1), U = v (the fused BD-LRU). reset (B, T) bool zeroes A_t.
    op: the ScanOp whose apply_t serves LocalGrad.h0_grad (BLOCK by default); chunk: steps per
    chunk (None: automatic on CUDA, one chunk elsewhere)."""
    NORM = norm_code(norm)
    if NORM:
        check_bdlru(G, U, None, reset)
    else:
        check_block(G, U, None)
        check_reset(reset, U.shape[0], U.shape[1])
    return TritonLocal(op or BLOCK, G, U, reverse, reset, NORM, U.shape[-1], False, chunk)


def diag_local_triton(a: Tensor, u: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                      chunk: Optional[int] = None) -> LocalScan:
    """The split diagonal scan: a, u (B, T, N), states (B, N), P (B, N). reset (B, T) bool zeroes a_t."""
    check_diag(a, u, None)
    check_reset(reset, u.shape[0], u.shape[1])
    return _DiagLocal(a, u, reverse, reset, chunk)


def companion_local_triton(G: Tensor, X: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                           norm: Optional[str] = None, op: Optional[ScanOp] = None,
                           chunk: Optional[int] = None) -> LocalScan:
    """The split companion scan. norm=None: G = a (B, T, N, m), X = x (B, T, N); else G = logits
    (B, T, N, m + 1), X = v (the fused H-LRU). reset (B, T) bool cuts; op, chunk as block_local_triton."""
    NORM = norm_code(norm)
    if NORM:
        check_hlru(G, X, None, reset)
    else:
        check_companion(G, X, None, reset)
    M = G.shape[-1] - 1 if NORM else G.shape[-1]
    return TritonLocal(op or COMPANION, G, X, reverse, reset, NORM, M, True, chunk)
