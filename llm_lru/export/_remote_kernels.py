"""Scan dispatch for exported models: the chunked PyTorch scans on every device.

Stands in for the `llm_lru.kernels` package, whose Triton kernels an export does not carry
(they need a GPU and triton at load time). Same functions and semantics: see
llm_lru_kernels_chunked.py (fast path) and llm_lru_kernels_reference.py (sequential reference,
selected with LLM_LRU_SCAN=ref).
"""
from __future__ import annotations

from .llm_lru_kernels_chunked import block_product_tree, block_scan_chunked, companion_scan_chunked, diag_scan_chunked
from .llm_lru_kernels_ops import BLOCK, COMPANION, DIAG, ScanOp, get_backend, set_backend, transition_mask
from .llm_lru_kernels_reference import block_product_ref, block_scan_ref, companion_scan_ref, diag_scan_ref

# "auto"/"triton" would send CUDA tensors to the Triton kernels, which are not bundled.
if get_backend() != "ref":
    set_backend("torch")


def block_scan(A, u, h0=None, reverse=False):
    """h_t = A_t h_{t-1} + u_t per block. A: (B, T, N, m, m), u: (B, T, N, m) -> h, h_last."""
    if get_backend() == "ref":
        return block_scan_ref(A, u, h0, reverse)
    return block_scan_chunked(A, u, h0, reverse)


def diag_scan(a, u, h0=None, reverse=False):
    """h_t = a_t * h_{t-1} + u_t elementwise. a, u: (B, T, N) -> h, h_last."""
    if get_backend() == "ref":
        return diag_scan_ref(a, u, h0, reverse)
    return diag_scan_chunked(a, u, h0, reverse)


def companion_scan(a, x, h0=None, reverse=False, reset=None):
    """y_t = sum_k a_t[k-1] y_{t-k} + x_t. a: (B, T, N, m), x: (B, T, N) -> y, state (B, N, m)."""
    if get_backend() == "ref":
        return companion_scan_ref(a, x, h0, reverse, reset)
    return companion_scan_chunked(a, x, h0, reverse, reset)


def block_product(A, reverse=False):
    """A_T ... A_1 (reverse: A_1 ... A_T). (B, T, N, m, m) -> (B, N, m, m)."""
    if get_backend() == "ref":
        return block_product_ref(A, reverse)
    return block_product_tree(A, reverse)


__all__ = ["block_scan", "diag_scan", "companion_scan", "block_product", "BLOCK", "DIAG", "COMPANION",
           "ScanOp", "get_backend", "set_backend", "transition_mask"]
