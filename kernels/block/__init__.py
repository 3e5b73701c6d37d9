"""The block op: h_t[n] = A_t[n] h_{t-1}[n] + u_t[n] and BD-LRU's gated form (reference.py: the
sequential reference; op.py: the ops and the chunked PyTorch path; triton.py: the CUDA kernels,
imported only where they run)."""
from .op import BLOCK, BlockLocal, BlockScan, GatedBlockScan, block_product, block_scan, block_scan_chunked
from .reference import bdlru_gates, bdlru_scan_reference, block_product_ref, block_scan_ref, check_bdlru

__all__ = ["BLOCK", "BlockScan", "GatedBlockScan", "BlockLocal", "block_scan", "block_product", "block_scan_chunked",
           "block_scan_ref", "block_product_ref", "bdlru_gates", "bdlru_scan_reference", "check_bdlru"]
