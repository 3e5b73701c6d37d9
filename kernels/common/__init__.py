"""What the ops share: scan.py (the split-phase contract, the one backend choice, input checks, gate
normalisations, the chunk layout of the CPU paths; no triton), triton.py (the Triton kernels'
helpers, the fold of chunk carries and the split-phase scan they run) and aot.py (the ahead-of-time
compile of every kernel variant for sm_80 / sm_90: `python -m llm_lru.kernels.common.aot`)."""
