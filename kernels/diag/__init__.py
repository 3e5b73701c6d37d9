"""The diagonal op: h_t = a_t * h_{t-1} + u_t elementwise (reference.py, op.py with the chunked
PyTorch path, triton.py imported only where it runs)."""
from .op import DIAG, DiagLocal, DiagScan, diag_scan, diag_scan_chunked
from .reference import diag_scan_ref

__all__ = ["DIAG", "DiagScan", "DiagLocal", "diag_scan", "diag_scan_chunked", "diag_scan_ref"]
