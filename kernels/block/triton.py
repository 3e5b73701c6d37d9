"""Triton block scan h_t = A_t h_{t-1} + u_t (DESIGN.md §3), forward and backward, and the fused
BD-LRU entry point that reads gate logits and normalises rows in registers.

One program owns BLOCK_R rows (a row is one (b, n) block), one row per thread, and walks time
sequentially with the row's m-vector state in that thread's registers (tuples unrolled over m,
see common/triton.py): the loop has no cross-thread reduction; transitions are read once, states written
once, which is the memory floor. With few rows and long T the time axis is cut into C chunks:

  pass 1  every chunk scans from a zero state, keeping only its carry (P_c, s_c):
          P_c = A_end ... A_start, s_c = state at the chunk end  (what SP exchanges between ranks);
          P_c's columns evolve as p <- A_t p, a few columns per program (Launch.NCOL)
  fold    init_{c+1} = P_c init_c + s_c                           (C small steps, one kernel)
  pass 2  every chunk scans again from init_c and writes h

The backward is the adjoint scan lam_t = g_t + A_{t+1}^T lam_{t+1} in the opposite direction,
dA_t = lam_t h_{t-1}^T, du_t = lam_t, dh0 = A_1^T lam_1, chunked the same way with the carry
(P_c^T, local adjoint). Fused gates are re-normalised in the backward, never stored.

The split-phase form (the kernels' own two levels cut where the carry enters): BlockTritonLocal,
`block_local_triton`, see common.triton.TritonLocal.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..common.scan import LocalScan, ScanOp, acc_dtype, check_block, check_reset
from ..common.triton import (Launch, TritonLocal, _device, _dot, _fold_backward, _fold_forward, load_tuple, normalize,
                             normalize_bwd, norm_code, scan_meta, store_tuple, tile_rows, zeros_tuple, carry_index)
from .reference import check_bdlru

Tensor = torch.Tensor


@triton.jit
def _trans_row(G, U, tok, i, rmask, M: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
               EPS: tl.constexpr, ACC: tl.constexpr):
    """Row i of one step's transition, in the thread that owns the row: a (tuple of M), u_i, and
    what the backward needs (logits g, v_i, a0_i, normalised P, s, S; unused when NORM = 0)."""
    g = load_tuple(G, tok * (M * W) + i * W, rmask, W, ACC)
    v = tl.load(U + tok * M + i, mask=rmask, other=0.0).to(ACC)
    if NORM == 0:
        a = g
        u = v
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
        u = a0 * v
    return a, u, g, v, a0, P, s, S


@triton.jit
def _block_fwd_kernel(G, U, INIT, H, LAST, PROD, RST,
                      T, N, R, L, C,
                      M: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                      EPS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESET: tl.constexpr,
                      STORE_H: tl.constexpr, WANT_P: tl.constexpr, NCOL: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """One chunk of h_t = A_t h_{t-1} + u_t per row. WANT_P: also the chunk product P = A_end ...
    A_start, columns [grp * NCOL, grp * NCOL + NCOL) of it in this program (each column evolves
    as p <- A_t p, so it is the product, one matrix-vector step per time step)."""
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
    h = load_tuple(INIT, cid * M, rmask, M, ACC)
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
        if HAS_RESET:  # a predicate, not a 0/1 float: one register fewer (bf16 reverse m = 8 then
            # fits 32 registers without ptxas spilling the carry index to reach them)
            cut = tl.load(RST + b * T + t, mask=rmask, other=0) != 0
        hn = ()
        Pn = ()
        for i in tl.static_range(M):
            a, u, g, v, a0, P, s, S = _trans_row(G, U, tok, i, rmask, M, W, NORM, EPS, ACC)
            acc = _dot(a, h, M)
            if HAS_RESET:
                acc = tl.where(cut, 0.0, acc)
            hn = hn + (acc + u,)
            if STORE_H:  # row by row: the next row's loads stay behind this store (ptxas hoisted
                # all m (m + 1) loads of a step above the stores at m = 8 in reverse, and spilled)
                tl.store(H + tok * M + i, acc + u, mask=rmask)
            if WANT_P:
                for q in tl.static_range(NCOL):
                    pacc = a[0] * Pt[q]
                    for j in tl.static_range(1, M):
                        pacc += a[j] * Pt[j * NCOL + q]
                    if HAS_RESET:
                        pacc = tl.where(cut, 0.0, pacc)
                    Pn = Pn + (pacc,)
        h = hn
        if WANT_P:
            Pt = Pn
    store_tuple(LAST, cid * M, h, rmask & (rows * 0 + grp == 0), M)
    if WANT_P:
        for j in tl.static_range(M):
            for q in tl.static_range(NCOL):
                tl.store(PROD + cid * (M * M) + j * M + k0 + q, Pt[j * NCOL + q], mask=rmask & (rows * 0 + k0 + q < M))


@triton.jit
def _block_bwd_kernel(G, U, H, H0, DH, LAMIN, DG, DU, LAMOUT, RST,
                      T, N, R, L, C,
                      M: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                      EPS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESET: tl.constexpr,
                      HAS_H0: tl.constexpr, CARRY_ONLY: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """One chunk of the adjoint lam_t = dh_t + A_{t+1}^T lam_{t+1}, in reverse scan order, with
    dA_t = lam_t h_{t-1}^T (or the logits' gradient) and du_t; CARRY_ONLY: only the adjoint."""
    c = tl.program_id(1)
    rows, rmask, b, n = tile_rows(R, N, BLOCK_R, tl.program_id(0))
    cid = carry_index(b, c, n, C, N)
    carry = load_tuple(LAMIN, cid * M, rmask, M, ACC)
    if HAS_H0:
        h0 = load_tuple(H0, (b * N + n) * M, rmask, M, ACC)
    else:
        h0 = zeros_tuple(tl.zeros([BLOCK_R], dtype=ACC), M)
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
        if HAS_RESET:
            keep = tl.where(tl.load(RST + b * T + t, mask=rmask, other=0) != 0, 0.0, 1.0).to(ACC)
        lam = ()
        for j in tl.static_range(M):
            lam = lam + (tl.load(DH + tok * M + j, mask=rmask, other=0.0).to(ACC) + carry[j],)
        if not CARRY_ONLY:
            started = (rows * 0 + step) > 0  # a tensor: a scalar condition in a mask trips the interpreter
            hp = ()
            for j in tl.static_range(M):
                x = tl.load(H + ((b * T + tp) * N + n) * M + j, mask=rmask & started, other=0.0).to(ACC)
                hp = hp + (tl.where(started, x, h0[j]),)
        cn = zeros_tuple(lam[0], M)
        for r in tl.static_range(M):
            a, u, g, v, a0, P, s, S = _trans_row(G, U, tok, r, rmask, M, W, NORM, EPS, ACC)
            if not CARRY_ONLY:
                lr = lam[r]
                if HAS_RESET:
                    lr = lr * keep
                dA = ()
                for j in tl.static_range(M):
                    dA = dA + (lr * hp[j],)
                if NORM == 0:
                    store_tuple(DG, tok * (M * W) + r * W, dA, rmask, M)
                    tl.store(DU + tok * M + r, lam[r], mask=rmask)
                else:
                    dg = normalize_bwd(dA + (lam[r] * v,), P, s, S, g, W, NORM)
                    store_tuple(DG, tok * (M * W) + r * W, dg, rmask, W)
                    tl.store(DU + tok * M + r, lam[r] * a0, mask=rmask)
            nxt = ()  # A_t^T lam_t, row r's share
            for j in tl.static_range(M):
                nxt = nxt + (cn[j] + a[j] * lam[r],)
            cn = nxt
        if HAS_RESET:
            nxt = ()
            for j in tl.static_range(M):
                nxt = nxt + (cn[j] * keep,)
            cn = nxt
        carry = cn
    store_tuple(LAMOUT, cid * M, carry, rmask, M)


class _BlockScanFn(torch.autograd.Function):
    """G = A (B, T, N, M, M) when NORM = 0, else gate logits (B, T, N, M, M + 1) with U = v."""

    @staticmethod
    def forward(ctx, G, U, h0, reverse, reset, NORM, chunk):
        B, T, N, M = U.shape
        W = M + 1 if NORM else M
        R = B * N
        dt = acc_dtype(G, U, h0)
        lc = Launch(M, R, T, G.device, chunk)
        L, C = lc.L, lc.C
        G, U = G.contiguous(), U.contiguous()
        rst = reset.to(torch.int8).contiguous() if reset is not None else U
        h0c = h0.to(dt).contiguous() if h0 is not None else U.new_zeros(B, N, M, dtype=dt)
        h = U.new_empty(B, T, N, M, dtype=dt)
        last = U.new_empty(B, C, N, M, dtype=dt)
        common = dict(scan_meta(M, W, NORM, reverse, reset is not None, dt, lc), **lc.opts)
        with _device(G):
            if C == 1:
                init, P = h0c[:, None], None
            else:
                P = U.new_empty(B, C, N, M, M, dtype=dt)
                zero = U.new_zeros(B, C, N, M, dtype=dt)
                _block_fwd_kernel[lc.grid(M, True)](G, U, zero, h, last, P, rst, T, N, R, L, C,
                                                    STORE_H=False, WANT_P=True, NCOL=lc.NCOL, **common)
                init = _fold_forward(P, last, h0c).contiguous()
            _block_fwd_kernel[lc.grid(M, False)](G, U, init, h, last, h, rst, T, N, R, L, C,
                                                 STORE_H=True, WANT_P=False, NCOL=1, **common)
        ctx.save_for_backward(G, U, h0, h, reset, P)
        ctx.cfg = (lc, common, dt)
        return h, last[:, C - 1]

    @staticmethod
    def backward(ctx, dh, dlast):
        G, U, h0, h, reset, P = ctx.saved_tensors
        lc, common, dt = ctx.cfg
        L, C = lc.L, lc.C
        B, T, N, M = U.shape
        R = B * N
        dh = dh.to(dt).contiguous()
        dlast = dlast.to(dt)
        rst = reset.to(torch.int8).contiguous() if reset is not None else U
        h0c = h0.to(dt).contiguous() if h0 is not None else U
        dG = torch.empty_like(G)
        dU = torch.empty_like(U)
        lamout = U.new_empty(B, C, N, M, dtype=dt)
        grid = lc.grid(M, False)
        with _device(G):
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


def block_scan_triton(A: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                      chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Triton block scan, same contract as block_scan_ref (DESIGN.md §3), differentiable.

    A: (B, T, N, m, m)  u: (B, T, N, m)  h0: (B, N, m) or None  ->  h: (B, T, N, m), h_last: (B, N, m)
    State and outputs in fp32 (fp64 for fp64 inputs). chunk: steps per chunk of the two-level
    form (None: automatic on CUDA, one chunk elsewhere).
    """
    check_block(A, u, h0)
    return _BlockScanFn.apply(A, u, h0, bool(reverse), None, 0, chunk)


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


class BlockTritonLocal(TritonLocal):
    """The split block scan on the block kernels (common.triton.TritonLocal)."""

    def fwd_kernel(self):
        return _block_fwd_kernel

    def launch_bwd(self, grid, G, U, h, h0, lr, dh, lamin, dG, dU, lamout, rst, flags):
        B, T, N = self.shape
        _block_bwd_kernel[grid](G, U, h, h0, dh, lamin, dG, dU, lamout, rst, T, N, B * N, self.lc.L, self.lc.C, **flags)


def block_local_triton(G: Tensor, U: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                       norm: Optional[str] = None, op: Optional[ScanOp] = None,
                       chunk: Optional[int] = None) -> LocalScan:
    """The split block scan (common.scan.LocalScan). norm=None: G = A (B, T, N, m, m), U = u (B, T, N, m);
    else G = gate logits (B, T, N, m, m + 1), U = v (the fused BD-LRU). reset (B, T) bool zeroes A_t.
    op: the ScanOp whose apply_t serves LocalGrad.h0_grad (the block layout's by default); chunk: steps per
    chunk (None: automatic on CUDA, one chunk elsewhere)."""
    NORM = norm_code(norm)
    if NORM:
        check_bdlru(G, U, None, reset)
    else:
        check_block(G, U, None)
        check_reset(reset, U.shape[0], U.shape[1])
    return BlockTritonLocal(op or ScanOp(), G, U, reverse, reset, NORM, U.shape[-1], chunk)
