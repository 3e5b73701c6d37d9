"""Linear-recurrence scans (DESIGN.md §3): references, the fast CPU path, Triton kernels.

    block_scan(A, u, h0=None, reverse=False) -> (h, h_last)
      A: (B, T, N, m, m)  u: (B, T, N, m)  h0: (B, N, m) or None  ->  h: (B, T, N, m), h_last: (B, N, m)

`diag_scan` (m = 1) and `companion_scan` (H-LRU) keep the same h0 / h_last / reverse semantics.
The ops in `ops` (BLOCK, DIAG, COMPANION) are what the model's mixers call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import ops
from .ops import BLOCK, COMPANION, DIAG, ScanOp, get_backend, set_backend
from .reference import (block_product_ref, block_scan_ref, companion_matrix, companion_scan_ref,
                        diag_scan_ref)

Tensor = torch.Tensor


def block_scan(A: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """h_t = A_t h_{t-1} + u_t per block (reverse: h_t = A_t h_{t+1} + u_t); see module doc."""
    return block_scan_ref(A, u, h0, reverse)


def diag_scan(a: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + u_t elementwise. a, u: (B, T, N), h0: (B, N)."""
    return diag_scan_ref(a, u, h0, reverse)


def companion_scan(a: Tensor, x: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                   reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """y_t = sum_k a_t[k-1] y_{t-k} + x_t. a: (B, T, N, m), x: (B, T, N) -> y (B, T, N), state (B, N, m)."""
    return companion_scan_ref(a, x, h0, reverse, reset)


def block_product(A: Tensor, reverse: bool = False) -> Tensor:
    """State map of a whole slice: A_T ... A_1 (reverse: A_1 ... A_T). (B, T, N, m, m) -> (B, N, m, m)."""
    return block_product_ref(A, reverse)


__all__ = [
    "block_scan", "diag_scan", "companion_scan", "block_product",
    "block_scan_ref", "diag_scan_ref", "companion_scan_ref", "block_product_ref", "companion_matrix",
    "ops", "ScanOp", "BLOCK", "DIAG", "COMPANION", "set_backend", "get_backend",
]
