"""Triton companion scan (H-LRU): y_t = sum_k a_{t,k} y_{t-k} + x_t, forward and backward, and the
fused H-LRU entry point that reads m + 1 logits per channel and normalises them in registers.

The companion matrix (first row a_t, ones below the diagonal) only exists in registers: the state
is the last m outputs, shifted one place per step. Only y_t (B, T, N) is written; the backward
rebuilds the state s_{t-1} = (y_{t-1}, ..., y_{t-m}) from y (cut at the last reset, h0 before the
start) instead of storing m values per step. Chunking and carries as in block.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..checks import acc_dtype, check_companion
from ..gates import EPS, check_hlru
from ._common import acc_triton_dtype, normalize, normalize_bwd, norm_code, scan_order_last_cut
from .block import _fold_backward, _fold_forward, _launch_setup, _nullctx

Tensor = torch.Tensor


@triton.jit
def _load_coeffs(G, X, tok, mg, rmask, k2, M: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                 EPS: tl.constexpr, ACC: tl.constexpr):
    """Coefficients a (R, K) (entries >= m are zero) and input x (R,) of one step."""
    g = tl.load(G + tok[:, None] * W + k2, mask=mg, other=0.0).to(ACC)
    v = tl.load(X + tok, mask=rmask, other=0.0).to(ACC)
    if NORM == 0:
        a = g
        a0 = v
        P = g
        s = g
        S = g
        x = v
    else:
        # columns only: masked rows normalise finite zeros (no 0/0), then are masked away
        P, s, S = normalize(g, k2 < W, 1, NORM, EPS)
        P = tl.where(mg, P, 0.0)
        a0 = tl.sum(tl.where(k2 == M, P, 0.0), axis=1)
        a = tl.where(k2 < M, P, 0.0)
        x = a0 * v
    return a, x, g, v, a0, P, s, S


@triton.jit
def _comp_fwd_kernel(G, X, INIT, Y, LAST, PROD, RST,
                     T, N, R, L, C,
                     M: tl.constexpr, W: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
                     EPS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESET: tl.constexpr,
                     STORE_Y: tl.constexpr, WANT_P: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    ii = tl.arange(0, K)[None, :, None]
    jj = tl.arange(0, K)[None, None, :]
    k2 = tl.arange(0, K)[None, :]
    m2 = rmask[:, None] & (k2 < M)
    mg = rmask[:, None] & (k2 < W)
    cid = (b * C + c) * N + n
    st = tl.load(INIT + cid[:, None] * M + k2, mask=m2, other=0.0).to(ACC)
    if WANT_P:
        Pacc = tl.where((ii == jj) & (ii < M), 1.0, 0.0).to(ACC) + tl.zeros([BLOCK_R, K, K], dtype=ACC)
    start = c * L
    end = tl.minimum(start + L, T)
    for step in range(start, end):
        if REVERSE:
            t = T - 1 - step
        else:
            t = step
        tok = (b * T + t) * N + n
        a, x, g, v, a0, P, s, S = _load_coeffs(G, X, tok, mg, rmask, k2, M, W, NORM, EPS, ACC)
        if HAS_RESET:
            keep = tl.where(tl.load(RST + b * T + t, mask=rmask, other=0) != 0, 0.0, 1.0).to(ACC)
            st = st * keep[:, None]
        y = tl.sum(a * st, axis=1) + x
        shifted = tl.sum(tl.where(ii == jj + 1, st[:, None, :], 0.0), axis=2)  # shifted[i] = st[i-1]
        st = tl.where(k2 == 0, y[:, None], tl.where(k2 < M, shifted, 0.0))
        if STORE_Y:
            tl.store(Y + tok, y, mask=rmask)
        if WANT_P:
            Cm = tl.where(ii == 0, a[:, None, :], tl.where((ii == jj + 1) & (ii < M), 1.0, 0.0))
            if HAS_RESET:
                Cm = Cm * keep[:, None, None]
            new = tl.zeros([BLOCK_R, K, K], dtype=ACC)
            for q in tl.static_range(K):
                acol = tl.sum(tl.where(jj == q, Cm, 0.0), axis=2)
                prow = tl.sum(tl.where(ii == q, Pacc, 0.0), axis=1)
                new += acol[:, :, None] * prow[:, None, :]
            Pacc = new
    tl.store(LAST + cid[:, None] * M + k2, st, mask=m2)
    if WANT_P:
        tl.store(PROD + cid[:, None, None] * (M * M) + ii * M + jj, Pacc,
                 mask=rmask[:, None, None] & (ii < M) & (jj < M))


@triton.jit
def _comp_bwd_kernel(G, X, Y, H0, LR, DY, LAMIN, DG, DX, LAMOUT, RST,
                     T, N, R, L, C,
                     M: tl.constexpr, W: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
                     EPS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESET: tl.constexpr,
                     HAS_H0: tl.constexpr, CARRY_ONLY: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    ii = tl.arange(0, K)[None, :, None]
    jj = tl.arange(0, K)[None, None, :]
    k2 = tl.arange(0, K)[None, :]
    m2 = rmask[:, None] & (k2 < M)
    mg = rmask[:, None] & (k2 < W)
    cid = (b * C + c) * N + n
    carry = tl.load(LAMIN + cid[:, None] * M + k2, mask=m2, other=0.0).to(ACC)
    start = c * L
    end = tl.minimum(start + L, T)
    for i in range(0, end - start):
        step = end - 1 - i
        if REVERSE:
            t = T - 1 - step
        else:
            t = step
        tok = (b * T + t) * N + n
        keep = tl.full([BLOCK_R], 1.0, ACC)
        if HAS_RESET:
            keep = tl.where(tl.load(RST + b * T + t, mask=rmask, other=0) != 0, 0.0, 1.0).to(ACC)
        a, x, g, v, a0, P, s, S = _load_coeffs(G, X, tok, mg, rmask, k2, M, W, NORM, EPS, ACC)
        lam0 = tl.load(DY + tok, mask=rmask, other=0.0).to(ACC) + tl.sum(tl.where(k2 == 0, carry, 0.0), axis=1)
        lam = tl.where(k2 == 0, lam0[:, None], carry)
        if not CARRY_ONLY:
            # The state entering this step, rebuilt from y: entry k is y at scan step step-1-k,
            # zero before the last cut, h0[k - step] before the start.
            lr = tl.full([BLOCK_R], -1, tl.int32)
            if HAS_RESET:
                lr = tl.load(LR + b * T + (step - 1), mask=rmask & ((rows * 0 + step) > 0), other=-1)
            ys = step - 1 - k2
            if REVERSE:
                ty = T - 1 - ys
            else:
                ty = ys
            vy = m2 & (ys >= 0) & (ys >= lr[:, None])
            q = tl.load(Y + (b * T)[:, None] * N + ty * N + n[:, None], mask=vy, other=0.0).to(ACC)
            if HAS_H0:
                vh = m2 & (ys < 0) & (lr[:, None] < 0)
                q += tl.load(H0 + (b * N + n)[:, None] * M + (k2 - step), mask=vh, other=0.0).to(ACC)
            q = q * keep[:, None]
            da = lam0[:, None] * q
            if NORM == 0:
                tl.store(DG + tok[:, None] * W + k2, da, mask=mg)
                tl.store(DX + tok, lam0, mask=rmask)
            else:
                dP = tl.where(k2 < M, da, 0.0) + tl.where(k2 == M, (lam0 * v)[:, None], 0.0)
                dg = normalize_bwd(dP, P, s, S, g, 1, NORM)
                tl.store(DG + tok[:, None] * W + k2, dg, mask=mg)
                tl.store(DX + tok, lam0 * a0, mask=rmask)
        # C_t^T lam: (C^T lam)_j = a_j lam_0 + lam_{j+1}
        up = tl.sum(tl.where(jj == ii + 1, lam[:, None, :], 0.0), axis=2)
        carry = (a * lam0[:, None] + tl.where(k2 < M, up, 0.0)) * keep[:, None]
    tl.store(LAMOUT + cid[:, None] * M + k2, carry, mask=m2)


class _CompanionFn(torch.autograd.Function):
    """G = a (B, T, N, M) when NORM = 0, else logits (B, T, N, M + 1) with X = v."""

    @staticmethod
    def forward(ctx, G, X, h0, reverse, reset, NORM, chunk):
        B, T, N = X.shape
        W = G.shape[-1]
        M = W - 1 if NORM else W
        R = B * N
        dt = acc_dtype(G, X, h0)
        K, BLOCK_R, L, C, grid, warps = _launch_setup(G, M, W, NORM, T, R, chunk)
        G, X = G.contiguous(), X.contiguous()
        rst = reset.to(torch.int8).contiguous() if reset is not None else X
        h0c = h0.to(dt).contiguous() if h0 is not None else X.new_zeros(B, N, M, dtype=dt)
        y = X.new_empty(B, T, N, dtype=dt)
        last = X.new_empty(B, C, N, M, dtype=dt)
        common = dict(M=M, W=W, K=K, NORM=NORM, EPS=EPS, REVERSE=bool(reverse), HAS_RESET=reset is not None,
                      ACC=acc_triton_dtype(dt), BLOCK_R=BLOCK_R, **warps)
        with (torch.cuda.device(G.device) if G.is_cuda else _nullctx()):
            if C == 1:
                init, P = h0c[:, None], None
            else:
                P = X.new_empty(B, C, N, M, M, dtype=dt)
                zero = X.new_zeros(B, C, N, M, dtype=dt)
                _comp_fwd_kernel[grid](G, X, zero, y, last, P, rst, T, N, R, L, C,
                                       STORE_Y=False, WANT_P=True, **common)
                init = _fold_forward(P, last, h0c).contiguous()
            _comp_fwd_kernel[grid](G, X, init, y, last, y, rst, T, N, R, L, C,
                                   STORE_Y=True, WANT_P=False, **common)
        ctx.save_for_backward(G, X, h0, y, reset, P)
        ctx.cfg = (reverse, L, C, grid, common, dt)
        return y, last[:, C - 1]

    @staticmethod
    def backward(ctx, dy, dlast):
        G, X, h0, y, reset, P = ctx.saved_tensors
        reverse, L, C, grid, common, dt = ctx.cfg
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
        with (torch.cuda.device(G.device) if G.is_cuda else _nullctx()):
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


def companion_carry_triton(G: Tensor, X: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                           norm: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Carry (P, s) of a whole companion / H-LRU slice: s_last(h0) = P h0 + s. Forward only.

    norm=None: G = a (B, T, N, m), X = x (B, T, N); else G = logits (B, T, N, m + 1), X = v.
    -> P: (B, N, m, m) (product of the companion matrices in scan order), s: (B, N, m).
    """
    NORM = norm_code(norm)
    if NORM:
        check_hlru(G, X, None, reset)
    else:
        check_companion(G, X, None, reset)
    B, T, N = X.shape
    W = G.shape[-1]
    M = W - 1 if NORM else W
    R = B * N
    dt = acc_dtype(G, X)
    K, BLOCK_R, L, C, grid, warps = _launch_setup(G, M, W, NORM, T, R, T)
    G, X = G.detach().contiguous(), X.detach().contiguous()
    rst = reset.to(torch.int8).contiguous() if reset is not None else X
    P = X.new_empty(B, 1, N, M, M, dtype=dt)
    s = X.new_empty(B, 1, N, M, dtype=dt)
    zero = X.new_zeros(B, 1, N, M, dtype=dt)
    with (torch.cuda.device(G.device) if G.is_cuda else _nullctx()):
        _comp_fwd_kernel[grid](G, X, zero, s, s, P, rst, T, N, R, L, C, M=M, W=W, K=K, NORM=NORM, EPS=EPS,
                               REVERSE=bool(reverse), HAS_RESET=reset is not None, STORE_Y=False,
                               WANT_P=True, ACC=acc_triton_dtype(dt), BLOCK_R=BLOCK_R, **warps)
    return P[:, 0], s[:, 0]
