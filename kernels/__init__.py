"""Linear-recurrence scans (DESIGN.md §3): references, the fast CPU path, Triton kernels.

    block_scan(A, u, h0=None, reverse=False) -> (h, h_last)
      A: (B, T, N, m, m)  u: (B, T, N, m)  h0: (B, N, m) or None  ->  h: (B, T, N, m), h_last: (B, N, m)

`diag_scan` (m = 1) and `companion_scan` (H-LRU) keep the same h0 / h_last / reverse semantics.
The model's mixers call ScanOps, never these functions: LRU and BLUR `ops.BLOCK`, GLRU `ops.DIAG`,
BD-LRU and H-LRU `gated.GatedBlockScan` / `gated.GatedCompanionScan` (gate logits in; they run
BLOCK / COMPANION, or the fused Triton kernels). Each op also splits into the two explicit
halves that sequence parallelism needs (`op.local(...)` / `part.finish(h0)`, see ops.py).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from . import chunked, ops
from .chunked import (block_product_tree, block_scan_chunked, companion_product_chunked, companion_scan_chunked,
                      diag_scan_chunked)
from .ops import BLOCK, COMPANION, DIAG, ScanOp, get_backend, set_backend, transition_mask
from .reference import (block_product_ref, block_scan_ref, companion_matrix, companion_scan_ref,
                        diag_scan_ref)

Tensor = torch.Tensor
_warned_no_triton = False


def backend_for(*tensors: Optional[Tensor]) -> str:
    """The backend that runs a scan on these tensors: "ref", "torch" or "triton".

    "auto" means Triton for CUDA tensors and the chunked PyTorch path elsewhere; on CUDA without
    an installed `triton` it falls back to the chunked path (with one warning).
    """
    global _warned_no_triton
    name = get_backend()
    if name != "auto":
        return name
    if not any(t is not None and t.is_cuda for t in tensors):
        return "torch"
    try:
        import triton  # noqa: F401  (only probed for CUDA tensors: CPU users never import it)
    except ImportError:
        if not _warned_no_triton:
            warnings.warn("scan backend auto: triton is not installed, CUDA scans use the PyTorch path")
            _warned_no_triton = True
        return "torch"
    return "triton"


def _triton():
    """The Triton kernels, imported on first use only."""
    from . import triton as kernels_triton
    return kernels_triton


def block_scan(A: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """h_t = A_t h_{t-1} + u_t per block (reverse: h_t = A_t h_{t+1} + u_t); see module doc."""
    backend = backend_for(A, u, h0)
    if backend == "ref":
        return block_scan_ref(A, u, h0, reverse)
    if backend == "triton":
        return _triton().block_scan_triton(A, u, h0, reverse)
    return block_scan_chunked(A, u, h0, reverse)


def diag_scan(a: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + u_t elementwise. a, u: (B, T, N), h0: (B, N)."""
    backend = backend_for(a, u, h0)
    if backend == "ref":
        return diag_scan_ref(a, u, h0, reverse)
    if backend == "triton":
        return _triton().diag_scan_triton(a, u, h0, reverse)
    return diag_scan_chunked(a, u, h0, reverse)


def companion_scan(a: Tensor, x: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                   reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """y_t = sum_k a_t[k-1] y_{t-k} + x_t. a: (B, T, N, m), x: (B, T, N) -> y (B, T, N), state (B, N, m).

    reset: (B, T) bool per-step cuts (reset[b, t] zeroes the whole transition of step t) or None.
    """
    backend = backend_for(a, x, h0)
    if backend == "ref":
        return companion_scan_ref(a, x, h0, reverse, reset)
    if backend == "triton":
        return _triton().companion_scan_triton(a, x, h0, reverse, reset)
    return companion_scan_chunked(a, x, h0, reverse, reset)


def block_product(A: Tensor, reverse: bool = False) -> Tensor:
    """State map of a whole slice: A_T ... A_1 (reverse: A_1 ... A_T). (B, T, N, m, m) -> (B, N, m, m).

    Every backend but "ref" uses the log-depth tree (plain PyTorch, so it runs on any device).
    """
    if get_backend() == "ref":
        return block_product_ref(A, reverse)
    return block_product_tree(A, reverse)


def companion_product(a: Tensor, reverse: bool = False, reset: Optional[Tensor] = None) -> Tensor:
    """State map of a companion (H-LRU) slice: the product of the companion matrices of a, with the
    steps where reset[b, t] (per-step cuts) zeroed. a: (B, T, N, m) -> (B, N, m, m).

    "ref" multiplies the materialised matrices; the other backends never form (B, T, N, m, m).
    """
    if get_backend() == "ref":
        C = companion_matrix(a)
        if reset is not None:
            C = C * (~reset).to(C.dtype)[:, :, None, None, None]
        return block_product_ref(C, reverse)
    return companion_product_chunked(a, reverse, reset)


__all__ = [
    "block_scan", "diag_scan", "companion_scan", "block_product", "companion_product", "backend_for", "chunked",
    "block_scan_chunked", "diag_scan_chunked", "companion_scan_chunked", "block_product_tree",
    "companion_product_chunked",
    "block_scan_ref", "diag_scan_ref", "companion_scan_ref", "block_product_ref", "companion_matrix",
    "ops", "ScanOp", "BLOCK", "DIAG", "COMPANION", "set_backend", "get_backend", "transition_mask",
]
