"""The block scan h_t[n] = A_t[n] h_{t-1}[n] + u_t[n] (DESIGN.md §3) and BD-LRU's gated form of it:
the ops a mixer holds (`BLOCK`, `GatedBlockScan`), the public functions, and the chunked PyTorch
path that runs them on CPU (or any device); the Triton kernels are in triton.py (CUDA), the
sequential reference in reference.py.

    block_scan(A, u, h0=None, reverse=False) -> (h, h_last)
      A: (B, T, N, m, m)  u: (B, T, N, m)  h0: (B, N, m) or None  ->  h: (B, T, N, m), h_last: (B, N, m)

The chunked path (common.scan's chunk layout): every chunk is scanned from a zero state at once,
carrying along its cumulative transition X_t = A_t X_{t-1} + [0 | u_t] with X = [Pcum | local];
a short loop over chunks folds the carries; wide ops correct every state. A scan of length T costs
about C + T / C Python-level steps instead of T (C ~ sqrt(T)), at the price of m x m products per
step. The backward of h_t = A_t h_{t-1} + u_t is the same scan run the other way with shifted,
transposed transitions (g_t = dL/dh_t + A_{t+1}^T g_{t+1}), so the autograd.Function saves only its
inputs and outputs, never a per-step graph. Pass 1 is its own step (_BlockPass: the chunks from
zero, then `slice_map()` and `finish(h0)`), so the scan also splits natively into the two halves of
the split phase (BlockLocal, `BLOCK.local(...)` on this path).

GatedBlockScan (BD-LRU): gate logits (B, T, N, m, m+1) in; rows normalised over m+1 entries,
A_t = P[..., :m], u_t = P[..., m] * v_t; on CUDA the fused Triton kernel does it in registers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..common.scan import (GatedScan, LocalGrad, ScanOp, TwoPassScan, _carries, _chunk, _keep_steps, _local_map,
                           _map_of_ends, _mask, _orders, _Split, _unchunk, acc_dtype, block_product_tree, check_block,
                           default_chunk, resolve_backend, transition_mask)
from .reference import block_product_ref, block_scan_ref

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# The chunked PyTorch path (common.scan's chunk layout)

# From this block size on a batched matmul beats m elementwise multiply-adds per step (measured
# on CPU by bench/scan_cpu.py's sizes: 2x slower at m = 8 and 16, 2x faster at m <= 6).
_BMM_FROM = 8


class _BlockPass:
    """Pass 1 of a chunked block scan, without autograd: every chunk from a zero state, carrying its
    cumulative transition, X_t = A_t X_{t-1} + [0 | u_t] with X = [Pcum | local]. Then
    `slice_map()` -> the slice's (P, s), and `finish(h0)` -> h (B, T, N, m) (once: it writes into
    the pass's buffer, so take the map first).

    Step t uses A[:, t + shift] (transposed if asked; identity where out of range). Below _BMM_FROM
    a struct-of-arrays layout, the B*nc*N blocks along the last (contiguous) axes, so a step is m
    wide elementwise multiply-adds (on CPU several times faster than a batched matmul of tiny
    matrices); from it an array of structs and one batched matmul per step.
    """

    def __init__(self, A: Tensor, u: Tensor, reverse: bool, C: int, dt: torch.dtype, shift: int = 0,
                 transpose: bool = False):
        B, T, N, m = u.shape
        nc = -(-T // C)
        self.T, self.m, self.nc, self.bmm = T, m, nc, m >= _BMM_FROM
        steps, self.chunks = _orders(C, nc, reverse)
        eye = torch.eye(m, dtype=dt, device=u.device)
        if self.bmm:
            M = B * nc * N
            Ac = _chunk(A, C, nc, eye, dt, shift)
            if transpose:  # a transposed view: BLAS reads it as such, no copy
                Ac = Ac.transpose(-1, -2)
            uc = _chunk(u, C, nc, 0.0, dt)
            X = torch.empty((C, B, nc, N, m, m + 1), dtype=dt, device=u.device)
            X[steps[0], ..., :m] = Ac[steps[0]]
            X[steps[0], ..., m] = uc[steps[0]]
            Xf, Af, uf = X.view(C, M, m, m + 1), Ac.reshape(C, M, m, m), uc.view(C, M, m)
            for prev, t in zip(steps[:-1], steps[1:]):
                torch.bmm(Af[t], Xf[prev], out=Xf[t])
                Xf[t, :, :, m].add_(uf[t])
            self.end = X[steps[-1]].permute(3, 4, 0, 1, 2)  # (m, m+1, B, nc, N)
        else:
            As = torch.empty((C, m, m, B, nc, N), dtype=dt, device=u.device)
            _chunk(A, C, nc, eye, dt, shift, out=As.permute(0, 3, 4, 5, 1, 2))
            if transpose:
                As = As.transpose(1, 2)
            us = torch.empty((C, m, B, nc, N), dtype=dt, device=u.device)
            _chunk(u, C, nc, 0.0, dt, out=us.permute(0, 2, 3, 4, 1))
            X = torch.empty((C, m, m + 1, B, nc, N), dtype=dt, device=u.device)
            X[steps[0], :, :m] = As[steps[0]]
            X[steps[0], :, m] = us[steps[0]]
            for prev, t in zip(steps[:-1], steps[1:]):
                Xt, Xp, At = X[t], X[prev], As[t]
                torch.mul(At[:, 0, None], Xp[0, None], out=Xt)
                for k in range(1, m):
                    Xt.addcmul_(At[:, k, None], Xp[k, None])
                Xt[:, m].add_(us[t])
            self.end = X[steps[-1]]
        self.X = X

    def slice_map(self) -> Tuple[Tensor, Tensor]:
        return _map_of_ends(self.end, self.chunks)

    def finish(self, h0: Optional[Tensor]) -> Tensor:
        X, end, m, T = self.X, self.end, self.m, self.T
        self.X = self.end = None
        if self.bmm:
            if self.nc == 1 and h0 is None:
                return _unchunk(X[..., m], T)
            hin = _carries(end, h0, self.chunks)  # (m, B, nc, N)
            h = torch.matmul(X[..., :m], hin.permute(1, 2, 3, 0)[..., None]).squeeze(-1).add_(X[..., m])
            return _unchunk(h, T)
        h = X[:, :, m]
        if self.nc > 1 or h0 is not None:
            hin = _carries(end, h0, self.chunks)
            for k in range(m):  # h_t = local_t + Pcum_t h_in
                h.addcmul_(X[:, :, k], hin[k])
        return _unchunk(h.permute(0, 2, 3, 4, 1), T)


def _block_core(A: Tensor, u: Tensor, h0: Optional[Tensor], reverse: bool, C: int, shift: int = 0,
                transpose: bool = False) -> Tensor:
    """Chunked block scan without autograd: h (B, T, N, m) in the accumulation dtype (see _BlockPass)."""
    return _BlockPass(A, u, reverse, C, acc_dtype(A, u, h0), shift, transpose).finish(h0)


def _block_adjoint(A: Tensor, gh: Tensor, rev: bool, C: int) -> _BlockPass:
    """Pass 1 of the backward scan g_t = dL/dh_t + A_{t+1}^T g_{t+1} (reverse: A_{t-1}^T g_{t-1}),
    whose initial state is dL/dh_last and whose last state is g at the slice's first step."""
    return _BlockPass(A, gh, not rev, C, acc_dtype(A, gh), shift=-1 if rev else 1, transpose=True)


def _block_grads(A: Tensor, h0: Optional[Tensor], h: Tensor, g: Tensor, rev: bool,
                 need_A: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(dA, dh0) from the states h and the adjoint g (dA in g's dtype; None where not asked)."""
    first = -1 if rev else 0
    dA = dh0 = None
    if need_A:
        dA = torch.empty(A.shape, dtype=g.dtype, device=g.device)
        inner, outer = (slice(0, -1), slice(1, None)) if rev else (slice(1, None), slice(0, -1))
        torch.mul(g[:, inner, ..., :, None], h[:, outer, ..., None, :], out=dA[:, inner])
        if h0 is None:
            dA[:, first] = 0
        else:
            torch.mul(g[:, first, ..., :, None], h0.to(g.dtype)[..., None, :], out=dA[:, first])
    if h0 is not None:
        dh0 = torch.einsum("bnji,bnj->bni", A[:, first].to(g.dtype), g[:, first])
    return dA, dh0


class _BlockScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, u, h0, reverse, C):
        h = _block_core(A, u, h0, reverse, C)
        ctx.save_for_backward(A, h0, h)
        ctx.reverse, ctx.C, ctx.u_dtype = reverse, C, u.dtype
        return h, h[:, 0 if reverse else -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, gh, glast):
        A, h0, h = ctx.saved_tensors
        g = _block_adjoint(A, gh, ctx.reverse, ctx.C).finish(glast)
        dA, dh0 = _block_grads(A, h0, h, g, ctx.reverse, ctx.needs_input_grad[0])
        dA = None if dA is None else dA.to(A.dtype)
        dh0 = dh0.to(h0.dtype) if h0 is not None and ctx.needs_input_grad[2] else None
        du = g.to(ctx.u_dtype) if ctx.needs_input_grad[1] else None
        return dA, du, dh0, None, None


def block_scan_chunked(A: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                       chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """h_t[n] = A_t[n] h_{t-1}[n] + u_t[n] (reverse: h_{t+1}), chunked; same contract as block_scan_ref.

    A: (B, T, N, m, m)  u: (B, T, N, m)  h0: (B, N, m) or None -> h (B, T, N, m), h_last (B, N, m).
    chunk: steps per chunk (default ~sqrt(T)).
    """
    check_block(A, u, h0)
    T = u.shape[1]
    return _BlockScanFn.apply(A, u, h0, reverse, min(chunk or default_chunk(T), T))


class BlockLocal(_Split):
    """The split block scan (common.scan.LocalScan): pass 1 in the constructor, the fold and the correction
    in finish; the backward the same way on the adjoint scan. A: (B, T, N, m, m), u: (B, T, N, m),
    reset: document starts (B, T) or None (masked as BLOCK does)."""

    def __init__(self, A: Tensor, u: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                 chunk: Optional[int] = None):
        check_block(A, u, None)
        super().__init__(A, u, reverse, chunk)
        self.cut = transition_mask(reset, reverse)
        self.A = _mask(A, reset, reverse)
        self._pass = _BlockPass(self.A, u, reverse, self.C, self.dt)
        self.P, self.s = self._pass.slice_map()

    def finish(self, h0):
        h0 = self._h0(h0)
        h = self._pass.finish(h0)
        self._pass, self._saved, self.A = None, (self.A, h0, h), None
        return h, h[:, 0 if self.reverse else -1].clone()

    def adjoint(self, g_h, saved):
        return _BlockGrad(self, g_h, *saved)


class _BlockGrad(LocalGrad):
    def __init__(self, part: BlockLocal, g_h: Optional[Tensor], A: Tensor, h0: Optional[Tensor], h: Tensor):
        super().__init__(BLOCK, part.P)
        self.part, self.A, self.h0, self.h = part, A, h0, h
        self._pass = _block_adjoint(A, torch.zeros_like(h) if g_h is None else g_h, part.reverse, part.C)
        _, g_first = self._pass.slice_map()  # g at the first step when dL/dh_last = 0
        A_first = A[:, -1 if part.reverse else 0]
        self.a = torch.einsum("bnji,bnj->bni", A_first.to(g_first.dtype), g_first)

    def finish(self, g_last):
        g = self._pass.finish(g_last)
        dA, dh0 = _block_grads(self.A, self.h0, self.h, g, self.part.reverse, True)
        keep = _keep_steps(self.part.cut, dA)
        out = self.part._grads(dA if keep is None else dA * keep, g, dh0)
        self._pass = self.A = self.h0 = self.h = None
        return out


# ----------------------------------------------------------------------------------------------
# The op

def block_scan(A: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
               backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """h_t = A_t h_{t-1} + u_t per block (reverse: h_t = A_t h_{t+1} + u_t); see module doc.
    backend: "ref", "torch", "triton" or "auto"; None: resolve_backend's rules."""
    backend = resolve_backend("block", A, u, h0, backend=backend)
    if backend == "ref":
        return block_scan_ref(A, u, h0, reverse)
    if backend == "triton":
        from .triton import block_scan_triton
        return block_scan_triton(A, u, h0, reverse)
    return block_scan_chunked(A, u, h0, reverse)


def block_product(A: Tensor, reverse: bool = False, backend: Optional[str] = None) -> Tensor:
    """State map of a whole slice: A_T ... A_1 (reverse: A_1 ... A_T). (B, T, N, m, m) -> (B, N, m, m).

    Every backend but "ref" uses the log-depth tree (plain PyTorch, so it runs on any device).
    """
    if resolve_backend("block_product", A, backend=backend) == "ref":
        return block_product_ref(A, reverse)
    return block_product_tree(A, reverse)


class BlockScan(ScanOp):
    """trans = A: (B, T, N, m, m), u: (B, T, N, m), state (B, N, m)."""

    name = "block"

    def __call__(self, A, u, h0=None, reverse=False, reset=None):
        return block_scan(_mask(A, reset, reverse), u, h0, reverse, self.backend)

    def product(self, A, reverse=False, reset=None):
        return block_product(_mask(A, reset, reverse), reverse, self.backend)

    def local(self, A, u, reverse=False, reset=None):
        backend = resolve_backend(self.name, A, u, backend=self.backend)
        if backend == "torch":
            return BlockLocal(A, u, reverse, reset)
        if backend == "triton":
            from .triton import block_local_triton
            return block_local_triton(A, u, reverse, transition_mask(reset, reverse), op=self)
        return TwoPassScan(self, A, u, reverse, reset)

    def carry(self, A, u, reverse=False, reset=None):
        native = resolve_backend(self.name, A, u, backend=self.backend) != "ref"  # the reference does not split
        return _local_map(self, A, u, reverse, reset) if native else super().carry(A, u, reverse, reset)


BLOCK = BlockScan()


class GatedBlockScan(GatedScan):
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
        from .triton import block_local_triton
        return block_local_triton(*args, **kw)
