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
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .checks import MAX_BLOCK_SIZE, acc_dtype, check_block, check_companion, check_diag, check_tensor

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
    # chunk's end state is then the slice's last state, which deferred states rely on).
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
# Deferred initial states (sequence parallelism): a chunked scan reads h0 only after pass 1, which
# does not need it, so a rank can scan its chunks while its carry is still on the way. The same
# holds for the backward scan and its seed, the gradient of h_last.

SliceMap = Callable[[], Tuple[Tensor, Tensor]]


class Deferral:
    """An initial state registered by `deferred_state`.

    resolve(slice_map) -> h0: called once by the forward scan after its carry-free pass.
    seed(h0_grad_of) -> extra dL/dh_last: set by the caller before it runs backward; called once
    by the backward scan after its carry-free pass, with h0_grad_of(extra) -> dL/dh0 for that
    seed (from the backward scan's own slice map), so a caller can pass dL/dh0 on before the
    slice's gradients are written.
    """

    def __init__(self, h0: Tensor, resolve: Callable[[SliceMap], Tensor]):
        self.h0, self.resolve = h0, resolve
        self.consumed = False
        self.seed: Optional[Callable[[Callable[[Tensor], Tensor]], Tensor]] = None


_deferred: Dict[int, Deferral] = {}


@contextmanager
def deferred_state(h0: Tensor, resolve: Callable[[SliceMap], Tensor]):
    """Inside the block, a chunked scan (block, diag, companion) called with this very `h0`
    runs its carry-independent pass first, then calls resolve(slice_map) and writes what it
    returns into h0 in place (h0 is a buffer of the state's shape; a leaf that may require grad:
    its gradient is the gradient of the value written). slice_map() -> (P, s), the whole slice's
    map from zero, h_last(h0) = P h0 + s, for callers that must send or gather carries first.
    Yields the Deferral (`consumed` tells whether the scan asked; `seed` defers backward's seed)."""
    d = Deferral(h0, resolve)
    _deferred[id(h0)] = d
    try:
        yield d
    finally:
        if _deferred.get(id(h0)) is d:
            del _deferred[id(h0)]


def _deferral(h0: Optional[Tensor]) -> Optional[Deferral]:
    d = None if h0 is None else _deferred.get(id(h0))
    return d if d is not None and d.h0 is h0 else None


def _resolve(h0: Optional[Tensor], slice_map: SliceMap) -> None:
    d = _deferral(h0)
    if d is None or d.consumed:
        return
    d.consumed = True
    del _deferred[id(h0)]
    value, d.resolve = d.resolve(_once(slice_map)), None
    with torch.no_grad():
        h0.copy_(value)


def _once(fn: SliceMap) -> SliceMap:
    """fn, computed on the first call only (the ring's sender and the backward's h0_grad_of share it)."""
    memo = []

    def cached():
        if not memo:
            memo.append(fn())
        return memo[0]
    return cached


def _apply_map(P: Tensor, v: Tensor) -> Tensor:
    return P * v if P.dim() == v.dim() else torch.einsum("...ij,...j->...i", P, v)


@contextmanager
def _backward_seed(ctx, glast: Tensor, to_seed: Callable[[Tensor], Tensor],
                   h0_grad: Callable[[Tensor, Tensor], Tensor]):
    """The seed of a backward scan: to_seed(glast), or, where the forward's h0 was deferred and
    the caller set its Deferral's seed, a buffer that the backward scan fills after its
    carry-free pass with to_seed(glast + seed(h0_grad_of)).
    h0_grad(end, g_last) -> dL/dh0, from the backward scan's last state and the total dL/dh_last.
    Yields (seed, total): total[0] is the total dL/dh_last once the scan has run."""
    d = getattr(ctx, "deferral", None)
    fn = None if d is None else d.seed
    total = [glast]
    if fn is None:
        yield to_seed(glast), total
        return
    d.seed = None

    def resolve(slice_map):
        def h0_grad_of(extra):
            P, s = slice_map()
            g = glast + extra
            return h0_grad(_apply_map(P, to_seed(g)) + s, g)
        total[0] = glast + fn(h0_grad_of)
        return to_seed(total[0])

    buf = torch.empty_like(to_seed(glast))
    with deferred_state(buf, resolve) as seeded:
        yield buf, total
        if not seeded.consumed:
            raise RuntimeError("deferred backward seed: the backward scan never asked for it")


def _map_of_ends(end: Tensor, chunks) -> Tuple[Tensor, Tensor]:
    """end: (m, m+1, B, nc, N) chunk maps [P | s] -> the slice's (P (B, N, m, m), s (B, N, m))."""
    m, _, B, nc, N = end.shape
    Y = _fold_maps(end.permute(3, 2, 4, 0, 1).reshape(nc, B * N, m, m + 1), chunks).view(B, N, m, m + 1)
    return Y[..., :m], Y[..., m]


# ----------------------------------------------------------------------------------------------
# Block scan

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


def _block_core(A: Tensor, u: Tensor, h0: Optional[Tensor], reverse: bool, C: int, shift: int = 0,
                transpose: bool = False) -> Tensor:
    """Chunked block scan without autograd: h (B, T, N, m) in the accumulation dtype.

    Step t uses A[:, t + shift] (transposed if asked; identity where out of range).
    Layout: struct of arrays, the B*nc*N blocks along the last (contiguous) axes, so a step is m
    wide elementwise multiply-adds; on CPU that is several times faster than a batched matmul of
    tiny matrices.
    """
    B, T, N, m = u.shape
    if m >= _BMM_FROM:
        return _block_core_bmm(A, u, h0, reverse, C, shift, transpose)
    dt = acc_dtype(A, u, h0)
    nc = -(-T // C)
    As = torch.empty((C, m, m, B, nc, N), dtype=dt, device=u.device)
    _chunk(A, C, nc, torch.eye(m, dtype=dt, device=u.device), dt, shift, out=As.permute(0, 3, 4, 5, 1, 2))
    if transpose:
        As = As.transpose(1, 2)
    us = torch.empty((C, m, B, nc, N), dtype=dt, device=u.device)
    _chunk(u, C, nc, 0.0, dt, out=us.permute(0, 2, 3, 4, 1))
    X = torch.empty((C, m, m + 1, B, nc, N), dtype=dt, device=u.device)  # [Pcum | local] per step
    steps, chunks = _orders(C, nc, reverse)
    X[steps[0], :, :m] = As[steps[0]]
    X[steps[0], :, m] = us[steps[0]]
    prev = steps[0]
    for t in steps[1:]:  # every chunk from a zero state: X_t = A_t X_{t-1} + [0 | u_t]
        Xt, Xp, At = X[t], X[prev], As[t]
        torch.mul(At[:, 0, None], Xp[0, None], out=Xt)
        for k in range(1, m):
            Xt.addcmul_(At[:, k, None], Xp[k, None])
        Xt[:, m].add_(us[t])
        prev = t
    del As, us
    if nc == 1 and h0 is None:
        return _unchunk(X[:, :, m].permute(0, 2, 3, 4, 1), T)
    _resolve(h0, lambda: _map_of_ends(X[prev], chunks))
    hin = _carries(X[prev], h0, chunks)  # (m, B, nc, N)
    h = X[:, :, m]
    for k in range(m):  # h_t = local_t + Pcum_t h_in
        h.addcmul_(X[:, :, k], hin[k])
    return _unchunk(h.permute(0, 2, 3, 4, 1), T)


# From this block size on a batched matmul beats m elementwise multiply-adds per step (measured
# on CPU by bench/scan_cpu.py's sizes: 2x slower at m = 8 and 16, 2x faster at m <= 6).
_BMM_FROM = 8


def _block_core_bmm(A: Tensor, u: Tensor, h0: Optional[Tensor], reverse: bool, C: int, shift: int,
                    transpose: bool) -> Tensor:
    """_block_core for larger blocks: array-of-structs layout, one batched matmul per step."""
    B, T, N, m = u.shape
    dt = acc_dtype(A, u, h0)
    nc = -(-T // C)
    M = B * nc * N
    Ac = _chunk(A, C, nc, torch.eye(m, dtype=dt, device=u.device), dt, shift)
    if transpose:  # a transposed view: BLAS reads it as such, no copy
        Ac = Ac.transpose(-1, -2)
    uc = _chunk(u, C, nc, 0.0, dt)
    X = torch.empty((C, B, nc, N, m, m + 1), dtype=dt, device=u.device)
    steps, chunks = _orders(C, nc, reverse)
    X[steps[0], ..., :m] = Ac[steps[0]]
    X[steps[0], ..., m] = uc[steps[0]]
    Xf, Af, uf = X.view(C, M, m, m + 1), Ac.reshape(C, M, m, m), uc.view(C, M, m)
    prev = steps[0]
    for t in steps[1:]:
        torch.bmm(Af[t], Xf[prev], out=Xf[t])
        Xf[t, :, :, m].add_(uf[t])
        prev = t
    del Ac, Af, uc, uf
    if nc == 1 and h0 is None:
        return _unchunk(X[..., m], T)
    _resolve(h0, lambda: _map_of_ends(X[prev].permute(3, 4, 0, 1, 2), chunks))
    hin = _carries(X[prev].permute(3, 4, 0, 1, 2), h0, chunks)  # (m, B, nc, N)
    h = torch.matmul(X[..., :m], hin.permute(1, 2, 3, 0)[..., None]).squeeze(-1).add_(X[..., m])
    return _unchunk(h, T)


class _BlockScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, u, h0, reverse, C):
        ctx.deferral = _deferral(h0)
        h = _block_core(A, u, h0, reverse, C)
        ctx.save_for_backward(A, h0, h)
        ctx.reverse, ctx.C, ctx.u_dtype = reverse, C, u.dtype
        return h, h[:, 0 if reverse else -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, gh, glast):
        A, h0, h = ctx.saved_tensors
        rev, C = ctx.reverse, ctx.C
        # g_t = dL/dh_t + A_{t+1}^T g_{t+1} (reverse: A_{t-1}^T g_{t-1}), seeded by dL/dh_last.
        first = -1 if rev else 0
        A_first = A[:, first]
        h0_grad = lambda g_first, _: torch.einsum("bnji,bnj->bni", A_first.to(g_first.dtype), g_first)  # noqa: E731
        with _backward_seed(ctx, glast, lambda g: g, h0_grad) as (seed, _):
            g = _block_core(A, gh, seed, not rev, C, shift=-1 if rev else 1, transpose=True)
        dA = dh0 = None
        if ctx.needs_input_grad[0]:
            dA = torch.empty(A.shape, dtype=g.dtype, device=g.device)
            inner, outer = (slice(0, -1), slice(1, None)) if rev else (slice(1, None), slice(0, -1))
            torch.mul(g[:, inner, ..., :, None], h[:, outer, ..., None, :], out=dA[:, inner])
            if h0 is None:
                dA[:, first] = 0
            else:
                torch.mul(g[:, first, ..., :, None], h0.to(g.dtype)[..., None, :], out=dA[:, first])
            dA = dA.to(A.dtype)
        if h0 is not None and ctx.needs_input_grad[2]:
            dh0 = h0_grad(g[:, first], None).to(h0.dtype)
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


# ----------------------------------------------------------------------------------------------
# Diagonal scan (m = 1): the same three phases, elementwise.

def _chunk_or_view(x: Tensor, C: int, nc: int, fill, dtype: torch.dtype, shift: int = 0) -> Tensor:
    """_chunk, or a view of x when no padding, shift or cast is needed (elementwise steps read it
    strided as well as contiguous)."""
    if shift == 0 and x.shape[1] == nc * C and x.dtype == dtype:
        return x.unflatten(1, (nc, C)).movedim(2, 0)
    return _chunk(x, C, nc, fill, dtype, shift)


def _diag_core(a: Tensor, u: Tensor, h0: Optional[Tensor], reverse: bool, C: int, shift: int = 0) -> Tensor:
    """Chunked h_t = a_t h_{t-1} + u_t without autograd; step t uses a[:, t + shift] (1 outside).

    Scalars need no cumulative products per step (memory traffic is the cost here): pass 1 keeps
    only each chunk's end state from zero, the chunk transition is one `prod`, and after the carries
    pass 2 rescans every chunk from its carry, writing the states straight into the output.
    """
    B, T, N = u.shape
    dt = acc_dtype(a, u, h0)
    nc = -(-T // C)
    ac = _chunk_or_view(a, C, nc, 1.0, dt, shift)  # (C, B, nc, N)
    uc = _chunk_or_view(u, C, nc, 0.0, dt)
    steps, chunks = _orders(C, nc, reverse)
    h = None
    if nc > 1 or h0 is not None:
        s, spare = uc[steps[0]].clone(), torch.empty_like(uc[0])
        for t in steps[1:]:
            torch.addcmul(uc[t], ac[t], s, out=spare)
            s, spare = spare, s
        P = ac.prod(0)  # (B, nc, N), exact with zeros (no division)
        _resolve(h0, lambda: _diag_fold(P, s, chunks))
        hin = torch.zeros((nc, B, N), dtype=dt, device=u.device)
        if h0 is not None:
            hin[chunks[0]] = h0
        for c0, c in zip(chunks[:-1], chunks[1:]):
            torch.addcmul(s[:, c0], P[:, c0], hin[c0], out=hin[c])
        h = hin.transpose(0, 1)
    out = torch.empty((B, nc, C, N), dtype=dt, device=u.device)
    first = steps[0]
    if h is None:
        out[:, :, first] = uc[first]
    else:
        torch.addcmul(uc[first], ac[first], h, out=out[:, :, first])
    for prev, t in zip(steps[:-1], steps[1:]):
        torch.addcmul(uc[t], ac[t], out[:, :, prev], out=out[:, :, t])
    out = out.view(B, nc * C, N)
    return out if nc * C == T else out[:, :T].contiguous()


class _DiagScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, u, h0, reverse, C):
        ctx.deferral = _deferral(h0)
        h = _diag_core(a, u, h0, reverse, C)
        ctx.save_for_backward(a, h0, h)
        ctx.reverse, ctx.C, ctx.u_dtype = reverse, C, u.dtype
        return h, h[:, 0 if reverse else -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, gh, glast):
        a, h0, h = ctx.saved_tensors
        rev, C = ctx.reverse, ctx.C
        first = -1 if rev else 0
        a_first = a[:, first]
        with _backward_seed(ctx, glast, lambda g: g, lambda g_first, _: a_first * g_first) as (seed, _):
            g = _diag_core(a, gh, seed, not rev, C, shift=-1 if rev else 1)
        da = dh0 = None
        if ctx.needs_input_grad[0]:
            da = torch.empty(a.shape, dtype=g.dtype, device=g.device)
            inner, outer = (slice(0, -1), slice(1, None)) if rev else (slice(1, None), slice(0, -1))
            torch.mul(g[:, inner], h[:, outer], out=da[:, inner])
            da[:, first] = 0 if h0 is None else g[:, first] * h0
            da = da.to(a.dtype)
        if h0 is not None and ctx.needs_input_grad[2]:
            dh0 = (a[:, first] * g[:, first]).to(h0.dtype)
        du = g.to(ctx.u_dtype) if ctx.needs_input_grad[1] else None
        return da, du, dh0, None, None


def diag_scan_chunked(a: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                      chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + u_t elementwise, chunked. a, u: (B, T, N), h0: (B, N) -> h (B, T, N), h_last (B, N)."""
    check_diag(a, u, h0)
    T = u.shape[1]
    return _DiagScanFn.apply(a, u, h0, reverse, min(chunk or default_chunk(T), T))


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


def _hist_core(cf: Tensor, x: Tensor, hist: Optional[Tensor], C: int, qend: Optional[Tensor]) -> Tensor:
    """y_t = x_t + sum_j cf_t[j] y_{t-m+j} (cf: coefficients oldest first), y_{-k} = hist[..., k-1].

    cf (B, T, N, m) already masked, x (B, T, N), hist (B, N, m) or None, qend (B, T, m) state masks
    or None -> y (B, T, N) in the accumulation dtype. No autograd.
    Within chunks the m impulse responses to the incoming state ride along with the local output
    (m + 1 columns), which is what the carries and the correction need. Struct-of-arrays layout
    as in _block_core.
    """
    B, T, N, m = cf.shape
    dt = acc_dtype(cf, x, hist)
    nc = -(-T // C)
    cs = torch.empty((C, m, B, nc, N), dtype=dt, device=x.device)
    _chunk(cf, C, nc, 0.0, dt, out=cs.permute(0, 2, 3, 4, 1))
    Z = torch.zeros((m + C, m + 1, B, nc, N), dtype=dt, device=x.device)  # rows: times -m..C-1
    _chunk(x, C, nc, 0.0, dt, out=Z[m:, m])
    Z[:m, :m] = torch.eye(m, dtype=dt, device=x.device).flip(0).view(m, m, 1, 1, 1)  # y_{-k} = e_{k-1}
    for t in range(C):
        row = Z[m + t]
        for j in range(m):
            row.addcmul_(cs[t, j, None], Z[t + j])
    del cs
    if nc == 1 and hist is None:
        return _unchunk(Z[m:, m], T)
    # Chunk-end states [P | s] (state index j = time C-1-j), entries from before a cut zeroed.
    end = Z[C:].flip(0)  # (m, m+1, B, nc, N)
    if qend is not None:
        qe = _chunk(qend, C, nc, True, torch.bool)[C - 1]  # (B, nc, m)
        end = end * qe.permute(2, 0, 1)[:, None, :, :, None]
    _resolve(hist, lambda: _hist_map(Z, end, qend, T))
    hin = _carries(end, hist, list(range(nc)))
    y = Z[m:, m]
    for j in range(m):
        y.addcmul_(Z[m:, j], hin[j])
    return _unchunk(y, T)


def _hist_map(Z: Tensor, end: Tensor, qend: Optional[Tensor], T: int) -> Tuple[Tensor, Tensor]:
    """The slice's (P, s) from _hist_core's pass 1: the chunk-end maps, the last chunk's taken at
    the slice's last step (not the padded chunk end), folded."""
    m, nc = end.shape[0], end.shape[3]
    C = Z.shape[0] - m
    last = (T - 1) - (nc - 1) * C
    tail = Z[last + 1:last + m + 1].flip(0)[:, :, :, nc - 1]  # (m, m+1, B, N), state j = time last-j
    if qend is not None:
        tail = tail * qend[:, T - 1].t()[:, None, :, None]
    end = end.clone()
    end[:, :, :, nc - 1] = tail
    return _map_of_ends(end, list(range(nc)))


def _history(y: Tensor, h0: Optional[Tensor], m: int) -> Tensor:
    """(B, T, N) outputs and h0 (B, N, m) -> (B, m + T, N), times -m..T-1."""
    B, T, N = y.shape
    pre = y.new_zeros(B, m, N) if h0 is None else h0.to(y.dtype).flip(-1).movedim(-1, 1)
    return torch.cat([pre, y], 1)


class _CompanionFn(torch.autograd.Function):
    """Forward-direction companion scan; the reverse direction flips time around it."""

    @staticmethod
    def forward(ctx, a, x, h0, reset, C):
        ctx.deferral = _deferral(h0)
        B, T, N, m = a.shape
        dt = acc_dtype(a, x, h0)
        q = None if reset is None else _quiet(reset, m)
        c = a.to(dt) if q is None else a.to(dt) * q[:, :, None, 1:]
        y = _hist_core(c.flip(-1), x, h0, C, None if q is None else q[..., :m])
        s_last = _history(y, h0, m)[:, T:].flip(1).movedim(1, -1)  # (y_{T-1}, ..., y_{T-m})
        if q is not None:
            s_last = s_last * q[:, -1, None, :m]
        ctx.save_for_backward(a, h0, reset, y)
        ctx.C, ctx.x_dtype = C, x.dtype
        return y, s_last

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gs):
        a, h0, reset, y = ctx.saved_tensors
        B, T, N, m = a.shape
        dt = y.dtype
        # Adjoint: w_t = dL/dy_t + sum_k c_{t+k}[k-1] w_{t+k}, a reverse order-m recurrence. The
        # gradient of the last state, dL/dy_{T-1-j} += gs[j] (masked like s_last), enters as the
        # adjoint's history: w_{T+m-1-j} = gs[j], reaching w_{T-1-j} through a unit coefficient at lag m.
        q = None if reset is None else _quiet(reset, m)
        c = a.to(dt) if q is None else a.to(dt) * q[:, :, None, 1:]
        to_seed = (lambda g: g.to(dt).flip(-1)) if q is None else (lambda g: (g.to(dt) * q[:, -1, None, :m]).flip(-1))
        cpad = torch.cat([c, c.new_zeros(B, m, N, m)], 1)
        b = torch.stack([cpad[:, k:k + T, :, k - 1] for k in range(1, m + 1)], -1)  # b_t[k-1] = c_{t+k}[k-1]
        b[:, max(T - m, 0):, :, m - 1] = 1
        h0_grad = lambda w_head, g_last: _companion_h0_grad(c, w_head, to_seed(g_last).flip(-1), T)  # noqa: E731
        with _backward_seed(ctx, gs, to_seed, h0_grad) as (seed, gs_total):
            w = _hist_core(b.flip(1).flip(-1), gy.flip(1), seed, ctx.C, None).flip(1)  # (B, T, N)
        da = dh0 = None
        if ctx.needs_input_grad[0]:
            hist = _history(y, h0, m)  # time t-1-k sits at index t + m - 1 - k
            da = torch.stack([hist[:, m - 1 - k:m - 1 - k + T] for k in range(m)], -1) * w[..., None]
            if q is not None:
                da = da * q[:, :T, None, 1:]
            da = da.to(a.dtype)
        if h0 is not None and ctx.needs_input_grad[2]:
            dh0 = h0_grad(w[:, :m].movedim(1, -1), gs_total[0]).to(h0.dtype)
        dx = w.to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        return da, dx, dh0, None, None


def _companion_h0_grad(c: Tensor, w_head: Tensor, gs_masked: Tensor, T: int) -> Tensor:
    """dL/dh0 of a forward companion scan: y_{-1-j} feeds y_i through c_i[i+j] (w_head[..., i] =
    the adjoint w_i, i < min(m, T)), and for T < m sits in s_last itself (gs_masked, masked dL/ds_last)."""
    B, _, N, m = c.shape
    dh0 = torch.zeros(B, N, m, dtype=c.dtype, device=c.device)
    for i in range(min(m, T)):
        dh0[..., :m - i] += c[:, i, :, i:] * w_head[..., i, None]
    if T < m:
        dh0[..., :m - T] += gs_masked[..., T:]
    return dh0


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


# ----------------------------------------------------------------------------------------------
# Slice transitions for sequence parallelism

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


# ----------------------------------------------------------------------------------------------
# Slice carries: (P, s) with h_last(h0) = P h0 + s in one pass (`ScanOp.carry`). Values only (no
# autograd). Sequence parallelism takes (P, s) from a deferred scan's own pass 1 instead
# (deferred_state); these serve the route of ops that read h0 first and callers that want the map
# alone. Pass 1 of the chunked scans, keeping only the current step (never the per-step states),
# then a fold of the chunk maps [P | s] in scan order.

def _fold_maps(E: Tensor, chunks) -> Tensor:
    """E: (nc, R, m, m+1) chunk maps [P | s] -> the whole slice's [P | s] (R, m, m+1), along `chunks`."""
    Y = E[chunks[0]].clone()
    m = Y.shape[-2]
    for c in chunks[1:]:
        Y = torch.bmm(E[c, :, :, :m], Y)
        Y[:, :, m].add_(E[c, :, :, m])
    return Y


def block_carry(A: Tensor, u: Tensor, reverse: bool = False, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Carry of a block slice: P = A_T ... A_1 (reverse A_1 ... A_T) and s = h_last from zero.

    A: (B, T, N, m, m)  u: (B, T, N, m) -> P (B, N, m, m), s (B, N, m), accumulation dtype.
    Document starts: mask A first (ops.transition_mask). Costs pass 1 of block_scan_chunked with a
    rolling step buffer: no (B, T, N, m) output, no correction pass.
    """
    check_block(A, u, None)
    B, T, N, m = u.shape
    C = min(chunk or default_chunk(T), T)
    dt = acc_dtype(A, u)
    nc = -(-T // C)
    eye = torch.eye(m, dtype=dt, device=u.device)
    steps, chunks = _orders(C, nc, reverse)
    with torch.no_grad():
        if m >= _BMM_FROM:  # array of structs, one batched matmul per step (see _block_core_bmm)
            M = B * nc * N
            Af = _chunk(A, C, nc, eye, dt).view(C, M, m, m)
            uf = _chunk(u, C, nc, 0.0, dt).view(C, M, m)
            X = torch.cat([Af[steps[0]], uf[steps[0], :, :, None]], -1)  # (M, m, m+1) = [Pcum | local]
            Y = torch.empty_like(X)
            for t in steps[1:]:
                torch.bmm(Af[t], X, out=Y)
                Y[:, :, m].add_(uf[t])
                X, Y = Y, X
            E = X.view(B, nc, N, m, m + 1).transpose(0, 1)
        else:  # struct of arrays: m elementwise multiply-adds per step (see _block_core)
            As = torch.empty((C, m, m, B, nc, N), dtype=dt, device=u.device)
            _chunk(A, C, nc, eye, dt, out=As.permute(0, 3, 4, 5, 1, 2))
            us = torch.empty((C, m, B, nc, N), dtype=dt, device=u.device)
            _chunk(u, C, nc, 0.0, dt, out=us.permute(0, 2, 3, 4, 1))
            X = torch.empty((m, m + 1, B, nc, N), dtype=dt, device=u.device)  # [Pcum | local]
            Y = torch.empty_like(X)
            X[:, :m] = As[steps[0]]
            X[:, m] = us[steps[0]]
            for t in steps[1:]:  # X_t = A_t X_{t-1} + [0 | u_t], every chunk at once
                At = As[t]
                torch.mul(At[:, 0, None], X[0, None], out=Y)
                for k in range(1, m):
                    Y.addcmul_(At[:, k, None], X[k, None])
                Y[:, m].add_(us[t])
                X, Y = Y, X
            E = X.permute(3, 2, 4, 0, 1)  # (nc, B, N, m, m+1)
        Y = _fold_maps(E.reshape(nc, B * N, m, m + 1), chunks).view(B, N, m, m + 1)
    return Y[..., :m], Y[..., m]


def diag_carry(a: Tensor, u: Tensor, reverse: bool = False, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Carry of a diagonal slice: P = prod_t a_t, s = h_last from zero.

    a, u: (B, T, N) -> P (B, N), s (B, N), accumulation dtype. Mask a first for document starts.
    """
    check_diag(a, u, None)
    B, T, N = u.shape
    C = min(chunk or default_chunk(T), T)
    dt = acc_dtype(a, u)
    nc = -(-T // C)
    with torch.no_grad():
        ac = _chunk_or_view(a, C, nc, 1.0, dt)  # (C, B, nc, N)
        uc = _chunk_or_view(u, C, nc, 0.0, dt)
        steps, chunks = _orders(C, nc, reverse)
        s, spare = uc[steps[0]].clone(), torch.empty_like(uc[0])
        for t in steps[1:]:
            torch.addcmul(uc[t], ac[t], s, out=spare)
            s, spare = spare, s
        P = ac.prod(0)  # (B, nc, N), exact with zeros (no division)
        return _diag_fold(P, s, chunks)


def _diag_fold(P: Tensor, s: Tensor, chunks) -> Tuple[Tensor, Tensor]:
    """Chunk maps P, s (B, nc, N) -> the slice's (P, s) (B, N), folded along `chunks`."""
    Pt, st = P[:, chunks[0]].clone(), s[:, chunks[0]].clone()
    for c in chunks[1:]:
        st = torch.addcmul(s[:, c], P[:, c], st)
        Pt.mul_(P[:, c])
    return Pt, st


def companion_carry(a: Tensor, x: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                    chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Carry of a companion (H-LRU) slice: P = companion_product_chunked(a, reverse, reset) and
    s = companion_scan_chunked(a, x, None, reverse, reset)[1], in one pass.

    a: (B, T, N, m)  x: (B, T, N)  reset: (B, T) bool per-step cuts or None
    -> P (B, N, m, m), s (B, N, m), accumulation dtype. Within each chunk the m impulse responses
    to the incoming state ride along with the local output (as in _hist_core), on a ring of the
    last m + 1 rows; the chunk-end states [P | s] are then folded.
    """
    check_companion(a, x, None, reset)
    if reverse:  # reverse time is forward time on flipped sequences
        a, x = a.flip(1), x.flip(1)
        reset = None if reset is None else reset.flip(1)
    B, T, N, m = a.shape
    C = min(chunk or default_chunk(T), T)
    dt = acc_dtype(a, x)
    nc = -(-T // C)
    with torch.no_grad():
        q = None if reset is None else _quiet(reset, m)
        c = a.to(dt) if q is None else a.to(dt) * q[:, :, None, 1:]
        cs = torch.empty((C, m, B, nc, N), dtype=dt, device=x.device)  # coefficients, oldest first
        _chunk(c.flip(-1), C, nc, 0.0, dt, out=cs.permute(0, 2, 3, 4, 1))
        xs = _chunk(x, C, nc, 0.0, dt)  # (C, B, nc, N)
        # Ring: time tau in -m..C-1 lives in slot (tau + m) % (m + 1); y_{-k} = e_{k-1} to start.
        Z = torch.zeros((m + 1, m + 1, B, nc, N), dtype=dt, device=x.device)
        Z[:m, :m] = torch.eye(m, dtype=dt, device=x.device).flip(0).view(m, m, 1, 1, 1)
        last = (T - 1) - (nc - 1) * C  # the slice's last step inside the last chunk
        slot = lambda tau: (tau + m) % (m + 1)  # noqa: E731
        ends = lambda t: Z[[slot(t - j) for j in range(m)]]  # noqa: E731  (m, m+1, B, nc, N), state j = time t-j
        tail = None
        for t in range(C):
            row = Z[slot(t)]
            row.zero_()
            row[m] = xs[t]
            for j in range(m):
                row.addcmul_(cs[t, j, None], Z[slot(t - m + j)])
            if t == last and last < C - 1:
                tail = ends(t)[:, :, :, nc - 1].clone()
        end = ends(C - 1)
        if tail is not None:
            end[:, :, :, nc - 1] = tail
        if q is not None:  # state entries from before a cut are zeroed (as in _hist_core / s_last)
            tend = torch.arange(nc, device=x.device) * C + C - 1
            tend[-1] = T - 1
            qe = q[:, tend, :m]  # (B, nc, m)
            end = end * qe.permute(2, 0, 1)[:, None, :, :, None]
        E = end.permute(3, 2, 4, 0, 1).reshape(nc, B * N, m, m + 1)
        Y = _fold_maps(E, list(range(nc))).view(B, N, m, m + 1)
    return Y[..., :m], Y[..., m]
