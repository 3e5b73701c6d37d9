"""Scan ops: the seam between the recurrent mixers and whatever computes their recurrence.

A mixer holds one `ScanOp` and calls `op(trans, u, h0, reverse, reset)`. Sequence parallelism
(llm_lru.parallel) wraps the same op and needs two more things from it, both exact:
`product(trans, reverse, reset)`, the state map P of a whole slice (h_last(h0) = P h0 + h_last(0)),
and `apply(P, h)`; `prepare(trans, u)` lets it run an op's stateless work before waiting for a
carry. The built-in ops also offer `carry(trans, u, reverse, reset) -> (P, s)`, both in one pass
(s = h_last from zero; values only, no autograd), which sequence parallelism prefers.
State layouts: block/companion (B, N, m), diag (B, N).

Backend choice (LLM_LRU_SCAN or `set_backend`): "auto" (Triton on CUDA tensors, the fast
PyTorch path on CPU), "torch", "triton", "ref" (sequential reference, for tests).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
_BACKENDS = ("auto", "torch", "triton", "ref")
_backend = os.environ.get("LLM_LRU_SCAN", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"LLM_LRU_SCAN: unknown backend '{_backend}' (one of {', '.join(_BACKENDS)})")


def set_backend(name: str) -> None:
    """Force a scan backend for the whole process (tests, benchmarks)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"scan backend: unknown '{name}' (one of {', '.join(_BACKENDS)})")
    _backend = name


def get_backend() -> str:
    return _backend


def transition_mask(reset: Optional[Tensor], reverse: bool) -> Optional[Tensor]:
    """Where A_t must be zero, from segment starts `reset` (B, T) (True at a document's first token).

    Forward, the state entering a document's first token is dropped: A_t = 0 at reset[t].
    Reverse, the state must not flow from a document back into the previous one: A_t = 0 where
    reset[t + 1]. A start at t = 0 in reverse concerns the carry leaving the slice, which the
    caller (sequence parallelism) drops; h_last itself is returned unchanged.
    """
    if reset is None or not reverse:
        return reset
    return torch.cat([reset[:, 1:], torch.zeros_like(reset[:, :1])], 1)


def _mask(trans: Tensor, reset: Optional[Tensor], reverse: bool = False) -> Tensor:
    """Zero the transitions that a document boundary cuts (see transition_mask)."""
    cut = transition_mask(reset, reverse)
    if cut is None:
        return trans
    keep = (~cut).to(trans.dtype)
    return trans * keep.reshape(*keep.shape, *([1] * (trans.dim() - 2)))


def _chunked_path(*tensors: Tensor) -> bool:
    from . import backend_for
    return backend_for(*tensors) == "torch"


class ScanOp:
    """A family of linear recurrences; subclasses fix the layout of `trans`, `u` and the state."""

    name = "scan"

    def __call__(self, trans: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                 reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Scan one slice. reset: (B, T) bool, True where a document starts (see transition_mask)."""
        raise NotImplementedError

    def product(self, trans: Tensor, reverse: bool = False, reset: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def prepare(self, trans: Tensor, u: Tensor) -> Tuple["ScanOp", Tensor, Tensor]:
        """(op, trans', u') with op(trans', u', ...) == self(trans, u, ...): the differentiable work
        that needs no state (e.g. gate normalisation) done up front, so that sequence parallelism
        does it before it waits for a carry rather than after. Default: nothing to do."""
        return self, trans, u

    def defers_state(self, trans: Tensor, u: Tensor) -> bool:
        """True when this op's scan honours `chunked.deferred_state` on these inputs: it runs its
        carry-independent pass before it reads h0 (the chunked PyTorch path)."""
        return False

    def apply(self, P: Tensor, h: Tensor) -> Tensor:
        """P h for this op's state layout (block: (B,N,m,m) x (B,N,m))."""
        return torch.einsum("bnij,bnj->bni", P, h)

    def _carry_ref(self, trans: Tensor, u: Tensor, reverse: bool, reset: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(product, h_last from zero) the two-pass way: what every `carry` must equal."""
        with torch.no_grad():
            return self.product(trans, reverse, reset), self(trans, u, None, reverse, reset)[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BlockScan(ScanOp):
    """trans = A: (B, T, N, m, m), u: (B, T, N, m), state (B, N, m)."""

    name = "block"

    def __call__(self, A, u, h0=None, reverse=False, reset=None):
        from . import block_scan
        return block_scan(_mask(A, reset, reverse), u, h0, reverse)

    def defers_state(self, trans, u):
        return _chunked_path(trans, u)

    def product(self, A, reverse=False, reset=None):
        from . import block_product
        return block_product(_mask(A, reset, reverse), reverse)

    def carry(self, A, u, reverse=False, reset=None):
        """(P, s) of the slice in one pass: product(A) and h_last from zero. Values only."""
        from . import backend_for
        backend = backend_for(A, u)
        if backend == "ref":
            return self._carry_ref(A, u, reverse, reset)
        if backend == "triton":
            from .triton import block_carry_triton
            return block_carry_triton(A, u, reverse, transition_mask(reset, reverse))
        from .chunked import block_carry
        return block_carry(_mask(A, reset, reverse), u, reverse)


class DiagScan(ScanOp):
    """trans = a: (B, T, N), u: (B, T, N), state (B, N)."""

    name = "diag"

    def __call__(self, a, u, h0=None, reverse=False, reset=None):
        from . import diag_scan
        return diag_scan(_mask(a, reset, reverse), u, h0, reverse)

    def defers_state(self, trans, u):
        return _chunked_path(trans, u)

    def product(self, a, reverse=False, reset=None):
        from .checks import acc_dtype
        return _mask(a, reset, reverse).to(acc_dtype(a)).prod(1)

    def apply(self, P, h):
        return P * h

    def carry(self, a, u, reverse=False, reset=None):
        """(P, s) of the slice in one pass: prod(a) (B, N) and h_last from zero (B, N). Values only."""
        from . import backend_for
        backend = backend_for(a, u)
        if backend == "ref":
            return self._carry_ref(a, u, reverse, reset)
        if backend == "triton":  # the block kernel with m = 1
            from .triton import block_carry_triton
            P, s = block_carry_triton(a[..., None, None], u[..., None], reverse, transition_mask(reset, reverse))
            return P[..., 0, 0], s[..., 0]
        from .chunked import diag_carry
        return diag_carry(_mask(a, reset, reverse), u, reverse)


class CompanionScan(ScanOp):
    """trans = a: (B, T, N, m) (first row of the companion matrix), u = x: (B, T, N), state (B, N, m).

    Returns y: (B, T, N) (the newest value of the state) and the full last state (B, N, m).
    """

    name = "companion"

    def __call__(self, a, x, h0=None, reverse=False, reset=None):
        from . import companion_scan
        return companion_scan(a, x, h0, reverse, transition_mask(reset, reverse))

    def defers_state(self, trans, u):
        return _chunked_path(trans, u)

    def product(self, a, reverse=False, reset=None):
        from . import companion_product
        return companion_product(a, reverse, transition_mask(reset, reverse))

    def carry(self, a, x, reverse=False, reset=None):
        """(P, s) of the slice in one pass: product and last state from zero. Values only."""
        from . import backend_for
        backend = backend_for(a, x)
        if backend == "ref":
            return self._carry_ref(a, x, reverse, reset)
        cut = transition_mask(reset, reverse)
        if backend == "triton":
            from .triton import companion_carry_triton
            return companion_carry_triton(a, x, reverse, cut)
        from .chunked import companion_carry
        return companion_carry(a, x, reverse, cut)


BLOCK = BlockScan()
DIAG = DiagScan()
COMPANION = CompanionScan()
