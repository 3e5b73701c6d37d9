"""The layer beneath the mixers (DESIGN.md §3, §4b): one folder per op, each with its float64
reference (reference.py), its op and CPU path (op.py) and its GPU kernels (triton.py, flex.py):

    block/      h_t = A_t h_{t-1} + u_t per block (LRU, BLUR) and BD-LRU's gated form
    diag/       h_t = a_t * h_{t-1} + u_t (GLRU, m = 1)
    companion/  H-LRU's order-m recurrence, its gated form and its state-readout op
    attention/  softmax attention without a Tq x Tk mask (CPU tiles, CUDA flex, dense reference)
    loss/       linear + cross-entropy without (B, T, V) logits
    common/     what they share: the split-phase contract, the backend choice, checks, gate
                normalisations, the chunk layout (scan.py); Triton helpers (triton.py); the AOT
                compile of every kernel (aot.py: python -m llm_lru.kernels.common.aot)

    block_scan(A, u, h0=None, reverse=False) -> (h, h_last)
      A: (B, T, N, m, m)  u: (B, T, N, m)  h0: (B, N, m) or None  ->  h: (B, T, N, m), h_last: (B, N, m)

`diag_scan` (m = 1) and `companion_scan` (H-LRU) keep the same h0 / h_last / reverse semantics.
The model's mixers call ScanOps, never these functions: LRU and BLUR `BLOCK`, GLRU `DIAG`, BD-LRU
and H-LRU `GatedBlockScan` / `GatedCompanionScan` (gate logits in; they run BLOCK / COMPANION, or
the fused Triton kernels). Each op also splits into the two explicit halves that sequence
parallelism needs (`op.local(...)` / `part.finish(h0)`, see common/scan.py). Importing this
package never imports triton: the Triton kernels are imported where they run.
"""
from .attention import dense_attention, local_attention, tiled_attention
from .block import (BLOCK, BlockScan, GatedBlockScan, bdlru_gates, bdlru_scan_reference, block_product,
                    block_product_ref, block_scan, block_scan_chunked, block_scan_ref)
from .common.scan import (BACKENDS, EPS, MAX_BLOCK_SIZE, NORMS, LocalGrad, LocalScan, ScanOp, TwoPassScan,
                          block_product_tree, get_backend, normalize_rows, resolve_backend, set_backend,
                          transition_mask)
from .companion import (COMPANION, CompanionLags, CompanionScan, GatedCompanionScan, companion_matrix, companion_product,
                        companion_product_chunked, companion_scan, companion_scan_chunked, companion_scan_ref,
                        hlru_scan_reference)
from .diag import DIAG, DiagScan, diag_scan, diag_scan_chunked, diag_scan_ref
from .loss import DEFAULT_CHUNK_TOKENS, linear_cross_entropy, linear_cross_entropy_reference

__all__ = [
    "block_scan", "diag_scan", "companion_scan", "block_product", "companion_product",
    "block_scan_chunked", "diag_scan_chunked", "companion_scan_chunked", "block_product_tree", "companion_product_chunked",
    "block_scan_ref", "diag_scan_ref", "companion_scan_ref", "block_product_ref", "companion_matrix",
    "bdlru_gates", "bdlru_scan_reference", "hlru_scan_reference", "normalize_rows", "NORMS", "EPS", "MAX_BLOCK_SIZE",
    "ScanOp", "LocalScan", "LocalGrad", "TwoPassScan", "BLOCK", "DIAG", "COMPANION", "BlockScan", "DiagScan",
    "CompanionScan", "GatedBlockScan", "GatedCompanionScan", "CompanionLags",
    "set_backend", "get_backend", "resolve_backend", "BACKENDS", "transition_mask",
    "local_attention", "tiled_attention", "dense_attention",
    "linear_cross_entropy", "linear_cross_entropy_reference", "DEFAULT_CHUNK_TOKENS",
]
