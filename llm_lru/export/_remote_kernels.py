"""The kernels' public names for exported models: every op's PyTorch path on every device.

Stands in for the `llm_lru.kernels` package, whose Triton kernels an export does not carry
(they need a GPU and triton at load time). Same functions and semantics: the vendored op files
llm_lru_kernels_<op>_op.py (fast path) and llm_lru_kernels_<op>_reference.py (sequential
reference, selected with LLM_LRU_SCAN=ref).
"""
from __future__ import annotations

from .llm_lru_kernels_attention_op import local_attention
from .llm_lru_kernels_block_op import BLOCK, GatedBlockScan, block_product, block_scan
from .llm_lru_kernels_common_scan import ScanOp, get_backend, set_backend, transition_mask
from .llm_lru_kernels_companion_op import COMPANION, CompanionLags, GatedCompanionScan, companion_scan
from .llm_lru_kernels_diag_op import DIAG, diag_scan
from .llm_lru_kernels_loss_op import DEFAULT_CHUNK_TOKENS, linear_cross_entropy

# "auto"/"triton" would send CUDA tensors to the Triton kernels, which are not bundled.
if get_backend() != "ref":
    set_backend("torch")

__all__ = ["block_scan", "diag_scan", "companion_scan", "block_product", "BLOCK", "DIAG", "COMPANION",
           "GatedBlockScan", "GatedCompanionScan", "CompanionLags", "ScanOp", "get_backend", "set_backend",
           "transition_mask", "local_attention", "linear_cross_entropy", "DEFAULT_CHUNK_TOKENS"]
