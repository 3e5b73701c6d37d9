"""Fast pure-PyTorch scans (CPU, or any device): a chunked two-level form with lean backwards.

Same contract as `reference.py` (h0, h_last, reverse; companion `reset`; outputs in the
accumulation dtype). The sequence is cut into chunks of C steps (the last one padded):

1. every chunk is scanned from a zero state at once (a few wide ops per step, all chunks together),
   carrying along the cumulative transition of the chunk: X_t = A_t X_{t-1} + [0 | u_t] with
   X = [Pcum | local];
2. a short loop over chunks folds the carries: h_in(c+1) = P(c) h_in(c) + s(c);
3. wide ops correct every state: h_t = local_t + Pcum_t h_in(chunk of t).

A scan of length T costs about C + T / C Python-level steps instead of T (C ~ sqrt(T)), at the
price of m x m products per step (m + 1 times the work of the sequential matrix-vector loop).
Plain PyTorch, so it runs on any device; on CUDA the Triton kernels are the fast path.
The backward of h_t = A_t h_{t-1} + u_t is the same scan run the other way with shifted,
transposed transitions (g_t = dL/dh_t + A_{t+1}^T g_{t+1}), so every autograd.Function here saves
only its inputs and outputs, never a per-step graph.

Each pass 1 is its own step (_BlockPass, _DiagPass, _HistPass: the chunks from zero, then
`slice_map()` and `finish(h0)`), so the three scans also split natively into the two explicit
halves of ops.LocalScan (BlockLocal, DiagLocal, CompanionLocal): `op.local(...)` on this path.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .checks import MAX_BLOCK_SIZE, acc_dtype, check_block, check_companion, check_diag, check_tensor
from .ops import BLOCK, COMPANION, DIAG, LocalGrad, LocalScan, _mask, transition_mask

Tensor = torch.Tensor


def default_chunk(T: int) -> int:
    """Steps per chunk: ~sqrt(T) balances the in-chunk loop against the loop over chunks; a divisor
    of T within a factor 2 of it when there is one (no padding, and the diag scan reads in place)."""
    c = max(1, min(T, int(math.ceil(math.sqrt(T)))))
    for d in sorted(range(max(1, c // 2), min(T, 2 * c) + 1), key=lambda d: abs(d - c)):
        if T % d == 0:
            return d
    return c


# ----------------------------------------------------------------------------------------------
# Chunk layout: (B, T, *r) <-> (C, B, nc, *r), time-major inside a chunk so that the step-t slice
# of every chunk is one contiguous tensor. One copy each way, padding and shifts folded in.

def _segments(a: int, b: int, C: int) -> Iterator[Tuple[int, int, Optional[int], int]]:
    """Split positions [a, b) into runs (p, chunk, i, n): a run of n whole chunks (i None) or
    n positions i.. inside one chunk."""
    p = a
    while p < b:
        c, i = divmod(p, C)
        if i == 0 and b - p >= C:
            k = (b - p) // C
            yield p, c, None, k
            p += k * C
        else:
            n = min(C - i, b - p)
            yield p, c, i, n
            p += n


def _put(v: Tensor, a: int, b: int, C: int, src) -> None:
    """v: (B, nc, C, *r) view of a chunk buffer; write positions [a, b) from src (B, b-a, *r) or a fill."""
    for p, c, i, n in _segments(a, b, C):
        if isinstance(src, Tensor) and src.dim() == v.dim() - 1:
            s = src[:, p - a:p - a + (n * C if i is None else n)]
            if i is None:
                v[:, c:c + n] = s.unflatten(1, (n, C))
            else:
                v[:, c, i:i + n] = s
        elif i is None:
            v[:, c:c + n] = src
        else:
            v[:, c, i:i + n] = src


def _chunk(x: Tensor, C: int, nc: int, fill, dtype: torch.dtype, shift: int = 0,
           out: Optional[Tensor] = None) -> Tensor:
    """x (B, Tx, *r) -> (C, B, nc, *r): position p = c*C + i holds x[:, p + shift], `fill` outside."""
    B, Tx = x.shape[:2]
    if out is None:
        out = torch.empty((C, B, nc) + tuple(x.shape[2:]), dtype=dtype, device=x.device)
    v = out.movedim(0, 2)
    Tp = nc * C
    # Positions past the sequence are padding even where a shift reaches back into it (a padded
    # chunk's end state is then the slice's last state, which the slice maps rely on).
    lo = max(0, -shift)
    hi = max(lo, min(Tp, Tx, Tx - shift))
    if not isinstance(fill, Tensor):
        fill = torch.tensor(fill, dtype=dtype, device=x.device)
    _put(v, 0, lo, C, fill)
    _put(v, hi, Tp, C, fill)
    _put(v, lo, hi, C, x[:, lo + shift:hi + shift])
    return out


def _unchunk(xc: Tensor, T: int) -> Tensor:
    """(C, B, nc, *r) -> (B, T, *r) (drops the padding)."""
    C, B = xc.shape[:2]
    v = xc.movedim(0, 2)
    out = xc.new_empty((B, T) + tuple(xc.shape[3:]))
    for p, c, i, n in _segments(0, T, C):
        if i is None:
            out[:, p:p + n * C].unflatten(1, (n, C)).copy_(v[:, c:c + n])
        else:
            out[:, p:p + n].copy_(v[:, c, i:i + n])
    return out


def _orders(C: int, nc: int, reverse: bool):
    steps = range(C - 1, -1, -1) if reverse else range(C)
    chunks = range(nc - 1, -1, -1) if reverse else range(nc)
    return list(steps), list(chunks)


# ----------------------------------------------------------------------------------------------
# Chunk maps [P | s]: the state after a chunk (or a slice) is P h_in + s.

def _fold_maps(E: Tensor, chunks) -> Tensor:
    """E: (nc, R, m, m+1) chunk maps [P | s] -> the whole slice's [P | s] (R, m, m+1), along `chunks`."""
    Y = E[chunks[0]].clone()
    m = Y.shape[-2]
    for c in chunks[1:]:
        Y = torch.bmm(E[c, :, :, :m], Y)
        Y[:, :, m].add_(E[c, :, :, m])
    return Y


def _map_of_ends(end: Tensor, chunks) -> Tuple[Tensor, Tensor]:
    """end: (m, m+1, B, nc, N) chunk maps [P | s] -> the slice's (P (B, N, m, m), s (B, N, m))."""
    m, _, B, nc, N = end.shape
    Y = _fold_maps(end.permute(3, 2, 4, 0, 1).reshape(nc, B * N, m, m + 1), chunks).view(B, N, m, m + 1)
    return Y[..., :m], Y[..., m]


def _carries(end: Tensor, h0: Optional[Tensor], chunks) -> Tensor:
    """Fold the chunk maps: h_in(next) = P h_in + s along `chunks` (scan order).

    end: (m, m+1, B, nc, N) = [P | s] of every chunk, h0: (B, N, m) or None -> h_in (m, B, nc, N).
    """
    m, _, B, nc, N = end.shape
    E = end.permute(3, 2, 4, 0, 1).reshape(nc, B * N, m, m + 1)  # small: one matrix per chunk
    hin = torch.zeros((nc, B * N, m, 1), dtype=end.dtype, device=end.device)
    if h0 is not None:
        hin[chunks[0], :, :, 0] = h0.reshape(B * N, m)
    for c0, c in zip(chunks[:-1], chunks[1:]):
        torch.baddbmm(E[c0, :, :, m:], E[c0, :, :, :m], hin[c0], out=hin[c])
    return hin.view(nc, B, N, m).permute(3, 1, 0, 2)


# ----------------------------------------------------------------------------------------------
# Block scan

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


def _keep_steps(cut: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """(B, T) cuts -> a 0/1 factor broadcasting over x (B, T, ...): the mask's own backward."""
    if cut is None:
        return None
    return (~cut).to(x.dtype).reshape(*cut.shape, *([1] * (x.dim() - 2)))


class _Split(LocalScan):
    """What the three split scans share: dtypes, the saved tensors' hand-over, the last state."""

    def __init__(self, trans: Tensor, u: Tensor, reverse: bool, chunk: Optional[int]):
        T = u.shape[1]
        self.C, self.reverse = min(chunk or default_chunk(T), T), reverse
        self.dt, self.dtypes, self.h0_dtype = acc_dtype(trans, u), (trans.dtype, u.dtype), None
        self._saved = None

    def _h0(self, h0: Optional[Tensor]) -> Optional[Tensor]:
        self.h0_dtype = None if h0 is None else h0.dtype
        return None if h0 is None else h0.to(self.dt)

    def saved(self):
        out, self._saved = self._saved, None
        return out

    def _grads(self, d_trans: Tensor, d_u: Tensor, d_h0: Optional[Tensor]):
        return (d_trans.to(self.dtypes[0]), d_u.to(self.dtypes[1]),
                None if self.h0_dtype is None else d_h0.to(self.h0_dtype))


class BlockLocal(_Split):
    """The split block scan (ops.LocalScan): pass 1 in the constructor, the fold and the correction
    in finish; the backward the same way on the adjoint scan. A: (B, T, N, m, m), u: (B, T, N, m),
    reset: document starts (B, T) or None (masked as ops.BLOCK does)."""

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
# Diagonal scan (m = 1): the same three phases, elementwise.

def _chunk_or_view(x: Tensor, C: int, nc: int, fill, dtype: torch.dtype, shift: int = 0) -> Tensor:
    """_chunk, or a view of x when no padding, shift or cast is needed (elementwise steps read it
    strided as well as contiguous)."""
    if shift == 0 and x.shape[1] == nc * C and x.dtype == dtype:
        return x.unflatten(1, (nc, C)).movedim(2, 0)
    return _chunk(x, C, nc, fill, dtype, shift)


def _diag_fold(P: Tensor, s: Tensor, chunks) -> Tuple[Tensor, Tensor]:
    """Chunk maps P, s (B, nc, N) -> the slice's (P, s) (B, N), folded along `chunks`."""
    Pt, st = P[:, chunks[0]].clone(), s[:, chunks[0]].clone()
    for c in chunks[1:]:
        st = torch.addcmul(s[:, c], P[:, c], st)
        Pt.mul_(P[:, c])
    return Pt, st


class _DiagPass:
    """Chunked h_t = a_t h_{t-1} + u_t without autograd; step t uses a[:, t + shift] (1 outside).

    Scalars need no cumulative products per step (memory traffic is the cost here): pass 1 keeps
    only each chunk's end state from zero, the chunk transition is one `prod`, and after the carries
    pass 2 rescans every chunk from its carry, writing the states straight into the output.
    Pass 1 runs when the map or the carries need it (not for one chunk from zero).
    """

    def __init__(self, a: Tensor, u: Tensor, reverse: bool, C: int, dt: torch.dtype, shift: int = 0):
        B, T, N = u.shape
        self.T, self.C, self.nc = T, C, -(-T // C)
        self.ac = _chunk_or_view(a, C, self.nc, 1.0, dt, shift)  # (C, B, nc, N)
        self.uc = _chunk_or_view(u, C, self.nc, 0.0, dt)
        self.steps, self.chunks = _orders(C, self.nc, reverse)
        self.ends: Optional[Tuple[Tensor, Tensor]] = None

    def _pass1(self) -> Tuple[Tensor, Tensor]:
        if self.ends is None:
            ac, uc, steps = self.ac, self.uc, self.steps
            s, spare = uc[steps[0]].clone(), torch.empty_like(uc[0])
            for t in steps[1:]:
                torch.addcmul(uc[t], ac[t], s, out=spare)
                s, spare = spare, s
            self.ends = (ac.prod(0), s)  # (B, nc, N) each; the product is exact with zeros (no division)
        return self.ends

    def slice_map(self) -> Tuple[Tensor, Tensor]:
        return _diag_fold(*self._pass1(), self.chunks)

    def finish(self, h0: Optional[Tensor]) -> Tensor:
        ac, uc, steps, chunks, nc, C = self.ac, self.uc, self.steps, self.chunks, self.nc, self.C
        B, _, N = uc.shape[1:]
        h = None
        if nc > 1 or h0 is not None:
            P, s = self._pass1()
            hin = torch.zeros((nc, B, N), dtype=uc.dtype, device=uc.device)
            if h0 is not None:
                hin[chunks[0]] = h0
            for c0, c in zip(chunks[:-1], chunks[1:]):
                torch.addcmul(s[:, c0], P[:, c0], hin[c0], out=hin[c])
            h = hin.transpose(0, 1)
        out = torch.empty((B, nc, C, N), dtype=uc.dtype, device=uc.device)
        first = steps[0]
        if h is None:
            out[:, :, first] = uc[first]
        else:
            torch.addcmul(uc[first], ac[first], h, out=out[:, :, first])
        for prev, t in zip(steps[:-1], steps[1:]):
            torch.addcmul(uc[t], ac[t], out[:, :, prev], out=out[:, :, t])
        self.ac = self.uc = self.ends = None
        out = out.view(B, nc * C, N)
        return out if nc * C == self.T else out[:, :self.T].contiguous()


def _diag_core(a: Tensor, u: Tensor, h0: Optional[Tensor], reverse: bool, C: int, shift: int = 0) -> Tensor:
    return _DiagPass(a, u, reverse, C, acc_dtype(a, u, h0), shift).finish(h0)


def _diag_adjoint(a: Tensor, gh: Tensor, rev: bool, C: int) -> _DiagPass:
    """Pass 1 of the backward scan g_t = dL/dh_t + a_{t+1} g_{t+1} (see _block_adjoint)."""
    return _DiagPass(a, gh, not rev, C, acc_dtype(a, gh), shift=-1 if rev else 1)


def _diag_grads(a: Tensor, h0: Optional[Tensor], h: Tensor, g: Tensor, rev: bool, need_a: bool):
    """(da, dh0) from the states h and the adjoint g (in g's dtype; None where not asked)."""
    first = -1 if rev else 0
    da = dh0 = None
    if need_a:
        da = torch.empty(a.shape, dtype=g.dtype, device=g.device)
        inner, outer = (slice(0, -1), slice(1, None)) if rev else (slice(1, None), slice(0, -1))
        torch.mul(g[:, inner], h[:, outer], out=da[:, inner])
        da[:, first] = 0 if h0 is None else g[:, first] * h0
    if h0 is not None:
        dh0 = a[:, first] * g[:, first]
    return da, dh0


class _DiagScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, u, h0, reverse, C):
        h = _diag_core(a, u, h0, reverse, C)
        ctx.save_for_backward(a, h0, h)
        ctx.reverse, ctx.C, ctx.u_dtype = reverse, C, u.dtype
        return h, h[:, 0 if reverse else -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, gh, glast):
        a, h0, h = ctx.saved_tensors
        g = _diag_adjoint(a, gh, ctx.reverse, ctx.C).finish(glast)
        da, dh0 = _diag_grads(a, h0, h, g, ctx.reverse, ctx.needs_input_grad[0])
        da = None if da is None else da.to(a.dtype)
        dh0 = dh0.to(h0.dtype) if h0 is not None and ctx.needs_input_grad[2] else None
        du = g.to(ctx.u_dtype) if ctx.needs_input_grad[1] else None
        return da, du, dh0, None, None


def diag_scan_chunked(a: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                      chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + u_t elementwise, chunked. a, u: (B, T, N), h0: (B, N) -> h (B, T, N), h_last (B, N)."""
    check_diag(a, u, h0)
    T = u.shape[1]
    return _DiagScanFn.apply(a, u, h0, reverse, min(chunk or default_chunk(T), T))


class DiagLocal(_Split):
    """The split diagonal scan (ops.LocalScan). a, u: (B, T, N); reset: document starts or None."""

    def __init__(self, a: Tensor, u: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                 chunk: Optional[int] = None):
        check_diag(a, u, None)
        super().__init__(a, u, reverse, chunk)
        self.cut = transition_mask(reset, reverse)
        self.a = _mask(a, reset, reverse)
        self._pass = _DiagPass(self.a, u, reverse, self.C, self.dt)
        self.P, self.s = self._pass.slice_map()

    def finish(self, h0):
        h0 = self._h0(h0)
        h = self._pass.finish(h0)
        self._pass, self._saved, self.a = None, (self.a, h0, h), None
        return h, h[:, 0 if self.reverse else -1].clone()

    def adjoint(self, g_h, saved):
        return _DiagGrad(self, g_h, *saved)


class _DiagGrad(LocalGrad):
    def __init__(self, part: DiagLocal, g_h: Optional[Tensor], a: Tensor, h0: Optional[Tensor], h: Tensor):
        super().__init__(DIAG, part.P)
        self.part, self.a_in, self.h0, self.h = part, a, h0, h
        self._pass = _diag_adjoint(a, torch.zeros_like(h) if g_h is None else g_h, part.reverse, part.C)
        _, g_first = self._pass.slice_map()
        self.a = a[:, -1 if part.reverse else 0].to(g_first.dtype) * g_first

    def finish(self, g_last):
        g = self._pass.finish(g_last)
        da, dh0 = _diag_grads(self.a_in, self.h0, self.h, g, self.part.reverse, True)
        keep = _keep_steps(self.part.cut, da)
        out = self.part._grads(da if keep is None else da * keep, g, dh0)
        self._pass = self.a_in = self.h0 = self.h = None
        return out


# ----------------------------------------------------------------------------------------------
# Companion scan (H-LRU): an order-m scalar recurrence per channel, run on its outputs' history,
#   y_t = x_t + sum_k c_t[k-1] y_{t-k},   c_t[k-1] = a_t[k-1] if no cut in (t-k, t] else 0,
# so no m x m matrix is formed per step. The state s_t = (y_t, ..., y_{t-m+1}) with entries from
# before a cut zeroed; h0 = (y_{-1}, ..., y_{-m}).

def _quiet(reset: Tensor, m: int) -> Tensor:
    """(B, T) cuts -> (B, T, m+1) bool, q[t, j] = no cut in steps (t-j, t]."""
    cnt = torch.cumsum(reset.to(torch.int32), 1)
    cnt = torch.cat([cnt.new_zeros(cnt.shape[0], m), cnt], 1).unfold(1, m + 1, 1)  # times t-m..t
    return (cnt[..., m:] - cnt.flip(-1)) == 0


class _HistPass:
    """Pass 1 of y_t = x_t + sum_j cf_t[j] y_{t-m+j} (cf: coefficients oldest first, already
    masked), y_{-k} = hist[..., k-1], without autograd; then `slice_map()` and `finish(hist)`
    -> y (B, T, N) in the accumulation dtype, as _BlockPass.

    cf (B, T, N, m), x (B, T, N), qend (B, T, m) state masks or None.
    Within chunks the m impulse responses to the incoming state ride along with the local output
    (m + 1 columns), which is what the carries and the correction need. Struct-of-arrays layout
    as in _BlockPass.
    """

    def __init__(self, cf: Tensor, x: Tensor, C: int, qend: Optional[Tensor], dt: torch.dtype):
        B, T, N, m = cf.shape
        nc = -(-T // C)
        self.T, self.m, self.nc, self.qend = T, m, nc, qend
        cs = torch.empty((C, m, B, nc, N), dtype=dt, device=x.device)
        _chunk(cf, C, nc, 0.0, dt, out=cs.permute(0, 2, 3, 4, 1))
        Z = torch.zeros((m + C, m + 1, B, nc, N), dtype=dt, device=x.device)  # rows: times -m..C-1
        _chunk(x, C, nc, 0.0, dt, out=Z[m:, m])
        Z[:m, :m] = torch.eye(m, dtype=dt, device=x.device).flip(0).view(m, m, 1, 1, 1)  # y_{-k} = e_{k-1}
        for t in range(C):
            row = Z[m + t]
            for j in range(m):
                row.addcmul_(cs[t, j, None], Z[t + j])
        self.Z = Z

    def _ends(self) -> Tensor:
        """Chunk-end states [P | s] (m, m+1, B, nc, N) (state index j = time C-1-j), entries from
        before a cut zeroed."""
        Z, m = self.Z, self.m
        C = Z.shape[0] - m
        end = Z[C:].flip(0)
        if self.qend is not None:
            qe = _chunk(self.qend, C, self.nc, True, torch.bool)[C - 1]  # (B, nc, m)
            end = end * qe.permute(2, 0, 1)[:, None, :, :, None]
        return end

    def slice_map(self) -> Tuple[Tensor, Tensor]:
        """The slice's (P, s): the chunk-end maps, the last chunk's taken at the slice's last step
        (not the padded chunk end), folded."""
        Z, m, nc, T, qend = self.Z, self.m, self.nc, self.T, self.qend
        C = Z.shape[0] - m
        last = (T - 1) - (nc - 1) * C
        tail = Z[last + 1:last + m + 1].flip(0)[:, :, :, nc - 1]  # (m, m+1, B, N), state j = time last-j
        if qend is not None:
            tail = tail * qend[:, T - 1].t()[:, None, :, None]
        end = self._ends().clone()
        end[:, :, :, nc - 1] = tail
        return _map_of_ends(end, list(range(nc)))

    def finish(self, hist: Optional[Tensor]) -> Tensor:
        Z, m, T = self.Z, self.m, self.T
        if self.nc == 1 and hist is None:
            self.Z = None
            return _unchunk(Z[m:, m], T)
        hin = _carries(self._ends(), hist, list(range(self.nc)))
        self.Z = None
        y = Z[m:, m]
        for j in range(m):
            y.addcmul_(Z[m:, j], hin[j])
        return _unchunk(y, T)


def _history(y: Tensor, h0: Optional[Tensor], m: int) -> Tensor:
    """(B, T, N) outputs and h0 (B, N, m) -> (B, m + T, N), times -m..T-1."""
    B, T, N = y.shape
    pre = y.new_zeros(B, m, N) if h0 is None else h0.to(y.dtype).flip(-1).movedim(-1, 1)
    return torch.cat([pre, y], 1)


def _coefficients(a: Tensor, reset: Optional[Tensor], dt: torch.dtype) -> Tuple[Optional[Tensor], Tensor]:
    """(q, c): the quiet masks of the cuts (or None) and the masked coefficients in dtype dt."""
    m = a.shape[-1]
    q = None if reset is None else _quiet(reset, m)
    return q, (a.to(dt) if q is None else a.to(dt) * q[:, :, None, 1:])


def _last_state(y: Tensor, h0: Optional[Tensor], q: Optional[Tensor], m: int) -> Tensor:
    """(y_{T-1}, ..., y_{T-m}) with entries from before a cut zeroed."""
    s_last = _history(y, h0, m)[:, y.shape[1]:].flip(1).movedim(1, -1)
    return s_last if q is None else s_last * q[:, -1, None, :m]


class _CompanionAdjoint:
    """The adjoint of a forward companion scan, w_t = dL/dy_t + sum_k c_{t+k}[k-1] w_{t+k}, a
    reverse order-m recurrence. The gradient of the last state, dL/dy_{T-1-j} += gs[j] (masked like
    s_last), enters as the adjoint's history: w_{T+m-1-j} = gs[j], reaching w_{T-1-j} through a
    unit coefficient at lag m. Pass 1 in the constructor; `finish(gs)` -> w (B, T, N)."""

    def __init__(self, c: Tensor, q: Optional[Tensor], gy: Tensor, C: int):
        B, T, N, m = c.shape
        self.c, self.q, self.T = c, q, T
        cpad = torch.cat([c, c.new_zeros(B, m, N, m)], 1)
        b = torch.stack([cpad[:, k:k + T, :, k - 1] for k in range(1, m + 1)], -1)  # b_t[k-1] = c_{t+k}[k-1]
        b[:, max(T - m, 0):, :, m - 1] = 1
        self.pass_ = _HistPass(b.flip(1).flip(-1), gy.flip(1), C, None, acc_dtype(c, gy))

    def seed(self, gs: Tensor) -> Tensor:
        m = self.c.shape[-1]
        g = gs.to(self.c.dtype)
        return (g if self.q is None else g * self.q[:, -1, None, :m]).flip(-1)

    def finish(self, gs: Optional[Tensor]) -> Tensor:
        return self.pass_.finish(None if gs is None else self.seed(gs)).flip(1)

    def h0_grad(self, w_head: Tensor, gs: Optional[Tensor]) -> Tensor:
        """dL/dh0: y_{-1-j} feeds y_i through c_i[i+j] (w_head[..., i] = the adjoint w_i, i < min(m, T)),
        and for T < m sits in s_last itself (the masked dL/ds_last)."""
        c, T = self.c, self.T
        B, _, N, m = c.shape
        dh0 = torch.zeros(B, N, m, dtype=c.dtype, device=c.device)
        for i in range(min(m, T)):
            dh0[..., :m - i] += c[:, i, :, i:] * w_head[..., i, None]
        if T < m and gs is not None:
            dh0[..., :m - T] += self.seed(gs).flip(-1)[..., T:]
        return dh0


def _companion_da(a: Tensor, h0: Optional[Tensor], y: Tensor, w: Tensor, q: Optional[Tensor]) -> Tensor:
    """dL/da of a forward companion scan from its outputs y and adjoint w (in w's dtype)."""
    T, m = y.shape[1], a.shape[-1]
    hist = _history(y, h0, m)  # time t-1-k sits at index t + m - 1 - k
    da = torch.stack([hist[:, m - 1 - k:m - 1 - k + T] for k in range(m)], -1) * w[..., None]
    return da if q is None else da * q[:, :T, None, 1:]


class _CompanionFn(torch.autograd.Function):
    """Forward-direction companion scan; the reverse direction flips time around it."""

    @staticmethod
    def forward(ctx, a, x, h0, reset, C):
        dt = acc_dtype(a, x, h0)
        q, c = _coefficients(a, reset, dt)
        m = a.shape[-1]
        y = _HistPass(c.flip(-1), x, C, None if q is None else q[..., :m], dt).finish(h0)
        ctx.save_for_backward(a, h0, reset, y)
        ctx.C, ctx.x_dtype = C, x.dtype
        return y, _last_state(y, h0, q, m)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gs):
        a, h0, reset, y = ctx.saved_tensors
        q, c = _coefficients(a, reset, y.dtype)
        adj = _CompanionAdjoint(c, q, gy, ctx.C)
        w = adj.finish(gs)  # (B, T, N)
        da = _companion_da(a, h0, y, w, q).to(a.dtype) if ctx.needs_input_grad[0] else None
        dh0 = None
        if h0 is not None and ctx.needs_input_grad[2]:
            dh0 = adj.h0_grad(w[:, :a.shape[-1]].movedim(1, -1), gs).to(h0.dtype)
        dx = w.to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        return da, dx, dh0, None, None


def companion_scan_chunked(a: Tensor, x: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                           reset: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """y_t = sum_k a_t[k-1] y_{t-k} + x_t (reverse: y_{t+k}), chunked; same contract as companion_scan_ref.

    a: (B, T, N, m)  x: (B, T, N)  h0: (B, N, m) or None  reset: (B, T) bool cuts or None
    -> y (B, T, N), s_last (B, N, m).
    """
    check_companion(a, x, h0, reset)
    T = x.shape[1]
    C = min(chunk or default_chunk(T), T)
    if not reverse:
        return _CompanionFn.apply(a, x, h0, reset, C)
    # Reverse time is forward time on flipped sequences (autograd flips the gradients back).
    y, s = _CompanionFn.apply(a.flip(1), x.flip(1), h0, None if reset is None else reset.flip(1), C)
    return y.flip(1), s


class CompanionLocal(_Split):
    """The split companion scan (ops.LocalScan). a: (B, T, N, m), x: (B, T, N); reset: per-step
    cuts (B, T) or None (ops.transition_mask of document starts, as companion_scan takes them).
    Reverse runs forward on flipped time, as companion_scan_chunked does."""

    def __init__(self, a: Tensor, x: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                 chunk: Optional[int] = None):
        check_companion(a, x, None, reset)
        super().__init__(a, x, reverse, chunk)
        if reverse:
            a, x, reset = a.flip(1), x.flip(1), None if reset is None else reset.flip(1)
        self.a, self.reset = a, reset
        self.q, c = _coefficients(a, reset, self.dt)
        m = a.shape[-1]
        self._pass = _HistPass(c.flip(-1), x, self.C, None if self.q is None else self.q[..., :m], self.dt)
        self.P, self.s = self._pass.slice_map()

    def finish(self, h0):
        h0 = self._h0(h0)
        y = self._pass.finish(h0)
        s_last = _last_state(y, h0, self.q, self.a.shape[-1])
        self._pass, self._saved, self.a = None, (self.a, h0, y), None
        return (y.flip(1) if self.reverse else y), s_last

    def adjoint(self, g_y, saved):
        return _CompanionGrad(self, g_y, *saved)


class _CompanionGrad(LocalGrad):
    def __init__(self, part: CompanionLocal, g_y: Optional[Tensor], a: Tensor, h0: Optional[Tensor], y: Tensor):
        super().__init__(COMPANION, part.P)
        self.part, self.a_in, self.h0, self.y = part, a, h0, y
        g_y = torch.zeros_like(y) if g_y is None else (g_y.flip(1) if part.reverse else g_y)
        self.q, c = _coefficients(a, part.reset, y.dtype)
        self.adj = _CompanionAdjoint(c, self.q, g_y, part.C)
        _, w_head = self.adj.pass_.slice_map()  # (w_0, ..., w_{m-1}) when dL/ds_last = 0
        self.a = self.adj.h0_grad(w_head, None)

    def finish(self, g_last):
        w = self.adj.finish(g_last)
        m = self.a_in.shape[-1]
        da = _companion_da(self.a_in, self.h0, self.y, w, self.q)
        dh0 = None if self.h0 is None else self.adj.h0_grad(w[:, :m].movedim(1, -1), g_last)
        if self.part.reverse:
            da, w = da.flip(1), w.flip(1)
        out = self.part._grads(da, w, dh0)
        self.adj = self.a_in = self.h0 = self.y = None
        return out


# ----------------------------------------------------------------------------------------------
# Slice transitions

def block_product_tree(A: Tensor, reverse: bool = False) -> Tensor:
    """State map of a whole slice by a log-depth pairwise tree (differentiable through autograd).

    Forward: A_T ... A_1; reverse: A_1 ... A_T. A: (B, T, N, m, m) -> (B, N, m, m), accumulation dtype.
    """
    check_tensor("A", A, [None, None, None, None, None], "(B, T, N, m, m)")
    B, T, N, m, m2 = A.shape
    if m != m2 or not 1 <= m <= MAX_BLOCK_SIZE or T < 1:
        raise ValueError(f"A: expected shape (B, T>=1, N, m, m) with m in 1..{MAX_BLOCK_SIZE}, got {tuple(A.shape)}")
    X = A.to(acc_dtype(A))
    while X.shape[1] > 1:
        n = X.shape[1]
        pairs = X[:, :n - n % 2].unflatten(1, (n // 2, 2))
        early, late = pairs[:, :, 0], pairs[:, :, 1]
        Y = early @ late if reverse else late @ early
        X = torch.cat([Y, X[:, n - 1:]], 1) if n % 2 else Y  # an odd last one is the latest: it stays last
    return X[:, 0]


def companion_product_chunked(a: Tensor, reverse: bool = False, reset: Optional[Tensor] = None) -> Tensor:
    """State map of a companion slice, P with s_last(h0) = P h0 + s_last(0), without forming the
    (B, T, N, m, m) companion matrices: column j is the last state of the companion scan from
    h0 = e_j with no input (m scans, each differentiable with the lean backward above).

    a: (B, T, N, m)  reset: (B, T) bool cuts or None -> P (B, N, m, m), accumulation dtype.
    """
    check_tensor("a", a, [None, None, None, None], "(B, T, N, m)")
    check_companion(a, a[..., 0], None, reset)
    B, T, N, m = a.shape
    dt = acc_dtype(a)
    zero = torch.zeros((), dtype=dt, device=a.device).expand(B, T, N)
    eye = torch.eye(m, dtype=dt, device=a.device)
    cols = [companion_scan_chunked(a, zero, eye[j].expand(B, N, m), reverse, reset)[1] for j in range(m)]
    return torch.stack(cols, -1)
