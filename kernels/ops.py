"""Scan ops: the seam between the recurrent mixers and whatever computes their recurrence.

A mixer holds one `ScanOp` and calls `op(trans, u, h0, reverse, reset)` -> (h, h_last), under
autograd. State layouts: block/companion (B, N, m), diag (B, N).

Split phase (DESIGN.md §3), for callers that must exchange carries between the two halves of a
scan (sequence parallelism, llm_lru.parallel.scan). No autograd: the caller's own
autograd.Function calls both halves of the forward and both halves of the backward.

    part = op.local(trans, u, reverse, reset)       # the carry-free pass over the slice
    part.P, part.s                                  # slice map: h_last(h0) = op.apply(P, h0) + s
    h, h_last = part.finish(h0)                     # the states from h0 (None: zeros); once
    saved = part.saved()                            # what the backward needs (once, after finish)
    grad = part.adjoint(g_h, saved)                 # the carry-free adjoint pass, g_h = dL/dh
    grad.a                                          # dL/dh0 when dL/dh_last = 0; in general
    grad.h0_grad(g_last) == grad.a + op.apply_t(P, g_last)   # (no pass: the map is P^T)
    g_trans, g_u, g_h0 = grad.finish(g_last)        # every input's gradient for dL/dh_last = g_last

P, s and a are in the accumulation dtype (fp32 for half inputs); finish and adjoint take their
h0 and gradients in any float dtype; g_trans, g_u, g_h0 come back in the dtypes of trans, u, h0
(g_h0 is None when finish had h0 = None). `saved()` hands its tensors over so that the caller
routes them through ctx.save_for_backward (activation checkpointing can then drop and recompute
them); the part keeps no reference to them. Shapes: those of `op(...)`'s inputs and outputs.

`ScanOp.local` is the generic fallback, `TwoPassScan`, for kernels that read h0 before they scan
(the sequential reference): (P, s) from `op.carry`, `finish` scans again from h0, and the
backward differentiates the slice's scan rebuilt from its saved inputs. The chunked PyTorch
scans and the Triton kernels split natively (chunked.py, triton/local.py: pass 1 over every
chunk from zero, then the fold and the correction from h0). A native `local` must agree
with TwoPassScan on every output, map and gradient (tests/kernels/test_local.py). Where to plug
one in: the `local` of BlockScan, DiagScan, CompanionScan (their "triton" backend branch) and of
the gated ops (gated.py; on Triton, SP hands them the gate logits: `prepare` keeps them fused),
returning a LocalScan whose `adjoint` returns a LocalGrad (LocalGrad.h0_grad comes for free).

`prepare(trans, u)` runs an op's stateless differentiable work (gate normalisation) under the
caller's autograd before the split, so that only the scan itself waits for a carry.

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


def _zero_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


class LocalGrad:
    """The backward half of a split scan (see module doc): `a`, `h0_grad`, `finish`."""

    a: Tensor

    def __init__(self, op: "ScanOp", P: Tensor):
        self.op, self.P = op, P

    def h0_grad(self, g_last: Tensor) -> Tensor:
        """dL/dh0 for dL/dh_last = g_last: a + P^T g_last (no pass over the slice)."""
        return self.a + self.op.apply_t(self.P, g_last.to(self.a.dtype))

    def finish(self, g_last: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(g_trans, g_u, g_h0) for dL/dh_last = g_last (None: zeros)."""
        raise NotImplementedError


class LocalScan:
    """The forward half of a split scan (see module doc): `P`, `s`, `finish`, `saved`, `adjoint`."""

    P: Tensor
    s: Tensor

    def finish(self, h0: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(h, h_last) of the slice from h0 (None: zeros), without autograd. Once per part."""
        raise NotImplementedError

    def saved(self) -> Tuple[Optional[Tensor], ...]:
        """The tensors `adjoint` needs, handed over once after finish (the part drops them)."""
        raise NotImplementedError

    def adjoint(self, g_h: Optional[Tensor], saved: Tuple[Optional[Tensor], ...]) -> LocalGrad:
        """The carry-free adjoint pass for dL/dh = g_h (None: zeros), given `saved()`."""
        raise NotImplementedError


class TwoPassScan(LocalScan):
    """The generic split of any op whose kernels read h0 before they scan (see module doc).

    (P, s) from op.carry; finish(h0) runs op from h0 without a graph and saves its inputs; the
    backward rebuilds the slice's graph from them and differentiates it, once for dL/dh (which
    gives a) and once more for dL/dh_last when that is not zero.
    """

    def __init__(self, op: "ScanOp", trans: Tensor, u: Tensor, reverse: bool, reset: Optional[Tensor]):
        self.op, self.reverse, self.reset = op, reverse, reset
        self._inputs: Optional[Tuple[Tensor, Tensor]] = (trans, u)
        self.P, self.s = op.carry(trans, u, reverse, reset)
        self._saved = None

    def finish(self, h0):
        trans, u = self._inputs
        self._inputs = None
        with torch.no_grad():
            h, h_last = self.op(trans, u, None if h0 is None else h0.to(self.s.dtype), self.reverse, self.reset)
        self._saved = (trans, u, h0)
        return h, h_last

    def saved(self):
        out, self._saved = self._saved, None
        return out

    def adjoint(self, g_h, saved):
        return _TwoPassGrad(self, g_h, *saved)


class _TwoPassGrad(LocalGrad):
    def __init__(self, part: TwoPassScan, g_h, trans, u, h0):
        super().__init__(part.op, part.P)
        self.h0_dtype = None if h0 is None else h0.dtype
        # Leaves of a graph of our own, built here in backward: nothing of it lives between the
        # passes, and no outer saved-tensor hook (activation checkpointing) sees it.
        self.leaves = [trans.detach().requires_grad_(), u.detach().requires_grad_(),
                       torch.zeros_like(part.s) if h0 is None else h0.detach().to(part.s.dtype)]
        self.leaves[2].requires_grad_()
        with torch.enable_grad():
            self.h, self.h_last = part.op(*self.leaves, part.reverse, part.reset)
        self.first = torch.autograd.grad(self.h, self.leaves, _zero_if_none(g_h, self.h), retain_graph=True,
                                         allow_unused=True)
        self.a = _zero_if_none(self.first[2], self.leaves[2])

    def finish(self, g_last):
        grads = list(self.first)
        if g_last is not None and bool(g_last.any()):
            more = torch.autograd.grad(self.h_last, self.leaves, g_last.to(self.h_last.dtype), allow_unused=True)
            grads = [g if m is None else (m if g is None else g + m) for g, m in zip(grads, more)]
        self.h = self.h_last = self.first = None
        g_trans, g_u, g_h0 = (_zero_if_none(g, x) for g, x in zip(grads, self.leaves))
        return g_trans, g_u, None if self.h0_dtype is None else g_h0.to(self.h0_dtype)


def _chunked_path(*tensors: Tensor) -> bool:
    from . import backend_for
    return backend_for(*tensors) == "torch"


def _native_split(*tensors: Tensor) -> bool:
    """The chunked PyTorch scans and the Triton kernels split natively; the reference does not."""
    from . import backend_for
    return backend_for(*tensors) in ("torch", "triton")


def _local_map(op: "ScanOp", trans: Tensor, u: Tensor, reverse: bool, reset: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(P, s) from the native split's carry-free pass alone (one pass instead of two)."""
    with torch.no_grad():
        part = op.local(trans, u, reverse, reset)
    return part.P, part.s


class ScanOp:
    """A family of linear recurrences; subclasses fix the layout of `trans`, `u` and the state."""

    name = "scan"

    def __call__(self, trans: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                 reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Scan one slice. reset: (B, T) bool, True where a document starts (see transition_mask)."""
        raise NotImplementedError

    def product(self, trans: Tensor, reverse: bool = False, reset: Optional[Tensor] = None) -> Tensor:
        """The slice's state map P (h_last(h0) = apply(P, h0) + h_last(0)), differentiable."""
        raise NotImplementedError

    def local(self, trans: Tensor, u: Tensor, reverse: bool = False, reset: Optional[Tensor] = None) -> LocalScan:
        """The carry-free pass of the split scan (module doc). Default: the generic TwoPassScan."""
        return TwoPassScan(self, trans, u, reverse, reset)

    def carry(self, trans: Tensor, u: Tensor, reverse: bool = False, reset: Optional[Tensor] = None
              ) -> Tuple[Tensor, Tensor]:
        """(P, s) of the slice, h_last(h0) = apply(P, h0) + s, values only. Default: the product
        and a scan from zero (two passes); ops override it with one-pass kernels."""
        with torch.no_grad():
            return self.product(trans, reverse, reset), self(trans, u, None, reverse, reset)[1]

    def prepare(self, trans: Tensor, u: Tensor) -> Tuple["ScanOp", Tensor, Tensor]:
        """(op, trans', u') with op(trans', u', ...) == self(trans, u, ...): the differentiable work
        that needs no state (e.g. gate normalisation) done up front, so that sequence parallelism
        does it before it waits for a carry rather than after. Default: nothing to do."""
        return self, trans, u

    def apply(self, P: Tensor, h: Tensor) -> Tensor:
        """P h for this op's state layout (block: (B,N,m,m) x (B,N,m))."""
        return torch.einsum("bnij,bnj->bni", P, h)

    def apply_t(self, P: Tensor, g: Tensor) -> Tensor:
        """P^T g: the vector-Jacobian product of h -> apply(P, h)."""
        return torch.einsum("bnji,bnj->bni", P, g)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BlockScan(ScanOp):
    """trans = A: (B, T, N, m, m), u: (B, T, N, m), state (B, N, m)."""

    name = "block"

    def __call__(self, A, u, h0=None, reverse=False, reset=None):
        from . import block_scan
        return block_scan(_mask(A, reset, reverse), u, h0, reverse)

    def product(self, A, reverse=False, reset=None):
        from . import block_product
        return block_product(_mask(A, reset, reverse), reverse)

    def local(self, A, u, reverse=False, reset=None):
        if _chunked_path(A, u):
            from .chunked import BlockLocal
            return BlockLocal(A, u, reverse, reset)
        from . import backend_for
        if backend_for(A, u) == "triton":
            from .triton.local import block_local_triton
            return block_local_triton(A, u, reverse, transition_mask(reset, reverse), op=self)
        return TwoPassScan(self, A, u, reverse, reset)

    def carry(self, A, u, reverse=False, reset=None):
        return _local_map(self, A, u, reverse, reset) if _native_split(A, u) else super().carry(A, u, reverse, reset)


class DiagScan(ScanOp):
    """trans = a: (B, T, N), u: (B, T, N), state (B, N)."""

    name = "diag"

    def __call__(self, a, u, h0=None, reverse=False, reset=None):
        from . import diag_scan
        return diag_scan(_mask(a, reset, reverse), u, h0, reverse)

    def product(self, a, reverse=False, reset=None):
        from .checks import acc_dtype
        return _mask(a, reset, reverse).to(acc_dtype(a)).prod(1)

    def local(self, a, u, reverse=False, reset=None):
        if _chunked_path(a, u):
            from .chunked import DiagLocal
            return DiagLocal(a, u, reverse, reset)
        from . import backend_for
        if backend_for(a, u) == "triton":
            from .triton.local import diag_local_triton
            return diag_local_triton(a, u, reverse, transition_mask(reset, reverse))
        return TwoPassScan(self, a, u, reverse, reset)

    def apply(self, P, h):
        return P * h

    def apply_t(self, P, g):
        return P * g

    def carry(self, a, u, reverse=False, reset=None):
        return _local_map(self, a, u, reverse, reset) if _native_split(a, u) else super().carry(a, u, reverse, reset)


class CompanionScan(ScanOp):
    """trans = a: (B, T, N, m) (first row of the companion matrix), u = x: (B, T, N), state (B, N, m).

    Returns y: (B, T, N) (the newest value of the state) and the full last state (B, N, m).
    """

    name = "companion"

    def __call__(self, a, x, h0=None, reverse=False, reset=None):
        from . import companion_scan
        return companion_scan(a, x, h0, reverse, transition_mask(reset, reverse))

    def product(self, a, reverse=False, reset=None):
        from . import companion_product
        return companion_product(a, reverse, transition_mask(reset, reverse))

    def local(self, a, x, reverse=False, reset=None):
        if _chunked_path(a, x):
            from .chunked import CompanionLocal
            return CompanionLocal(a, x, reverse, transition_mask(reset, reverse))
        from . import backend_for
        if backend_for(a, x) == "triton":
            from .triton.local import companion_local_triton
            return companion_local_triton(a, x, reverse, transition_mask(reset, reverse), op=self)
        return TwoPassScan(self, a, x, reverse, reset)

    def carry(self, a, x, reverse=False, reset=None):
        return _local_map(self, a, x, reverse, reset) if _native_split(a, x) else super().carry(a, x, reverse, reset)


BLOCK = BlockScan()
DIAG = DiagScan()
COMPANION = CompanionScan()
