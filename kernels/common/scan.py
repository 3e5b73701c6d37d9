"""What every scan op shares: the split-phase contract, the backend choice, the input checks, the
gate normalisations and the chunk layout of the CPU paths. No triton import: CPU users never pay for it.

The scan ops (DESIGN.md §3). A mixer holds one `ScanOp` and calls `op(trans, u, h0, reverse, reset)`
-> (h, h_last), under autograd. State layouts: block/companion (B, N, m), diag (B, N). Each op lives
in its own folder (kernels/block, kernels/diag, kernels/companion): its float64 reference, its op
with the chunked PyTorch path (CPU, or any device), its Triton kernels.

Split phase, for callers that must exchange carries between the two halves of a scan (sequence
parallelism, llm_lru.parallel.scan). No autograd: the caller's own autograd.Function calls both
halves of the forward and both halves of the backward.

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
scans and the Triton kernels split natively (each op's op.py and triton.py: pass 1 over every
chunk from zero, then the fold and the correction from h0). A native `local` must agree with
TwoPassScan on every output, map and gradient (tests/kernels/test_local.py).

`prepare(trans, u)` runs an op's stateless differentiable work (gate normalisation) under the
caller's autograd before the split, so that only the scan itself waits for a carry.

Gate normalisations of BD-LRU and H-LRU (DESIGN.md §2), the ONE definition (the fused Triton
kernels are tested against it):

    normalize_rows(logits, norm) -> P        each row over its last axis (size m + 1)
      softmax:  P = softmax(g)
      sigmoid:  P = sigmoid(g) / sum sigmoid(g)
      relu:     P = relu(g)    / (sum relu(g)    + eps)
      tanh:     P = tanh(g)    / (sum |tanh(g)|  + eps)
      lin_l1:   P = g          / (sum |g|        + eps)
    Every row of P has L1 norm <= 1, so the state of the recurrence stays bounded.

The chunk layout of the CPU paths (each op's op.py): the sequence is cut into chunks of C steps
(the last one padded), every chunk is scanned from zero at once, a short loop over chunks folds
the carries h_in(c+1) = P(c) h_in(c) + s(c), and wide ops correct every state. The helpers here
move (B, T, ...) tensors into (C, B, nc, ...) chunk buffers and back and fold the chunk maps;
`block_product_tree` is the log-depth product of a slice's transitions.

Backend choice, in one function (`resolve_backend`): an explicit `backend=` argument (of a scan
function, or a ScanOp's `backend`), else the configured one (`set_backend`), else the environment
(LLM_LRU_SCAN), else the device: "auto" (Triton on CUDA tensors, the fast PyTorch path elsewhere),
"torch", "triton", "ref" (sequential reference, for tests).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# The backend choice: the one place that decides which implementation runs an op on its tensors.

BACKENDS = ("auto", "torch", "triton", "ref")
ENV = "LLM_LRU_SCAN"
# The ops with Triton kernels; the others (the slice products) run their PyTorch form on any device.
TRITON_OPS = ("block", "diag", "companion", "bdlru", "hlru")
_configured: Optional[str] = None
_warned_no_triton = False


def _check_backend(name: str, unknown: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{unknown} '{name}' (one of {', '.join(BACKENDS)})")
    return name


def set_backend(name: Optional[str]) -> None:
    """Configure the scan backend of this process (what a run, a test or a benchmark asks for);
    None unsets it, so that LLM_LRU_SCAN and then the device decide. See resolve_backend."""
    global _configured
    _configured = None if name is None else _check_backend(name, "scan backend: unknown")


def get_backend() -> str:
    """The backend asked for when a call names none: the configured one, else LLM_LRU_SCAN, else "auto"."""
    if _configured is not None:
        return _configured
    return _check_backend(os.environ.get(ENV, "auto"), f"{ENV}: unknown backend")


def triton_installed() -> bool:
    """Whether the triton package can be imported (looked up, not imported: CPU users never pay for it)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def resolve_backend(op: str, *tensors: Optional[Tensor], backend: Optional[str] = None) -> str:
    """The implementation that runs `op` (an op's name: block, diag, companion, bdlru, hlru,
    block_product, companion_product) on these tensors: "ref", "torch" or "triton". Every scan
    and split in llm_lru.kernels asks here, and nowhere else (DESIGN.md §3):

    1. the explicit `backend` argument, else the configured one (`set_backend`), else the
       environment (LLM_LRU_SCAN), else "auto";
    2. "auto" is "triton" when any of the tensors is on CUDA, else "torch" (the chunked path);
    3. an op without Triton kernels (the slice products) runs its PyTorch form for "triton";
    4. a missing Triton (the package not installed) is one rule: "auto" falls back to "torch"
       with one warning; "triton" asked for by name raises ImportError naming where it was asked.
    """
    global _warned_no_triton
    if backend is not None:
        name, asked = _check_backend(backend, f"{op}: unknown backend"), "the backend argument"
    elif _configured is not None:
        name, asked = _configured, "set_backend"
    else:
        name, asked = get_backend(), ENV
    if name == "auto":
        if not any(t is not None and t.is_cuda for t in tensors):
            return "torch"
        name, asked = "triton", None
    if name != "triton":
        return name
    if op not in TRITON_OPS:
        return "torch"
    if not triton_installed():
        if asked is not None:
            raise ImportError(f"{asked}: backend 'triton' for the {op} scan, but triton is not installed "
                              "(pip install triton, or use backend 'torch')")
        if not _warned_no_triton:
            warnings.warn("scan backend auto: triton is not installed, CUDA scans use the PyTorch path")
            _warned_no_triton = True
        return "torch"
    return "triton"


# ----------------------------------------------------------------------------------------------
# Input checks shared by every scan implementation: errors name the tensor and the shape.

MAX_BLOCK_SIZE = 16


def _fail(name: str, expected: str, got: torch.Tensor) -> None:
    raise ValueError(f"{name}: expected shape {expected}, got {tuple(got.shape)}")


def check_tensor(name: str, x: torch.Tensor, expected: Sequence[Optional[int]], spec: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, x.shape)):
        _fail(name, spec, x)
    if not x.is_floating_point() and name not in ("reset",):
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors on different devices: " + ", ".join(f"{k}={v}" for k, v in devs.items()))


def check_block(A: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor]) -> None:
    """A: (B, T, N, m, m), u: (B, T, N, m), h0: (B, N, m) or None."""
    check_tensor("u", u, [None, None, None, None], "(B, T, N, m)")
    B, T, N, m = u.shape
    if not 1 <= m <= MAX_BLOCK_SIZE:
        raise ValueError(f"u: block size m={m} outside the supported 1..{MAX_BLOCK_SIZE}")
    if T < 1:
        raise ValueError("u: sequence length T must be at least 1")
    check_tensor("A", A, [B, T, N, m, m], f"(B, T, N, m, m) = {(B, T, N, m, m)}")
    if h0 is not None:
        check_tensor("h0", h0, [B, N, m], f"(B, N, m) = {(B, N, m)}")
    check_same_device(A=A, u=u, h0=h0)


def check_diag(a: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor]) -> None:
    """a: (B, T, N), u: (B, T, N), h0: (B, N) or None."""
    check_tensor("u", u, [None, None, None], "(B, T, N)")
    B, T, N = u.shape
    if T < 1:
        raise ValueError("u: sequence length T must be at least 1")
    check_tensor("a", a, [B, T, N], f"(B, T, N) = {(B, T, N)}")
    if h0 is not None:
        check_tensor("h0", h0, [B, N], f"(B, N) = {(B, N)}")
    check_same_device(a=a, u=u, h0=h0)


def check_companion(a: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor], reset: Optional[torch.Tensor]) -> None:
    """a: (B, T, N, m), x: (B, T, N), h0: (B, N, m) or None, reset: (B, T) bool or None."""
    check_tensor("x", x, [None, None, None], "(B, T, N)")
    B, T, N = x.shape
    if T < 1:
        raise ValueError("x: sequence length T must be at least 1")
    check_tensor("a", a, [B, T, N, None], f"(B, T, N, m) with B, T, N = {(B, T, N)}")
    m = a.shape[-1]
    if not 1 <= m <= MAX_BLOCK_SIZE:
        raise ValueError(f"a: order m={m} outside the supported 1..{MAX_BLOCK_SIZE}")
    if h0 is not None:
        check_tensor("h0", h0, [B, N, m], f"(B, N, m) = {(B, N, m)}")
    check_reset(reset, B, T)
    check_same_device(a=a, x=x, h0=h0, reset=reset)


def check_reset(reset: Optional[torch.Tensor], B: int, T: int) -> None:
    if reset is None:
        return
    if reset.dtype != torch.bool:
        raise TypeError(f"reset: expected a bool tensor, got {reset.dtype}")
    if tuple(reset.shape) != (B, T):
        raise ValueError(f"reset: expected shape (B, T) = {(B, T)}, got {tuple(reset.shape)}")


def acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    """State dtype: fp32 for half inputs, fp64 when any input is fp64."""
    dt = torch.float32
    for x in xs:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


# ----------------------------------------------------------------------------------------------
# Gate normalisations (module doc)

NORMS = ("softmax", "sigmoid", "relu", "tanh", "lin_l1")  # also fused in the Triton kernels (codes 1..5)


# Keeps relu/tanh/lin_l1 rows finite when every entry is zero; small enough not to matter otherwise.
EPS = 1e-6


_EPS = EPS


# torch's CPU softmax vectorises along the row: on rows shorter than this it runs 2-3x slower
# than the same softmax from elementwise ops and reductions (bench/gates_cpu.py).
_SHORT_ROW = 8


class _ShortRowSoftmax(torch.autograd.Function):
    """softmax over a short last axis, from elementwise ops; backward from the saved output."""

    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:
        p = (g - g.amax(-1, keepdim=True)).exp_()
        p.div_(p.sum(-1, keepdim=True))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, gp: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        gg = gp * p
        return gg.sub_(p * gg.sum(-1, keepdim=True))


def _softmax(g: Tensor) -> Tensor:
    if g.device.type == "cpu" and g.shape[-1] < _SHORT_ROW:
        return _ShortRowSoftmax.apply(g)
    return torch.softmax(g, -1)


def check_norm(norm: str) -> None:
    """Raise ValueError naming the unknown normalisation."""
    if norm not in NORMS:
        raise ValueError(f"norm: unknown gate normalisation '{norm}' (one of {', '.join(NORMS)})")


def normalize_rows(logits: Tensor, norm: str = "softmax") -> Tensor:
    """Normalise each row of gate logits over the last axis; returns P with the same shape.

    logits: (..., m + 1). Computed in the accumulation dtype (fp32 for half inputs).
    """
    check_norm(norm)
    g = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if norm == "softmax":
        return _softmax(g)
    if norm == "sigmoid":
        s = torch.sigmoid(g)
        return s / s.sum(-1, keepdim=True)
    if norm == "relu":
        s = torch.relu(g)
        return s / (s.sum(-1, keepdim=True) + EPS)
    s = torch.tanh(g) if norm == "tanh" else g  # lin_l1: the logits themselves
    return s / (s.abs().sum(-1, keepdim=True) + EPS)


# ----------------------------------------------------------------------------------------------
# Scan ops and their split (module doc)

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


def _local_map(op: "ScanOp", trans: Tensor, u: Tensor, reverse: bool, reset: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(P, s) from the native split's carry-free pass alone (one pass instead of two)."""
    with torch.no_grad():
        part = op.local(trans, u, reverse, reset)
    return part.P, part.s


class ScanOp:
    """A family of linear recurrences; subclasses fix the layout of `trans`, `u` and the state."""

    name = "scan"
    backend: Optional[str] = None  # an explicit backend for this op; None: resolve_backend's rules

    def __init__(self, backend: Optional[str] = None):
        self.backend = backend

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


class GatedScan(ScanOp):
    """The selective mixers' ops: gate logits in, not transitions. On CUDA (or backend "triton") the
    fused Triton kernels (`fused_scan`, `fused_local`, given by the subclass) normalise the rows in
    registers so the m x m transitions never reach memory; elsewhere the rows are normalised here
    and `inner` (the block or companion op) scans the result. Both keep the ScanOp interface."""

    inner: ScanOp

    def __init__(self, norm: str = "softmax", backend: Optional[str] = None):
        self.norm, self.backend = norm, backend

    def fused(self, logits: Tensor) -> bool:
        """Whether the fused Triton kernels run these gate logits (resolve_backend)."""
        return resolve_backend(self.name, logits, backend=self.backend) == "triton"

    fused_scan = fused_local = None  # the subclass's Triton entry points

    def split(self, logits: Tensor):
        """Normalised rows -> (transitions, input weight a0)."""
        P = normalize_rows(logits, self.norm)
        return P[..., :-1], P[..., -1]

    def __call__(self, logits, v, h0=None, reverse=False, reset=None):
        if self.fused(logits):
            return self.fused_scan(logits, v, h0, reverse, transition_mask(reset, reverse), norm=self.norm)
        inner, trans, u = self.prepare(logits, v)
        return inner(trans, u, h0, reverse, reset)

    def prepare(self, logits, v):
        """The normalised rows and weighted input for `inner` (differentiable); on the Triton
        path nothing: the fused kernel keeps the transitions out of memory, which is worth more."""
        if self.fused(logits):
            return self, logits, v
        trans, a0 = self.split(logits)
        return self.inner, trans, a0 * v.to(a0.dtype)

    def local(self, logits, v, reverse=False, reset=None):
        """The split scan (ops module doc); on Triton the fused kernels' native split, the gates
        normalised in registers in every pass."""
        if self.fused(logits):
            return self.fused_local(logits, v, reverse, transition_mask(reset, reverse), norm=self.norm, op=self)
        return super().local(logits, v, reverse, reset)

    def product(self, logits, reverse=False, reset=None):
        return self.inner.product(self.split(logits)[0], reverse, reset)

    def apply(self, P, h):
        return self.inner.apply(P, h)

    def carry(self, logits, v, reverse=False, reset=None):
        """(P, s) of the slice in one pass, the gates normalised once. Values only (no autograd)."""
        with torch.no_grad():
            if self.fused(logits):  # the fused split's carry-free pass: gates normalised in registers
                part = self.local(logits, v, reverse, reset)
                return part.P, part.s
            trans, a0 = self.split(logits)
            return self.inner.carry(trans, a0 * v.to(a0.dtype), reverse, reset)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.norm!r})"


# ----------------------------------------------------------------------------------------------
# The chunk layout of the CPU paths (module doc)

def default_chunk(T: int) -> int:
    """Steps per chunk: ~sqrt(T) balances the in-chunk loop against the loop over chunks; a divisor
    of T within a factor 2 of it when there is one (no padding, and the diag scan reads in place)."""
    c = max(1, min(T, int(math.ceil(math.sqrt(T)))))
    for d in sorted(range(max(1, c // 2), min(T, 2 * c) + 1), key=lambda d: abs(d - c)):
        if T % d == 0:
            return d
    return c


def _segments(a: int, b: int, C: int) -> Iterator[Tuple[int, int, Optional[int], int]]:
    """Split positions [a, b) into runs (p, chunk, i, n): a run of n whole chunks (i None) or
    n positions i.. inside one chunk."""
    p = a
    while p < b:
        c, i = divmod(p, C)
        if i == 0 and b - p >= C:
            k = (b - p) // C
            yield p, c, None, k
            p += k * C
        else:
            n = min(C - i, b - p)
            yield p, c, i, n
            p += n


def _put(v: Tensor, a: int, b: int, C: int, src) -> None:
    """v: (B, nc, C, *r) view of a chunk buffer; write positions [a, b) from src (B, b-a, *r) or a fill."""
    for p, c, i, n in _segments(a, b, C):
        if isinstance(src, Tensor) and src.dim() == v.dim() - 1:
            s = src[:, p - a:p - a + (n * C if i is None else n)]
            if i is None:
                v[:, c:c + n] = s.unflatten(1, (n, C))
            else:
                v[:, c, i:i + n] = s
        elif i is None:
            v[:, c:c + n] = src
        else:
            v[:, c, i:i + n] = src


def _chunk(x: Tensor, C: int, nc: int, fill, dtype: torch.dtype, shift: int = 0,
           out: Optional[Tensor] = None) -> Tensor:
    """x (B, Tx, *r) -> (C, B, nc, *r): position p = c*C + i holds x[:, p + shift], `fill` outside."""
    B, Tx = x.shape[:2]
    if out is None:
        out = torch.empty((C, B, nc) + tuple(x.shape[2:]), dtype=dtype, device=x.device)
    v = out.movedim(0, 2)
    Tp = nc * C
    # Positions past the sequence are padding even where a shift reaches back into it (a padded
    # chunk's end state is then the slice's last state, which the slice maps rely on).
    lo = max(0, -shift)
    hi = max(lo, min(Tp, Tx, Tx - shift))
    if not isinstance(fill, Tensor):
        fill = torch.tensor(fill, dtype=dtype, device=x.device)
    _put(v, 0, lo, C, fill)
    _put(v, hi, Tp, C, fill)
    _put(v, lo, hi, C, x[:, lo + shift:hi + shift])
    return out


def _unchunk(xc: Tensor, T: int) -> Tensor:
    """(C, B, nc, *r) -> (B, T, *r) (drops the padding)."""
    C, B = xc.shape[:2]
    v = xc.movedim(0, 2)
    out = xc.new_empty((B, T) + tuple(xc.shape[3:]))
    for p, c, i, n in _segments(0, T, C):
        if i is None:
            out[:, p:p + n * C].unflatten(1, (n, C)).copy_(v[:, c:c + n])
        else:
            out[:, p:p + n].copy_(v[:, c, i:i + n])
    return out


def _orders(C: int, nc: int, reverse: bool):
    steps = range(C - 1, -1, -1) if reverse else range(C)
    chunks = range(nc - 1, -1, -1) if reverse else range(nc)
    return list(steps), list(chunks)


def _fold_maps(E: Tensor, chunks) -> Tensor:
    """E: (nc, R, m, m+1) chunk maps [P | s] -> the whole slice's [P | s] (R, m, m+1), along `chunks`."""
    Y = E[chunks[0]].clone()
    m = Y.shape[-2]
    for c in chunks[1:]:
        Y = torch.bmm(E[c, :, :, :m], Y)
        Y[:, :, m].add_(E[c, :, :, m])
    return Y


def _map_of_ends(end: Tensor, chunks) -> Tuple[Tensor, Tensor]:
    """end: (m, m+1, B, nc, N) chunk maps [P | s] -> the slice's (P (B, N, m, m), s (B, N, m))."""
    m, _, B, nc, N = end.shape
    Y = _fold_maps(end.permute(3, 2, 4, 0, 1).reshape(nc, B * N, m, m + 1), chunks).view(B, N, m, m + 1)
    return Y[..., :m], Y[..., m]


def _carries(end: Tensor, h0: Optional[Tensor], chunks) -> Tensor:
    """Fold the chunk maps: h_in(next) = P h_in + s along `chunks` (scan order).

    end: (m, m+1, B, nc, N) = [P | s] of every chunk, h0: (B, N, m) or None -> h_in (m, B, nc, N).
    """
    m, _, B, nc, N = end.shape
    E = end.permute(3, 2, 4, 0, 1).reshape(nc, B * N, m, m + 1)  # small: one matrix per chunk
    hin = torch.zeros((nc, B * N, m, 1), dtype=end.dtype, device=end.device)
    if h0 is not None:
        hin[chunks[0], :, :, 0] = h0.reshape(B * N, m)
    for c0, c in zip(chunks[:-1], chunks[1:]):
        torch.baddbmm(E[c0, :, :, m:], E[c0, :, :, :m], hin[c0], out=hin[c])
    return hin.view(nc, B, N, m).permute(3, 1, 0, 2)


def _keep_steps(cut: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """(B, T) cuts -> a 0/1 factor broadcasting over x (B, T, ...): the mask's own backward."""
    if cut is None:
        return None
    return (~cut).to(x.dtype).reshape(*cut.shape, *([1] * (x.dim() - 2)))


class _Split(LocalScan):
    """What the three split scans share: dtypes, the saved tensors' hand-over, the last state."""

    def __init__(self, trans: Tensor, u: Tensor, reverse: bool, chunk: Optional[int]):
        T = u.shape[1]
        self.C, self.reverse = min(chunk or default_chunk(T), T), reverse
        self.dt, self.dtypes, self.h0_dtype = acc_dtype(trans, u), (trans.dtype, u.dtype), None
        self._saved = None

    def _h0(self, h0: Optional[Tensor]) -> Optional[Tensor]:
        self.h0_dtype = None if h0 is None else h0.dtype
        return None if h0 is None else h0.to(self.dt)

    def saved(self):
        out, self._saved = self._saved, None
        return out

    def _grads(self, d_trans: Tensor, d_u: Tensor, d_h0: Optional[Tensor]):
        return (d_trans.to(self.dtypes[0]), d_u.to(self.dtypes[1]),
                None if self.h0_dtype is None else d_h0.to(self.h0_dtype))


def block_product_tree(A: Tensor, reverse: bool = False) -> Tensor:
    """State map of a whole slice by a log-depth pairwise tree (differentiable through autograd).

    Forward: A_T ... A_1; reverse: A_1 ... A_T. A: (B, T, N, m, m) -> (B, N, m, m), accumulation dtype.
    """
    check_tensor("A", A, [None, None, None, None, None], "(B, T, N, m, m)")
    B, T, N, m, m2 = A.shape
    if m != m2 or not 1 <= m <= MAX_BLOCK_SIZE or T < 1:
        raise ValueError(f"A: expected shape (B, T>=1, N, m, m) with m in 1..{MAX_BLOCK_SIZE}, got {tuple(A.shape)}")
    X = A.to(acc_dtype(A))
    while X.shape[1] > 1:
        n = X.shape[1]
        pairs = X[:, :n - n % 2].unflatten(1, (n // 2, 2))
        early, late = pairs[:, :, 0], pairs[:, :, 1]
        Y = early @ late if reverse else late @ early
        X = torch.cat([Y, X[:, n - 1:]], 1) if n % 2 else Y  # an odd last one is the latest: it stays last
    return X[:, 0]
