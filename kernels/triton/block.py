"""Triton block scan h_t = A_t h_{t-1} + u_t (DESIGN.md §3), forward and backward, and the fused
BD-LRU entry point that reads gate logits and normalises rows in registers.

One program owns BLOCK_R rows (a row is one (b, n) block) and walks time sequentially with the
m-vector state of every row in registers; transitions are read once, states written once, which
is the memory floor. With few rows and long T the time axis is cut into C chunks (two-level form):

  pass 1  every chunk scans from a zero state, keeping only its carry (P_c, s_c):
          P_c = A_end ... A_start, s_c = state at the chunk end  (what SP exchanges between ranks)
  fold    init_{c+1} = P_c init_c + s_c                           (C tiny steps, in torch)
  pass 2  every chunk scans again from init_c and writes h

The backward is the adjoint scan lam_t = g_t + A_{t+1}^T lam_{t+1} in the opposite direction,
dA_t = lam_t h_{t-1}^T, du_t = lam_t, dh0 = A_1^T lam_1, chunked the same way with the carry
(P_c^T, local adjoint). Fused gates are re-normalised in the backward, never stored.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..checks import acc_dtype, check_block, check_diag, check_reset
from ..gates import EPS, check_bdlru
from ._common import (acc_triton_dtype, block_rows, grid_and_warps, normalize, normalize_bwd, norm_code,
                      pick_chunk)

Tensor = torch.Tensor


@triton.jit
def _load_trans(G, U, goff, uoff, m3, m2, jj, rst_keep,
                M: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, HAS_RESET: tl.constexpr,
                ACC: tl.constexpr):
    """Transition tile A (R, K, K) and input u (R, K) of one step, plus what the backward needs."""
    g = tl.load(G + goff, mask=m3, other=0.0).to(ACC)
    v = tl.load(U + uoff, mask=m2, other=0.0).to(ACC)
    if NORM == 0:
        A = g
        a0 = v  # unused
        P = g
        s = g
        S = g
        u = v
    else:
        # columns only: padded rows normalise finite zeros (no 0/0), then are masked away
        P, s, S = normalize(g, jj < W, 2, NORM, EPS)
        P = tl.where(m3, P, 0.0)
        a0 = tl.sum(tl.where(jj == M, P, 0.0), axis=2)
        A = tl.where(jj < M, P, 0.0)
        u = a0 * v
    if HAS_RESET:
        A = A * rst_keep[:, None, None]
    return A, u, g, v, a0, P, s, S


@triton.jit
def _block_fwd_kernel(G, U, INIT, H, LAST, PROD, RST,
                      T, N, R, L, C,
                      M: tl.constexpr, W: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
                      EPS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESET: tl.constexpr,
                      STORE_H: tl.constexpr, WANT_P: tl.constexpr, ACC: tl.constexpr,
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
    m3 = rmask[:, None, None] & (ii < M) & (jj < W)
    cid = (b * C + c) * N + n  # (B, C, N) carry index
    h = tl.load(INIT + cid[:, None] * M + k2, mask=m2, other=0.0).to(ACC)
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
        keep = tl.full([BLOCK_R], 1.0, ACC)
        if HAS_RESET:
            keep = tl.where(tl.load(RST + b * T + t, mask=rmask, other=0) != 0, 0.0, 1.0).to(ACC)
        A, u, g, v, a0, P, s, S = _load_trans(G, U, tok[:, None, None] * (M * W) + ii * W + jj,
                                              tok[:, None] * M + k2, m3, m2, jj, keep,
                                              M, W, NORM, EPS, HAS_RESET, ACC)
        h = tl.sum(A * h[:, None, :], axis=2) + u
        if STORE_H:
            tl.store(H + tok[:, None] * M + k2, h, mask=m2)
        if WANT_P:
            # Pacc <- A @ Pacc, one column of A at a time (rank-1 updates keep the tile 3-D).
            new = tl.zeros([BLOCK_R, K, K], dtype=ACC)
            for q in tl.static_range(K):
                acol = tl.sum(tl.where(jj == q, A, 0.0), axis=2)
                prow = tl.sum(tl.where(ii == q, Pacc, 0.0), axis=1)
                new += acol[:, :, None] * prow[:, None, :]
            Pacc = new
    tl.store(LAST + cid[:, None] * M + k2, h, mask=m2)
    if WANT_P:
        tl.store(PROD + cid[:, None, None] * (M * M) + ii * M + jj, Pacc,
                 mask=rmask[:, None, None] & (ii < M) & (jj < M))


@triton.jit
def _block_bwd_kernel(G, U, H, H0, DH, LAMIN, DG, DU, LAMOUT, RST,
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
    m3 = rmask[:, None, None] & (ii < M) & (jj < W)
    cid = (b * C + c) * N + n
    carry = tl.load(LAMIN + cid[:, None] * M + k2, mask=m2, other=0.0).to(ACC)
    h0 = tl.zeros([BLOCK_R, K], dtype=ACC)
    if HAS_H0:
        h0 = tl.load(H0 + (b * N + n)[:, None] * M + k2, mask=m2, other=0.0).to(ACC)
    start = c * L
    end = tl.minimum(start + L, T)
    for i in range(0, end - start):
        step = end - 1 - i
        if REVERSE:
            t = T - 1 - step
            tp = t + 1
        else:
            t = step
            tp = t - 1
        tok = (b * T + t) * N + n
        keep = tl.full([BLOCK_R], 1.0, ACC)
        if HAS_RESET:
            keep = tl.where(tl.load(RST + b * T + t, mask=rmask, other=0) != 0, 0.0, 1.0).to(ACC)
        goff = tok[:, None, None] * (M * W) + ii * W + jj
        A, u, g, v, a0, P, s, S = _load_trans(G, U, goff, tok[:, None] * M + k2, m3, m2, jj, keep,
                                              M, W, NORM, EPS, HAS_RESET, ACC)
        lam = tl.load(DH + tok[:, None] * M + k2, mask=m2, other=0.0).to(ACC) + carry
        if not CARRY_ONLY:
            started = (k2 * 0 + step) > 0  # a tensor: a scalar condition in a mask trips the interpreter
            hp = tl.load(H + ((b * T + tp) * N + n)[:, None] * M + k2, mask=m2 & started, other=0.0).to(ACC)
            hp = tl.where(started, hp, h0)
            dA = lam[:, :, None] * hp[:, None, :]
            if HAS_RESET:
                dA = dA * keep[:, None, None]
            if NORM == 0:
                tl.store(DG + goff, dA, mask=m3)
                tl.store(DU + tok[:, None] * M + k2, lam, mask=m2)
            else:
                dP = tl.where(jj < M, dA, 0.0) + tl.where(jj == M, (lam * v)[:, :, None], 0.0)
                dg = normalize_bwd(dP, P, s, S, g, 2, NORM)
                tl.store(DG + goff, dg, mask=m3)
                tl.store(DU + tok[:, None] * M + k2, lam * a0, mask=m2)
        carry = tl.sum(A * lam[:, :, None], axis=1)  # A_t^T lam_t flows to the previous step
    tl.store(LAMOUT + cid[:, None] * M + k2, carry, mask=m2)


@triton.jit
def _fold_kernel(P, S, X0, OUT, C, N, R, M: tl.constexpr, K: tl.constexpr, BACKWARD: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sequential fold of chunk carries, one program per row tile (C small steps, no launches):
    forward  OUT_0 = X0,     OUT_{c+1} = P_c OUT_c + S_c
    backward OUT_{C-1} = X0, OUT_{c-1} = P_c^T OUT_c + S_c."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    ii = tl.arange(0, K)[None, :, None]
    jj = tl.arange(0, K)[None, None, :]
    k2 = tl.arange(0, K)[None, :]
    m2 = rmask[:, None] & (k2 < M)
    m3 = rmask[:, None, None] & (ii < M) & (jj < M)
    x = tl.load(X0 + (b * N + n)[:, None] * M + k2, mask=m2, other=0.0).to(ACC)
    for i in range(0, C):
        if BACKWARD:
            c = C - 1 - i
        else:
            c = i
        cid = (b * C + c) * N + n
        tl.store(OUT + cid[:, None] * M + k2, x, mask=m2)
        Pc = tl.load(P + cid[:, None, None] * (M * M) + ii * M + jj, mask=m3, other=0.0).to(ACC)
        sc = tl.load(S + cid[:, None] * M + k2, mask=m2, other=0.0).to(ACC)
        if BACKWARD:
            x = tl.sum(Pc * x[:, :, None], axis=1) + sc
        else:
            x = tl.sum(Pc * x[:, None, :], axis=2) + sc


def _fold(P: Tensor, S: Tensor, x0: Tensor, backward: bool) -> Tensor:
    """P: (B, C, N, M, M), S: (B, C, N, M), x0: (B, N, M) -> carries entering each chunk (B, C, N, M)."""
    B, C, N, M = S.shape
    K = triton.next_power_of_2(M)
    BLOCK_R = block_rows(K, B * N)
    out = torch.empty_like(S)
    grid, warps = grid_and_warps(B * N, 1, BLOCK_R, K)
    _fold_kernel[grid](P, S, x0.contiguous(), out, C, N, B * N, M=M, K=K, BACKWARD=backward,
                       ACC=acc_triton_dtype(S.dtype), BLOCK_R=BLOCK_R, **warps)
    return out


def _fold_forward(P: Tensor, s: Tensor, h0: Tensor) -> Tensor:
    """init_0 = h0, init_{c+1} = P_c init_c + s_c. P: (B, C, N, M, M), s: (B, C, N, M) -> (B, C, N, M)."""
    return _fold(P, s, h0, False)


def _fold_backward(P: Tensor, local: Tensor, lam_last: Tensor) -> Tensor:
    """Adjoint carries entering each chunk from its end: in_{C-1} = dh_last,
    in_c = P_{c+1}^T in_{c+1} + local_{c+1}. -> (B, C, N, M)."""
    return _fold(P, local, lam_last, True)


def _launch_setup(G: Tensor, M: int, W: int, NORM: int, T: int, R: int, chunk: Optional[int]):
    K = triton.next_power_of_2(W)
    BLOCK_R = block_rows(K, R)
    L, C = pick_chunk(T, R, BLOCK_R, G.device, chunk)
    grid, warps = grid_and_warps(R, C, BLOCK_R, K)
    return K, BLOCK_R, L, C, grid, warps


class _BlockScanFn(torch.autograd.Function):
    """G = A (B, T, N, M, M) when NORM = 0, else gate logits (B, T, N, M, M + 1) with U = v."""

    @staticmethod
    def forward(ctx, G, U, h0, reverse, reset, NORM, chunk):
        B, T, N, M = U.shape
        W = M + 1 if NORM else M
        R = B * N
        dt = acc_dtype(G, U, h0)
        ACC = acc_triton_dtype(dt)
        K, BLOCK_R, L, C, grid, warps = _launch_setup(G, M, W, NORM, T, R, chunk)
        G, U = G.contiguous(), U.contiguous()
        rst = reset.to(torch.int8).contiguous() if reset is not None else U
        h0c = h0.to(dt).contiguous() if h0 is not None else U.new_zeros(B, N, M, dtype=dt)
        h = U.new_empty(B, T, N, M, dtype=dt)
        last = U.new_empty(B, C, N, M, dtype=dt)
        common = dict(M=M, W=W, K=K, NORM=NORM, EPS=EPS, REVERSE=bool(reverse), HAS_RESET=reset is not None,
                      ACC=ACC, BLOCK_R=BLOCK_R, **warps)
        dev = torch.cuda.device(G.device) if G.is_cuda else _nullctx()
        with dev:
            if C == 1:
                init, P = h0c[:, None], None
            else:
                P = U.new_empty(B, C, N, M, M, dtype=dt)
                zero = U.new_zeros(B, C, N, M, dtype=dt)
                _block_fwd_kernel[grid](G, U, zero, h, last, P, rst, T, N, R, L, C,
                                        STORE_H=False, WANT_P=True, **common)
                init = _fold_forward(P, last, h0c).contiguous()
            _block_fwd_kernel[grid](G, U, init, h, last, h, rst, T, N, R, L, C,
                                    STORE_H=True, WANT_P=False, **common)
        ctx.save_for_backward(G, U, h0, h, reset, P)
        ctx.cfg = (reverse, NORM, L, C, grid, common, dt)
        return h, last[:, C - 1]

    @staticmethod
    def backward(ctx, dh, dlast):
        G, U, h0, h, reset, P = ctx.saved_tensors
        reverse, NORM, L, C, grid, common, dt = ctx.cfg
        B, T, N, M = U.shape
        R = B * N
        dh = dh.to(dt).contiguous()
        dlast = dlast.to(dt)
        rst = reset.to(torch.int8).contiguous() if reset is not None else U
        h0c = h0.to(dt).contiguous() if h0 is not None else U
        dG = torch.empty_like(G)
        dU = torch.empty_like(U)
        lamout = U.new_empty(B, C, N, M, dtype=dt)
        dev = torch.cuda.device(G.device) if G.is_cuda else _nullctx()
        with dev:
            if C == 1:
                lamin = dlast[:, None].contiguous()
            else:
                zero = U.new_zeros(B, C, N, M, dtype=dt)
                _block_bwd_kernel[grid](G, U, h, h0c, dh, zero, dG, dU, lamout, rst, T, N, R, L, C,
                                        HAS_H0=h0 is not None, CARRY_ONLY=True, **common)
                lamin = _fold_backward(P, lamout, dlast).contiguous()
            _block_bwd_kernel[grid](G, U, h, h0c, dh, lamin, dG, dU, lamout, rst, T, N, R, L, C,
                                    HAS_H0=h0 is not None, CARRY_ONLY=False, **common)
        dh0 = lamout[:, 0].to(h0.dtype) if h0 is not None and ctx.needs_input_grad[2] else None
        return dG, dU, dh0, None, None, None, None


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def block_scan_triton(A: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                      chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Triton block scan, same contract as block_scan_ref (DESIGN.md §3), differentiable.

    A: (B, T, N, m, m)  u: (B, T, N, m)  h0: (B, N, m) or None  ->  h: (B, T, N, m), h_last: (B, N, m)
    State and outputs in fp32 (fp64 for fp64 inputs). chunk: steps per chunk of the two-level
    form (None: automatic on CUDA, one chunk elsewhere).
    """
    check_block(A, u, h0)
    return _BlockScanFn.apply(A, u, h0, bool(reverse), None, 0, chunk)


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


def bdlru_scan_triton(logits: Tensor, v: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                      reset: Optional[Tensor] = None, norm: str = "softmax",
                      chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Fused BD-LRU scan: rows of logits normalised in registers, A_t never written to memory.

    logits: (B, T, N, m, m + 1)  v: (B, T, N, m)  h0: (B, N, m)  reset: (B, T) bool, zeroes A_t
    -> h: (B, T, N, m), h_last: (B, N, m). Matches gates.bdlru_scan_reference.
    """
    NORM = norm_code(norm)
    check_bdlru(logits, v, h0, reset)
    return _BlockScanFn.apply(logits, v, h0, bool(reverse), reset, NORM, chunk)


def block_carry_triton(G: Tensor, U: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                       norm: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Carry of a whole slice, what sequence parallelism exchanges: (P, s) with
    h_last(h0) = P h0 + s. Pass 1 of the two-level form with one chunk. Forward only.

    norm=None: G = A (B, T, N, m, m), U = u (B, T, N, m); else G = gate logits (B, T, N, m, m + 1),
    U = v, normalised with `norm`. reset (B, T) bool zeroes A_t.
    -> P: (B, N, m, m) (A_T ... A_1; reverse A_1 ... A_T), s: (B, N, m).
    """
    NORM = norm_code(norm)
    if NORM:
        check_bdlru(G, U, None, reset)
    else:
        check_block(G, U, None)
        check_reset(reset, U.shape[0], U.shape[1])
    B, T, N, M = U.shape
    W = M + 1 if NORM else M
    R = B * N
    dt = acc_dtype(G, U)
    K, BLOCK_R, L, C, grid, warps = _launch_setup(G, M, W, NORM, T, R, T)
    G, U = G.detach().contiguous(), U.detach().contiguous()
    rst = reset.to(torch.int8).contiguous() if reset is not None else U
    P = U.new_empty(B, 1, N, M, M, dtype=dt)
    s = U.new_empty(B, 1, N, M, dtype=dt)
    zero = U.new_zeros(B, 1, N, M, dtype=dt)
    with (torch.cuda.device(G.device) if G.is_cuda else _nullctx()):
        _block_fwd_kernel[grid](G, U, zero, s, s, P, rst, T, N, R, L, C, M=M, W=W, K=K, NORM=NORM, EPS=EPS,
                                REVERSE=bool(reverse), HAS_RESET=reset is not None, STORE_H=False,
                                WANT_P=True, ACC=acc_triton_dtype(dt), BLOCK_R=BLOCK_R, **warps)
    return P[:, 0], s[:, 0]
