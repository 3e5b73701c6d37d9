"""The delta rule (DeltaNet, Schlag et al. 2021; Yang et al. 2024), the op behind the `deltanet`
baseline mixer:

    delta_rule(q, k, v, beta, h0=None, reset=None) -> (o, h_last)
      q, k: (B, T, H, K)  v: (B, T, H, V)  beta: (B, T, H)  h0: (B, H, K, V) or None
      reset: (B, T) bool or None (zero the state before that step: a document start)
      o: (B, T, H, V)     h_last: (B, H, K, V)

`delta_rule_ref` (reference.py) is the float64 loop the PyTorch forms (torch_forms.py) are
tested against. On CUDA with flash-linear-attention installed and no document starts inside the
sequence, fla's chunked Triton kernel runs it. This op has no split-phase (sequence-parallel) form.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .reference import delta_rule_ref
from .torch_forms import delta_rule_chunked, delta_rule_sequential

Tensor = torch.Tensor
FORMS = ("auto", "ref", "sequential", "chunked", "fla")
CHUNK = 32

__all__ = ["FORMS", "delta_rule", "delta_rule_chunked", "delta_rule_ref", "delta_rule_sequential", "fla_available"]


def fla_available() -> bool:
    """Whether fla's delta-rule kernel can be imported (it needs CUDA and Triton to run)."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule  # noqa: F401
    except Exception:  # ImportError, or fla's own import-time failures without a GPU
        return False
    return True


def _fla(q, k, v, beta, h0):
    # Guarded so that an exported model's code (transformers scans its imports) needs no fla.
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except ImportError as e:
        raise ImportError("delta_rule form 'fla': flash-linear-attention is not installed") from e

    o, last = chunk_delta_rule(q, k, v, beta, scale=1.0, initial_state=h0, output_final_state=True)
    return o, last


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, h0: Optional[Tensor] = None,
               reset: Optional[Tensor] = None, form: str = "auto") -> Tuple[Tensor, Tensor]:
    """The delta rule (see module doc). form: auto (fla on CUDA where installed and possible,
    else chunked without inner resets, else sequential), or one of FORMS by name."""
    if form not in FORMS:
        raise ValueError(f"delta_rule form: unknown '{form}' (one of {', '.join(FORMS)})")
    if q.shape != k.shape or v.shape[:3] != k.shape[:3] or beta.shape != k.shape[:3]:
        raise ValueError(f"delta_rule: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, beta "
                         f"{tuple(beta.shape)} do not match (B, T, H, K), (B, T, H, V), (B, T, H)")
    # A start at position 0 only resets the given state: the same as starting from zeros.
    if reset is not None and bool(reset[:, 0].any()):
        keep = (~reset[:, 0]).to(h0.dtype)[:, None, None, None] if h0 is not None else None
        h0 = h0 * keep if h0 is not None else None
    inner = reset is not None and bool(reset[:, 1:].any())
    if form == "auto":
        form = "fla" if q.is_cuda and not inner and fla_available() else ("sequential" if inner else "chunked")
    if form == "ref":
        return delta_rule_ref(q, k, v, beta, h0, reset)
    if form == "sequential":
        return delta_rule_sequential(q, k, v, beta, h0, reset)
    if inner:
        raise ValueError(f"delta_rule form '{form}': document starts inside the sequence need form sequential")
    if form == "chunked":
        return delta_rule_chunked(q, k, v, beta, h0, CHUNK)
    if not q.is_cuda:
        raise ValueError("delta_rule form 'fla': fla's kernel needs CUDA tensors")
    return _fla(q, k, v, beta, h0)
