"""The companion op (H-LRU): y_t = sum_k a_t[k-1] y_{t-k} + x_t (reference.py, op.py with the chunked
PyTorch path and the state-readout op CompanionLags, triton.py imported only where it runs)."""
from .op import (COMPANION, CompanionLags, CompanionLocal, CompanionScan, GatedCompanionScan, companion_product,
                 companion_product_chunked, companion_scan, companion_scan_chunked)
from .reference import check_hlru, companion_matrix, companion_scan_ref, hlru_scan_reference

__all__ = ["COMPANION", "CompanionScan", "GatedCompanionScan", "CompanionLags", "CompanionLocal", "companion_scan",
           "companion_product", "companion_scan_chunked", "companion_product_chunked", "companion_scan_ref",
           "companion_matrix", "hlru_scan_reference", "check_hlru"]
