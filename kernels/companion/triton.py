"""Triton companion scan (H-LRU): y_t = sum_k a_{t,k} y_{t-k} + x_t, forward and backward, and the
fused H-LRU entry point that reads m + 1 logits per channel and normalises them in registers.

The companion matrix (first row a_t, ones below the diagonal) only exists in registers: the state
is the last m outputs, shifted one place per step. Only y_t (B, T, N) is written; the backward
rebuilds the state s_{t-1} = (y_{t-1}, ..., y_{t-m}) from y (cut at the last reset, h0 before the
start) instead of storing m values per step. Chunking and carries as in block/triton.py; the split phase is CompanionTritonLocal
(common.triton.TritonLocal).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..common.scan import LocalScan, ScanOp, acc_dtype, check_companion
from ..common.triton import (Launch, TritonLocal, _device, _dot, _fold_backward, _fold_forward, carry_index, load_tuple,
                             normalize, normalize_bwd, norm_code, scan_meta, scan_order_last_cut, store_tuple, tile_rows)
from .reference import check_hlru

Tensor = torch.Tensor


@triton.jit
def _coeff_row(G, X, tok, rmask, M: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
               EPS: tl.constexpr, ACC: tl.constexpr):
    """Coefficients a (tuple of M) and input x of one step of one row, plus what the backward
    needs (logits g, v, a0, normalised P, s, S; unused when NORM = 0)."""
    g = load_tuple(G, tok * W, rmask, W, ACC)
    v = tl.load(X + tok, mask=rmask, other=0.0).to(ACC)
    if NORM == 0:
        a = g
        x = v
        a0 = v
        P = g
        s = g
        S = v
    else:
        P, s, S = normalize(g, W, NORM, EPS)
        a = ()
        for j in tl.static_range(M):
            a = a + (P[j],)
        a0 = P[M]
        x = a0 * v
    return a, x, g, v, a0, P, s, S


@triton.jit
def _comp_fwd_kernel(G, X, INIT, Y, LAST, PROD, RST,
                     T, N, R, L, C,
                     M: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                     EPS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESET: tl.constexpr,
                     STORE_Y: tl.constexpr, WANT_P: tl.constexpr, NCOL: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """One chunk of y_t = a_t . s_{t-1} + x_t, s_t = (y_t, s_{t-1}[:-1]) per row; the shift is a
    renaming of the state tuple. WANT_P: columns [grp * NCOL, +NCOL) of the chunk product."""
    c = tl.program_id(1)
    if WANT_P:
        NG: tl.constexpr = (M + NCOL - 1) // NCOL
        grp = tl.program_id(0) % NG
        tile = tl.program_id(0) // NG
    else:
        grp = 0
        tile = tl.program_id(0)
    rows, rmask, b, n = tile_rows(R, N, BLOCK_R, tile)
    cid = carry_index(b, c, n, C, N)
    st = load_tuple(INIT, cid * M, rmask, M, ACC)
    if WANT_P:
        k0 = grp * NCOL
        Pt = ()  # Pt[j * NCOL + q] = P[j, k0 + q], starting from the identity
        for j in tl.static_range(M):
            for q in tl.static_range(NCOL):
                Pt = Pt + (tl.zeros([BLOCK_R], dtype=ACC) + (k0 + q == j).to(ACC),)
    start = c * L
    end = tl.minimum(start + L, T)
    for step in range(start, end):
        if REVERSE:
            t = T - 1 - step
        else:
            t = step
        tok = (b * T + t) * N + n
        a, x, g, v, a0, P, s, S = _coeff_row(G, X, tok, rmask, M, W, NORM, EPS, ACC)
        if HAS_RESET:  # a predicate, not a 0/1 float: one register fewer (as block/triton.py's forward)
            cut = tl.load(RST + b * T + t, mask=rmask, other=0) != 0
            kept = ()
            for j in tl.static_range(M):
                kept = kept + (tl.where(cut, 0.0, st[j]),)
            st = kept
        y = _dot(a, st, M) + x
        nst = (y,)
        for j in tl.static_range(M - 1):
            nst = nst + (st[j],)
        st = nst
        if STORE_Y:
            tl.store(Y + tok, y, mask=rmask)
        if WANT_P:
            # companion rows: row 0 = a . P, row i = P[i - 1] (zero at a cut)
            Pn = ()
            for q in tl.static_range(NCOL):
                pacc = a[0] * Pt[q]
                for j in tl.static_range(1, M):
                    pacc += a[j] * Pt[j * NCOL + q]
                if HAS_RESET:
                    pacc = tl.where(cut, 0.0, pacc)
                Pn = Pn + (pacc,)
            for i in tl.static_range(1, M):
                for q in tl.static_range(NCOL):
                    if HAS_RESET:
                        Pn = Pn + (tl.where(cut, 0.0, Pt[(i - 1) * NCOL + q]),)
                    else:
                        Pn = Pn + (Pt[(i - 1) * NCOL + q],)
            Pt = Pn
    store_tuple(LAST, cid * M, st, rmask & (rows * 0 + grp == 0), M)
    if WANT_P:
        for j in tl.static_range(M):
            for q in tl.static_range(NCOL):
                tl.store(PROD + cid * (M * M) + j * M + k0 + q, Pt[j * NCOL + q], mask=rmask & (rows * 0 + k0 + q < M))


@triton.jit
def _y_at(Y, H0, rows, rmask, b, n, T, N, ys, M: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr,
          ACC: tl.constexpr):
    """y at scan step ys (a scalar) of every row; before the start (ys < 0) h0[-1 - ys], which is
    zero without h0 or past m. Resets are applied by the caller."""
    if REVERSE:
        ty = T - 1 - ys
    else:
        ty = ys
    inside = (rows * 0 + ys) >= 0  # tensors: scalar conditions in masks trip the interpreter
    val = tl.load(Y + (b * T + ty) * N + n, mask=rmask & inside, other=0.0).to(ACC)
    if HAS_H0:
        j = rows * 0 - 1 - ys
        hv = tl.load(H0 + (b * N + n) * M + j, mask=rmask & (j >= 0) & (j < M), other=0.0).to(ACC)
        val = tl.where(inside, val, hv)
    return val


@triton.jit
def _comp_bwd_kernel(G, X, Y, H0, LR, DY, LAMIN, DG, DX, LAMOUT, RST,
                     T, N, R, L, C,
                     M: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                     EPS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESET: tl.constexpr,
                     HAS_H0: tl.constexpr, CARRY_ONLY: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """One chunk of the adjoint lam_t = e_0 dy_t + C_{t+1}^T lam_{t+1} in reverse scan order, with
    the coefficients' gradient lam_{t,0} s_{t-1}. The state s_{t-1} = (y_{t-1}, ..., y_{t-m}) is a
    window over y slid one step per iteration: one load per step, not m."""
    c = tl.program_id(1)
    rows, rmask, b, n = tile_rows(R, N, BLOCK_R, tl.program_id(0))
    cid = carry_index(b, c, n, C, N)
    carry = load_tuple(LAMIN, cid * M, rmask, M, ACC)
    start = c * L
    end = tl.minimum(start + L, T)
    if not CARRY_ONLY:
        win = ()  # win[k] = y at scan step step - 1 - k, before resets
        for k in tl.static_range(M):
            win = win + (_y_at(Y, H0, rows, rmask, b, n, T, N, end - 2 - k, M, REVERSE, HAS_H0, ACC),)
    for i in range(0, end - start):
        step = end - 1 - i
        if REVERSE:
            t = T - 1 - step
        else:
            t = step
        tok = (b * T + t) * N + n
        if HAS_RESET:
            keep = tl.where(tl.load(RST + b * T + t, mask=rmask, other=0) != 0, 0.0, 1.0).to(ACC)
        a, x, g, v, a0, P, s, S = _coeff_row(G, X, tok, rmask, M, W, NORM, EPS, ACC)
        lam0 = tl.load(DY + tok, mask=rmask, other=0.0).to(ACC) + carry[0]
        if not CARRY_ONLY:
            # entries before the last cut are zero; h0 only counts while no cut came before
            if HAS_RESET:
                lr = tl.load(LR + b * T + (step - 1), mask=rmask & ((rows * 0 + step) > 0), other=-1)
            da = ()
            for k in tl.static_range(M):
                if HAS_RESET:
                    ys = rows * 0 + (step - 1 - k)
                    qk = tl.where((ys >= lr) | (lr < 0), win[k], 0.0) * keep
                else:
                    qk = win[k]
                da = da + (lam0 * qk,)
            if NORM == 0:
                store_tuple(DG, tok * W, da, rmask, M)
                tl.store(DX + tok, lam0, mask=rmask)
            else:
                dg = normalize_bwd(da + (lam0 * v,), P, s, S, g, W, NORM)
                store_tuple(DG, tok * W, dg, rmask, W)
                tl.store(DX + tok, lam0 * a0, mask=rmask)
            nw = ()
            for k in tl.static_range(M - 1):
                nw = nw + (win[k + 1],)
            win = nw + (_y_at(Y, H0, rows, rmask, b, n, T, N, step - 1 - M, M, REVERSE, HAS_H0, ACC),)
        # C_t^T lam: (C^T lam)_j = a_j lam_0 + lam_{j+1}, lam_k = carry_k for k >= 1
        cn = ()
        for j in tl.static_range(M):
            if j + 1 < M:
                e = a[j] * lam0 + carry[j + 1]
            else:
                e = a[j] * lam0
            if HAS_RESET:
                e = e * keep
            cn = cn + (e,)
        carry = cn
    store_tuple(LAMOUT, cid * M, carry, rmask, M)


class _CompanionFn(torch.autograd.Function):
    """G = a (B, T, N, M) when NORM = 0, else logits (B, T, N, M + 1) with X = v."""

    @staticmethod
    def forward(ctx, G, X, h0, reverse, reset, NORM, chunk):
        B, T, N = X.shape
        W = G.shape[-1]
        M = W - 1 if NORM else W
        R = B * N
        dt = acc_dtype(G, X, h0)
        lc = Launch(M, R, T, G.device, chunk, companion=True)
        L, C = lc.L, lc.C
        G, X = G.contiguous(), X.contiguous()
        rst = reset.to(torch.int8).contiguous() if reset is not None else X
        h0c = h0.to(dt).contiguous() if h0 is not None else X.new_zeros(B, N, M, dtype=dt)
        y = X.new_empty(B, T, N, dtype=dt)
        last = X.new_empty(B, C, N, M, dtype=dt)
        common = dict(scan_meta(M, W, NORM, reverse, reset is not None, dt, lc), **lc.opts)
        with _device(G):
            if C == 1:
                init, P = h0c[:, None], None
            else:
                P = X.new_empty(B, C, N, M, M, dtype=dt)
                zero = X.new_zeros(B, C, N, M, dtype=dt)
                _comp_fwd_kernel[lc.grid(M, True)](G, X, zero, y, last, P, rst, T, N, R, L, C,
                                                   STORE_Y=False, WANT_P=True, NCOL=lc.NCOL, **common)
                init = _fold_forward(P, last, h0c).contiguous()
            _comp_fwd_kernel[lc.grid(M, False)](G, X, init, y, last, y, rst, T, N, R, L, C,
                                                STORE_Y=True, WANT_P=False, NCOL=1, **common)
        ctx.save_for_backward(G, X, h0, y, reset, P)
        ctx.cfg = (reverse, lc, common, dt)
        return y, last[:, C - 1]

    @staticmethod
    def backward(ctx, dy, dlast):
        G, X, h0, y, reset, P = ctx.saved_tensors
        reverse, lc, common, dt = ctx.cfg
        L, C, grid = lc.L, lc.C, lc.grid(common["M"], False)
        B, T, N = X.shape
        M = common["M"]
        R = B * N
        dy = dy.to(dt).contiguous()
        rst = reset.to(torch.int8).contiguous() if reset is not None else X
        lr = scan_order_last_cut(reset, reverse) if reset is not None else rst
        h0c = h0.to(dt).contiguous() if h0 is not None else X
        dG = torch.empty_like(G)
        dX = torch.empty_like(X)
        lamout = X.new_empty(B, C, N, M, dtype=dt)
        args = (G, X, y, h0c, lr, dy)
        with _device(G):
            if C == 1:
                lamin = dlast.to(dt)[:, None].contiguous()
            else:
                zero = X.new_zeros(B, C, N, M, dtype=dt)
                _comp_bwd_kernel[grid](*args, zero, dG, dX, lamout, rst, T, N, R, L, C,
                                       HAS_H0=h0 is not None, CARRY_ONLY=True, **common)
                lamin = _fold_backward(P, lamout, dlast.to(dt)).contiguous()
            _comp_bwd_kernel[grid](*args, lamin, dG, dX, lamout, rst, T, N, R, L, C,
                                   HAS_H0=h0 is not None, CARRY_ONLY=False, **common)
        dh0 = lamout[:, 0].to(h0.dtype) if h0 is not None and ctx.needs_input_grad[2] else None
        return dG, dX, dh0, None, None, None, None


def companion_scan_triton(a: Tensor, x: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                          reset: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Triton companion scan, same contract as companion_scan_ref, differentiable.

    a: (B, T, N, m)  x: (B, T, N)  h0: (B, N, m)  reset: (B, T) bool (zeroes A_t)
    -> y: (B, T, N), s_last: (B, N, m); fp32 state (fp64 for fp64 inputs).
    """
    check_companion(a, x, h0, reset)
    return _CompanionFn.apply(a, x, h0, bool(reverse), reset, 0, chunk)


def hlru_scan_triton(logits: Tensor, v: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                     reset: Optional[Tensor] = None, norm: str = "softmax",
                     chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Fused H-LRU scan: m + 1 logits per channel normalised in registers (entries 0..m-1 are
    a_1..a_m, entry m is a_0); y_t = sum_k a_{t,k} y_{t-k} + a_{t,0} v_t.

    logits: (B, T, N, m + 1)  v: (B, T, N)  h0: (B, N, m)  reset: (B, T) bool
    -> y: (B, T, N), s_last: (B, N, m). Matches gates.hlru_scan_reference.
    """
    NORM = norm_code(norm)
    check_hlru(logits, v, h0, reset)
    return _CompanionFn.apply(logits, v, h0, bool(reverse), reset, NORM, chunk)


class CompanionTritonLocal(TritonLocal):
    """The split companion scan on the companion kernels (common.triton.TritonLocal)."""

    companion = True

    def fwd_kernel(self):
        return _comp_fwd_kernel

    def launch_bwd(self, grid, G, U, h, h0, lr, dh, lamin, dG, dU, lamout, rst, flags):
        B, T, N = self.shape
        _comp_bwd_kernel[grid](G, U, h, h0, lr, dh, lamin, dG, dU, lamout, rst, T, N, B * N, self.lc.L, self.lc.C,
                               **flags)


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
    return CompanionTritonLocal(op or ScanOp(), G, X, reverse, reset, NORM, M, chunk)
