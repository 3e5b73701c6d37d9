"""Pieces shared by the Triton scan kernels: per-thread gate normalisations, tuple helpers,
launch choices.

Every kernel gives each row (one (b, n) block) to one thread: the row's m-vector state, its
transition rows and its gate rows are tuples of (BLOCK_R,) vectors unrolled over m, so the time
loop is elementwise, with no cross-thread reduction (no shuffles, no barriers), the way fla's
fused_recurrent kernels keep theirs. The tuple lengths are constexprs (m, m + 1): nothing is
padded to a power of two.

The normalisation codes match llm_lru.kernels.gates.NORMS: 0 = none (transitions given),
1 softmax, 2 sigmoid/sum, 3 relu/sum, 4 tanh/sum|.|, 5 lin_l1 (g/sum|g|). The gates module is the definition; these
jit functions are tested against it through the fused scans.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..gates import NORMS, check_norm

NORM_CODE = {name: i + 1 for i, name in enumerate(NORMS)}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# One row per thread: 4 warps of 32 rows. Fewer rows get a smaller tile (the grid, and
# pick_chunk's time split, fill the GPU instead).
ROWS_PER_WARP = 32
MAX_WARPS = 4
# P columns one program carries in a chunk's carry pass: 2 x m x NCOL accumulators (old and new
# product rows) stay near 64 registers for every m, so m = 8 and 16 split the columns over programs.
# The companion carry gets half (ptxas spilled its m = 8, 4-column form for sm_80 at 72 registers).
P_REGS = 32


def norm_code(norm: Optional[str]) -> int:
    """'softmax' -> 1, ...; None -> 0 (transitions given, no normalisation)."""
    if norm is None:
        return 0
    check_norm(norm)
    return NORM_CODE[norm]


@triton.jit
def zeros_tuple(like, N: tl.constexpr):
    """A tuple of N zero vectors shaped like `like`."""
    out = ()
    for _i in tl.static_range(N):
        out = out + (tl.zeros_like(like),)
    return out


@triton.jit
def load_tuple(ptr, off, mask, N: tl.constexpr, ACC: tl.constexpr):
    """(ptr[off + 0], ..., ptr[off + N - 1]) as ACC vectors: one thread reads its row's N values."""
    out = ()
    for j in tl.static_range(N):
        out = out + (tl.load(ptr + off + j, mask=mask, other=0.0).to(ACC),)
    return out


@triton.jit
def store_tuple(ptr, off, x, mask, N: tl.constexpr):
    for j in tl.static_range(N):
        tl.store(ptr + off + j, x[j], mask=mask)


@triton.jit
def normalize(g, W: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr):
    """Normalise one gate row g (a tuple of W vectors); returns (P, s, S) with P_j = s_j / S."""
    s = ()
    S = tl.zeros_like(g[0])
    if NORM == 1:
        mx = g[0]
        for j in tl.static_range(1, W):
            mx = tl.maximum(mx, g[j])
        for j in tl.static_range(W):
            e = tl.exp(g[j] - mx)
            s = s + (e,)
            S += e
    elif NORM == 2:
        for j in tl.static_range(W):
            e = tl.sigmoid(g[j])
            s = s + (e,)
            S += e
    elif NORM == 3:
        for j in tl.static_range(W):
            e = tl.maximum(g[j], 0.0)
            s = s + (e,)
            S += e
        S += EPS
    else:
        for j in tl.static_range(W):
            if NORM == 4:
                e = 2.0 * tl.sigmoid(2.0 * g[j]) - 1.0  # tanh
            else:
                e = g[j]  # lin_l1: the logits themselves
            s = s + (e,)
            S += tl.abs(e)
        S += EPS
    inv = 1.0 / S
    P = ()
    for j in tl.static_range(W):
        P = P + (s[j] * inv,)
    return P, s, S


@triton.jit
def normalize_bwd(dP, P, s, S, g, W: tl.constexpr, NORM: tl.constexpr):
    """Gradient of the logits row g (tuple of W) from dL/dP (P, s, S recomputed by `normalize`)."""
    dot = tl.zeros_like(S)
    for j in tl.static_range(W):
        dot += dP[j] * P[j]
    inv = 1.0 / S
    dg = ()
    for j in tl.static_range(W):
        if NORM == 1:
            d = (dP[j] - dot) * P[j]
        elif NORM == 2:
            d = (dP[j] - dot) * inv * s[j] * (1.0 - s[j])
        elif NORM == 3:
            d = tl.where(g[j] > 0.0, (dP[j] - dot) * inv, 0.0)
        else:  # tanh, lin_l1: dS/ds_j = sign(s_j); tanh also ds/dg = 1 - s^2
            sgn = tl.where(s[j] > 0.0, 1.0, tl.where(s[j] < 0.0, -1.0, 0.0))
            d = (dP[j] - sgn * dot) * inv
            if NORM == 4:
                d = d * (1.0 - s[j] * s[j])
        dg = dg + (d,)
    return dg


@triton.jit
def tile_rows(R, N, BLOCK_R: tl.constexpr, pid):
    """The rows of tile `pid`: (rows, mask, b, n), b and n as int64 for the offsets."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    return rows, rmask, (rows // N).to(tl.int64), (rows % N).to(tl.int64)


@triton.jit
def carry_index(b, c, n, C, N):
    """Index of row (b, n)'s chunk c in the (B, C, N) carry tensors, as int32: a value the kernel
    keeps across the time loop for the final store, and int64 made ptxas spill it (8 B of stack at
    m = 8 with resets on sm_90). Launch checks that B * C * N * M * M fits int32."""
    return ((b * C + c) * N + n).to(tl.int32)


def acc_triton_dtype(dt: torch.dtype):
    """Triton dtype of the state: fp32, fp64 only when the inputs are fp64."""
    return tl.float64 if dt == torch.float64 else tl.float32


def block_rows(R: int) -> int:
    """Rows per program (one per thread): 32 x warps, fewer for a small R."""
    return max(ROWS_PER_WARP, min(ROWS_PER_WARP * MAX_WARPS, triton.next_power_of_2(R)))


def num_warps_for(BLOCK_R: int) -> int:
    return max(1, BLOCK_R // ROWS_PER_WARP)


def p_columns(M: int, companion: bool = False) -> int:
    """Columns of the chunk product one program carries (see P_REGS)."""
    return max(1, min(M, (P_REGS // 2 if companion else P_REGS) // M))


def pick_chunk(T: int, R: int, BLOCK_R: int, device: torch.device, chunk: Optional[int]) -> Tuple[int, int]:
    """(chunk length L, number of chunks C). Explicit `chunk` wins; on CUDA, split T when the
    row tiles alone cannot fill the GPU (few B x N), keeping chunks >= 256 steps."""
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError(f"chunk: expected a positive chunk length, got {chunk}")
        L = min(int(chunk), T)
    elif device.type == "cuda":
        tiles = triton.cdiv(R, BLOCK_R)
        want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        C = max(1, min(triton.cdiv(want, tiles), T // 256))
        L = triton.cdiv(T, C)
    else:
        L = T
    return L, triton.cdiv(T, L)


def launch_options(BLOCK_R: int) -> dict:
    """num_warps for a launch (the interpreter takes none)."""
    return {} if INTERPRET else {"num_warps": num_warps_for(BLOCK_R)}


def scan_order_last_cut(reset: torch.Tensor, reverse: bool) -> torch.Tensor:
    """(B, T) int32: per scan step s, the last step <= s whose transition is cut, or -1."""
    B, T = reset.shape
    cut = reset.flip(1) if reverse else reset
    steps = torch.arange(T, device=reset.device, dtype=torch.int64).expand(B, T)
    return torch.where(cut, steps, torch.full_like(steps, -1)).cummax(1).values.to(torch.int32).contiguous()
