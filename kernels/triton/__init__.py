"""Triton kernels for the scans of llm_lru.kernels (DESIGN.md §3), forward and backward.

    block_scan_triton(A, u, h0=None, reverse=False) -> (h, h_last)       A (B,T,N,m,m), u (B,T,N,m)
    diag_scan_triton(a, u, h0=None, reverse=False) -> (h, h_last)        a, u (B,T,N)
    companion_scan_triton(a, x, h0=None, reverse=False, reset=None) -> (y, s_last)
    bdlru_scan_triton(logits, v, h0=None, reverse=False, reset=None, norm="softmax") -> (h, h_last)
    hlru_scan_triton(logits, v, h0=None, reverse=False, reset=None, norm="softmax") -> (y, s_last)

    block_local_triton / diag_local_triton / companion_local_triton(...) -> ops.LocalScan
      the split-phase scan (local.py): the kernels' pass 1 before the carry, fold + pass 2 after;
      its P, s (h_last(h0) = P h0 + s) are the slice's carry, what sequence parallelism exchanges.

reset (B, T) bool is a per-step cut: reset[b, t] zeroes A_t, as in companion_scan_ref (block_scan
has no reset: pass A_t = 0). Document starts become cuts through ops.transition_mask (in reverse
the cut moves one step). Outputs and state are fp32 for bf16/fp32 inputs (fp64 for fp64).

All scans take `chunk=` (steps per chunk of the two-level form; automatic on CUDA). Importing this
package imports triton: on a machine without a GPU set TRITON_INTERPRET=1 before importing it.
Every kernel keeps a row's state and transition in one thread's registers (see _common);
`python -m llm_lru.kernels.triton.aot` (without TRITON_INTERPRET) compiles every variant for
sm_80 / sm_90 on any machine and reports registers, spills, occupancy and the time loop's
shuffles, barriers and loads (bench/results/triton_resources.md).
The PyTorch reference of the fused gates is llm_lru.kernels.gates (no triton import).
"""
from .block import bdlru_scan_triton, block_scan_triton, diag_scan_triton
from .companion import companion_scan_triton, hlru_scan_triton
from .local import block_local_triton, companion_local_triton, diag_local_triton

__all__ = ["block_scan_triton", "diag_scan_triton", "companion_scan_triton", "bdlru_scan_triton",
           "hlru_scan_triton",
           "block_local_triton", "diag_local_triton", "companion_local_triton"]
