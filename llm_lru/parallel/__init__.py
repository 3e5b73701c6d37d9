"""Sequence and data parallelism (DESIGN.md §4), applied to a model from outside it.

    mesh = init_mesh(cfg.parallel)            # starts or joins the world; dp x sp, built once
    model = parallelize(model, mesh, cfg.parallel, activation_checkpointing=...)  # SP seams, checkpointing
    loss, value = sp_dp_loss(logits, labels, mesh)   # global token mean under DeepSpeed

The SP pieces: `SPScan` (recurrent carries, all-gather or ring), `SPAttention` (all-gathered
K/V with the causal work balanced zigzag over the ranks, or a halo for sliding windows),
`SPCache` (KV caches of chunked prefill, replicated over the group), and `unsplit(model)` for
work every rank repeats whole (one-token decoding).
"""
from .attention import SPAttention, SPCache
from .loss import sp_dp_loss
from .mesh import Mesh, build_mesh, init_mesh, resolve_backend, single_mesh
from .parallelize import apply_activation_checkpointing, apply_sp, parallelize, sp_seams, unsplit
from .scan import CARRIES, SPScan

__all__ = ["Mesh", "build_mesh", "init_mesh", "single_mesh", "resolve_backend", "SPScan", "SPAttention",
           "SPCache", "CARRIES", "parallelize", "apply_sp", "apply_activation_checkpointing", "sp_seams", "unsplit",
           "sp_dp_loss"]
