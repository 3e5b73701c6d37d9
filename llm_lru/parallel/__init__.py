"""Sequence and data parallelism (DESIGN.md §4), applied to a model from outside it.

    mesh = init_mesh(cfg.parallel)                       # world = dp x sp, built once
    model = parallelize(model, mesh, cfg.parallel.carry)  # SP scans and SP attention
    loss, value = sp_dp_loss(logits, labels, mesh)        # global token mean under DeepSpeed

The SP pieces: `SPScan` (recurrent carries, all-gather or ring), `SPAttention` (all-gathered
K/V, or a halo for sliding windows), `SPCache` (KV caches of chunked prefill, replicated over
the group), and `unsplit(model)` for work every rank repeats whole (one-token decoding).
"""
from .attention import SPAttention, SPCache
from .loss import sp_dp_loss
from .mesh import Mesh, build_mesh, init_mesh, resolve_backend, single_mesh
from .parallelize import parallelize, sp_seams, unsplit
from .scan import CARRIES, SPScan

__all__ = ["Mesh", "build_mesh", "init_mesh", "single_mesh", "resolve_backend", "SPScan", "SPAttention",
           "SPCache", "CARRIES", "parallelize", "sp_seams", "unsplit", "sp_dp_loss"]
