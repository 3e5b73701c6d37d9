"""Pieces shared by the Triton scan kernels: in-register gate normalisations, launch choices.

The normalisation codes match llm_lru.kernels.gates.NORMS: 0 = none (transitions given),
1 softmax, 2 sigmoid/sum, 3 relu/sum, 4 tanh/sum|.|. The gates module is the definition; these
jit functions are tested against it.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..gates import EPS, NORMS, check_norm

NORM_CODE = {name: i + 1 for i, name in enumerate(NORMS)}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def norm_code(norm: Optional[str]) -> int:
    """'softmax' -> 1, ...; None -> 0 (transitions given, no normalisation)."""
    if norm is None:
        return 0
    check_norm(norm)
    return NORM_CODE[norm]


@triton.jit
def normalize(g, valid, AXIS: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr):
    """Normalise g over AXIS where `valid`; returns (P, s, S): P = s / S (S broadcast, keepdims)."""
    if NORM == 1:
        gm = tl.where(valid, g, float("-inf"))
        mx = tl.expand_dims(tl.max(gm, axis=AXIS), AXIS)
        s = tl.where(valid, tl.exp(gm - mx), 0.0)
        S = tl.expand_dims(tl.sum(s, axis=AXIS), AXIS)
    elif NORM == 2:
        s = tl.where(valid, tl.sigmoid(g), 0.0)
        S = tl.expand_dims(tl.sum(s, axis=AXIS), AXIS)
    elif NORM == 3:
        s = tl.where(valid, tl.maximum(g, 0.0), 0.0)
        S = tl.expand_dims(tl.sum(s, axis=AXIS), AXIS) + EPS
    else:
        s = tl.where(valid, 2.0 * tl.sigmoid(2.0 * g) - 1.0, 0.0)  # tanh
        S = tl.expand_dims(tl.sum(tl.abs(s), axis=AXIS), AXIS) + EPS
    return s / S, s, S


@triton.jit
def normalize_bwd(dP, P, s, S, g, AXIS: tl.constexpr, NORM: tl.constexpr):
    """Gradient of the logits g from dL/dP (recomputed P, s, S from `normalize`)."""
    dot = tl.expand_dims(tl.sum(dP * P, axis=AXIS), AXIS)
    if NORM == 1:
        dg = (dP - dot) * P
    elif NORM == 2:
        dg = (dP - dot) / S * s * (1.0 - s)
    elif NORM == 3:
        dg = tl.where(g > 0.0, (dP - dot) / S, 0.0)
    else:
        sgn = tl.where(s > 0.0, 1.0, tl.where(s < 0.0, -1.0, 0.0))
        dg = (dP - sgn * dot) / S * (1.0 - s * s)
    return dg


def acc_triton_dtype(dt: torch.dtype):
    """Triton dtype of the state: fp32, fp64 only when the inputs are fp64."""
    return tl.float64 if dt == torch.float64 else tl.float32


def block_rows(K: int, R: int) -> int:
    """Rows per program: keep a (rows, K, K) tile near 4K elements (registers on a GPU)."""
    cap = max(1, min(256, 4096 // (K * K)))
    return max(1, min(cap, triton.next_power_of_2(R)))


def num_warps_for(BLOCK_R: int, K: int) -> int:
    return 4 if BLOCK_R * K * K >= 1024 else (2 if BLOCK_R * K * K >= 256 else 1)


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


def grid_and_warps(R: int, C: int, BLOCK_R: int, K: int):
    return (triton.cdiv(R, BLOCK_R), C), ({} if INTERPRET else {"num_warps": num_warps_for(BLOCK_R, K)})


def scan_order_last_cut(reset: torch.Tensor, reverse: bool) -> torch.Tensor:
    """(B, T) int32: per scan step s, the last step <= s whose transition is cut, or -1."""
    B, T = reset.shape
    cut = reset.flip(1) if reverse else reset
    steps = torch.arange(T, device=reset.device, dtype=torch.int64).expand(B, T)
    return torch.where(cut, steps, torch.full_like(steps, -1)).cummax(1).values.to(torch.int32).contiguous()
