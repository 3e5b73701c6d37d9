"""The companion scan (H-LRU's order-m recurrence, DESIGN.md §2) y_t = sum_k a_t[k-1] y_{t-k} + x_t:
the ops a mixer holds (`COMPANION`, `GatedCompanionScan`, `CompanionLags` for the state readout),
the public functions, and the chunked PyTorch path (CPU, or any device); the Triton kernels are in
triton.py, the references in reference.py.

    companion_scan(a, x, h0=None, reverse=False, reset=None) -> (y, s_last)
      a: (B, T, N, m)  x: (B, T, N)  h0: (B, N, m) or None  reset: (B, T) bool per-step cuts or None
      -> y: (B, T, N) (the newest value of the state), s_last: (B, N, m)

As a block scan: state s_t = (y_t, ..., y_{t-m+1}), A_t the companion matrix of a_t; the chunked
path never forms it (the history form below), and its split phase is CompanionLocal.
GatedCompanionScan (H-LRU): m + 1 logits per channel normalised, a_{t,1..m} = P[..., :m],
a_{t,0} = P[..., m]; y_t = sum_k a_{t,k} y_{t-k} + a_{t,0} v_t (fused in registers on CUDA).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..block.reference import block_product_ref
from ..common.scan import (GatedScan, LocalGrad, LocalScan, ScanOp, TwoPassScan, _carries, _chunk, _local_map,
                           _map_of_ends, _Split, _unchunk, acc_dtype, check_companion, check_tensor, default_chunk,
                           resolve_backend, transition_mask)
from .reference import companion_matrix, companion_scan_ref

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# The chunked PyTorch path: an order-m scalar recurrence per channel, run on its outputs' history,
#   y_t = x_t + sum_k c_t[k-1] y_{t-k},   c_t[k-1] = a_t[k-1] if no cut in (t-k, t] else 0,
# so no m x m matrix is formed per step. The state s_t = (y_t, ..., y_{t-m+1}) with entries from
# before a cut zeroed; h0 = (y_{-1}, ..., y_{-m}).

def _quiet(reset: Tensor, m: int) -> Tensor:
    """(B, T) cuts -> (B, T, m+1) bool, q[t, j] = no cut in steps (t-j, t]."""
    cnt = torch.cumsum(reset.to(torch.int32), 1)
    cnt = torch.cat([cnt.new_zeros(cnt.shape[0], m), cnt], 1).unfold(1, m + 1, 1)  # times t-m..t
    return (cnt[..., m:] - cnt.flip(-1)) == 0


class _HistPass:
    """Pass 1 of y_t = x_t + sum_j cf_t[j] y_{t-m+j} (cf: coefficients oldest first, already
    masked), y_{-k} = hist[..., k-1], without autograd; then `slice_map()` and `finish(hist)`
    -> y (B, T, N) in the accumulation dtype, as _BlockPass.

    cf (B, T, N, m), x (B, T, N), qend (B, T, m) state masks or None.
    Within chunks the m impulse responses to the incoming state ride along with the local output
    (m + 1 columns), which is what the carries and the correction need. Struct-of-arrays layout
    as in _BlockPass.
    """

    def __init__(self, cf: Tensor, x: Tensor, C: int, qend: Optional[Tensor], dt: torch.dtype):
        B, T, N, m = cf.shape
        nc = -(-T // C)
        self.T, self.m, self.nc, self.qend = T, m, nc, qend
        cs = torch.empty((C, m, B, nc, N), dtype=dt, device=x.device)
        _chunk(cf, C, nc, 0.0, dt, out=cs.permute(0, 2, 3, 4, 1))
        Z = torch.zeros((m + C, m + 1, B, nc, N), dtype=dt, device=x.device)  # rows: times -m..C-1
        _chunk(x, C, nc, 0.0, dt, out=Z[m:, m])
        Z[:m, :m] = torch.eye(m, dtype=dt, device=x.device).flip(0).view(m, m, 1, 1, 1)  # y_{-k} = e_{k-1}
        for t in range(C):
            row = Z[m + t]
            for j in range(m):
                row.addcmul_(cs[t, j, None], Z[t + j])
        self.Z = Z

    def _ends(self) -> Tensor:
        """Chunk-end states [P | s] (m, m+1, B, nc, N) (state index j = time C-1-j), entries from
        before a cut zeroed."""
        Z, m = self.Z, self.m
        C = Z.shape[0] - m
        end = Z[C:].flip(0)
        if self.qend is not None:
            qe = _chunk(self.qend, C, self.nc, True, torch.bool)[C - 1]  # (B, nc, m)
            end = end * qe.permute(2, 0, 1)[:, None, :, :, None]
        return end

    def slice_map(self) -> Tuple[Tensor, Tensor]:
        """The slice's (P, s): the chunk-end maps, the last chunk's taken at the slice's last step
        (not the padded chunk end), folded."""
        Z, m, nc, T, qend = self.Z, self.m, self.nc, self.T, self.qend
        C = Z.shape[0] - m
        last = (T - 1) - (nc - 1) * C
        tail = Z[last + 1:last + m + 1].flip(0)[:, :, :, nc - 1]  # (m, m+1, B, N), state j = time last-j
        if qend is not None:
            tail = tail * qend[:, T - 1].t()[:, None, :, None]
        end = self._ends().clone()
        end[:, :, :, nc - 1] = tail
        return _map_of_ends(end, list(range(nc)))

    def finish(self, hist: Optional[Tensor]) -> Tensor:
        Z, m, T = self.Z, self.m, self.T
        if self.nc == 1 and hist is None:
            self.Z = None
            return _unchunk(Z[m:, m], T)
        hin = _carries(self._ends(), hist, list(range(self.nc)))
        self.Z = None
        y = Z[m:, m]
        for j in range(m):
            y.addcmul_(Z[m:, j], hin[j])
        return _unchunk(y, T)


def _history(y: Tensor, h0: Optional[Tensor], m: int) -> Tensor:
    """(B, T, N) outputs and h0 (B, N, m) -> (B, m + T, N), times -m..T-1."""
    B, T, N = y.shape
    pre = y.new_zeros(B, m, N) if h0 is None else h0.to(y.dtype).flip(-1).movedim(-1, 1)
    return torch.cat([pre, y], 1)


def _coefficients(a: Tensor, reset: Optional[Tensor], dt: torch.dtype) -> Tuple[Optional[Tensor], Tensor]:
    """(q, c): the quiet masks of the cuts (or None) and the masked coefficients in dtype dt."""
    m = a.shape[-1]
    q = None if reset is None else _quiet(reset, m)
    return q, (a.to(dt) if q is None else a.to(dt) * q[:, :, None, 1:])


def _last_state(y: Tensor, h0: Optional[Tensor], q: Optional[Tensor], m: int) -> Tensor:
    """(y_{T-1}, ..., y_{T-m}) with entries from before a cut zeroed."""
    s_last = _history(y, h0, m)[:, y.shape[1]:].flip(1).movedim(1, -1)
    return s_last if q is None else s_last * q[:, -1, None, :m]


class _CompanionAdjoint:
    """The adjoint of a forward companion scan, w_t = dL/dy_t + sum_k c_{t+k}[k-1] w_{t+k}, a
    reverse order-m recurrence. The gradient of the last state, dL/dy_{T-1-j} += gs[j] (masked like
    s_last), enters as the adjoint's history: w_{T+m-1-j} = gs[j], reaching w_{T-1-j} through a
    unit coefficient at lag m. Pass 1 in the constructor; `finish(gs)` -> w (B, T, N)."""

    def __init__(self, c: Tensor, q: Optional[Tensor], gy: Tensor, C: int):
        B, T, N, m = c.shape
        self.c, self.q, self.T = c, q, T
        cpad = torch.cat([c, c.new_zeros(B, m, N, m)], 1)
        b = torch.stack([cpad[:, k:k + T, :, k - 1] for k in range(1, m + 1)], -1)  # b_t[k-1] = c_{t+k}[k-1]
        b[:, max(T - m, 0):, :, m - 1] = 1
        self.pass_ = _HistPass(b.flip(1).flip(-1), gy.flip(1), C, None, acc_dtype(c, gy))

    def seed(self, gs: Tensor) -> Tensor:
        m = self.c.shape[-1]
        g = gs.to(self.c.dtype)
        return (g if self.q is None else g * self.q[:, -1, None, :m]).flip(-1)

    def finish(self, gs: Optional[Tensor]) -> Tensor:
        return self.pass_.finish(None if gs is None else self.seed(gs)).flip(1)

    def h0_grad(self, w_head: Tensor, gs: Optional[Tensor]) -> Tensor:
        """dL/dh0: y_{-1-j} feeds y_i through c_i[i+j] (w_head[..., i] = the adjoint w_i, i < min(m, T)),
        and for T < m sits in s_last itself (the masked dL/ds_last)."""
        c, T = self.c, self.T
        B, _, N, m = c.shape
        dh0 = torch.zeros(B, N, m, dtype=c.dtype, device=c.device)
        for i in range(min(m, T)):
            dh0[..., :m - i] += c[:, i, :, i:] * w_head[..., i, None]
        if T < m and gs is not None:
            dh0[..., :m - T] += self.seed(gs).flip(-1)[..., T:]
        return dh0


def _companion_da(a: Tensor, h0: Optional[Tensor], y: Tensor, w: Tensor, q: Optional[Tensor]) -> Tensor:
    """dL/da of a forward companion scan from its outputs y and adjoint w (in w's dtype)."""
    T, m = y.shape[1], a.shape[-1]
    hist = _history(y, h0, m)  # time t-1-k sits at index t + m - 1 - k
    da = torch.stack([hist[:, m - 1 - k:m - 1 - k + T] for k in range(m)], -1) * w[..., None]
    return da if q is None else da * q[:, :T, None, 1:]


class _CompanionFn(torch.autograd.Function):
    """Forward-direction companion scan; the reverse direction flips time around it."""

    @staticmethod
    def forward(ctx, a, x, h0, reset, C):
        dt = acc_dtype(a, x, h0)
        q, c = _coefficients(a, reset, dt)
        m = a.shape[-1]
        y = _HistPass(c.flip(-1), x, C, None if q is None else q[..., :m], dt).finish(h0)
        ctx.save_for_backward(a, h0, reset, y)
        ctx.C, ctx.x_dtype = C, x.dtype
        return y, _last_state(y, h0, q, m)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gs):
        a, h0, reset, y = ctx.saved_tensors
        q, c = _coefficients(a, reset, y.dtype)
        adj = _CompanionAdjoint(c, q, gy, ctx.C)
        w = adj.finish(gs)  # (B, T, N)
        da = _companion_da(a, h0, y, w, q).to(a.dtype) if ctx.needs_input_grad[0] else None
        dh0 = None
        if h0 is not None and ctx.needs_input_grad[2]:
            dh0 = adj.h0_grad(w[:, :a.shape[-1]].movedim(1, -1), gs).to(h0.dtype)
        dx = w.to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        return da, dx, dh0, None, None


def companion_scan_chunked(a: Tensor, x: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                           reset: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """y_t = sum_k a_t[k-1] y_{t-k} + x_t (reverse: y_{t+k}), chunked; same contract as companion_scan_ref.

    a: (B, T, N, m)  x: (B, T, N)  h0: (B, N, m) or None  reset: (B, T) bool cuts or None
    -> y (B, T, N), s_last (B, N, m).
    """
    check_companion(a, x, h0, reset)
    T = x.shape[1]
    C = min(chunk or default_chunk(T), T)
    if not reverse:
        return _CompanionFn.apply(a, x, h0, reset, C)
    # Reverse time is forward time on flipped sequences (autograd flips the gradients back).
    y, s = _CompanionFn.apply(a.flip(1), x.flip(1), h0, None if reset is None else reset.flip(1), C)
    return y.flip(1), s


class CompanionLocal(_Split):
    """The split companion scan (common.scan.LocalScan). a: (B, T, N, m), x: (B, T, N); reset: per-step
    cuts (B, T) or None (transition_mask of document starts, as companion_scan takes them).
    Reverse runs forward on flipped time, as companion_scan_chunked does."""

    def __init__(self, a: Tensor, x: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                 chunk: Optional[int] = None):
        check_companion(a, x, None, reset)
        super().__init__(a, x, reverse, chunk)
        if reverse:
            a, x, reset = a.flip(1), x.flip(1), None if reset is None else reset.flip(1)
        self.a, self.reset = a, reset
        self.q, c = _coefficients(a, reset, self.dt)
        m = a.shape[-1]
        self._pass = _HistPass(c.flip(-1), x, self.C, None if self.q is None else self.q[..., :m], self.dt)
        self.P, self.s = self._pass.slice_map()

    def finish(self, h0):
        h0 = self._h0(h0)
        y = self._pass.finish(h0)
        s_last = _last_state(y, h0, self.q, self.a.shape[-1])
        self._pass, self._saved, self.a = None, (self.a, h0, y), None
        return (y.flip(1) if self.reverse else y), s_last

    def adjoint(self, g_y, saved):
        return _CompanionGrad(self, g_y, *saved)


class _CompanionGrad(LocalGrad):
    def __init__(self, part: CompanionLocal, g_y: Optional[Tensor], a: Tensor, h0: Optional[Tensor], y: Tensor):
        super().__init__(COMPANION, part.P)
        self.part, self.a_in, self.h0, self.y = part, a, h0, y
        g_y = torch.zeros_like(y) if g_y is None else (g_y.flip(1) if part.reverse else g_y)
        self.q, c = _coefficients(a, part.reset, y.dtype)
        self.adj = _CompanionAdjoint(c, self.q, g_y, part.C)
        _, w_head = self.adj.pass_.slice_map()  # (w_0, ..., w_{m-1}) when dL/ds_last = 0
        self.a = self.adj.h0_grad(w_head, None)

    def finish(self, g_last):
        w = self.adj.finish(g_last)
        m = self.a_in.shape[-1]
        da = _companion_da(self.a_in, self.h0, self.y, w, self.q)
        dh0 = None if self.h0 is None else self.adj.h0_grad(w[:, :m].movedim(1, -1), g_last)
        if self.part.reverse:
            da, w = da.flip(1), w.flip(1)
        out = self.part._grads(da, w, dh0)
        self.adj = self.a_in = self.h0 = self.y = None
        return out


def companion_product_chunked(a: Tensor, reverse: bool = False, reset: Optional[Tensor] = None) -> Tensor:
    """State map of a companion slice, P with s_last(h0) = P h0 + s_last(0), without forming the
    (B, T, N, m, m) companion matrices: column j is the last state of the companion scan from
    h0 = e_j with no input (m scans, each differentiable with the lean backward above).

    a: (B, T, N, m)  reset: (B, T) bool cuts or None -> P (B, N, m, m), accumulation dtype.
    """
    check_tensor("a", a, [None, None, None, None], "(B, T, N, m)")
    check_companion(a, a[..., 0], None, reset)
    B, T, N, m = a.shape
    dt = acc_dtype(a)
    zero = torch.zeros((), dtype=dt, device=a.device).expand(B, T, N)
    eye = torch.eye(m, dtype=dt, device=a.device)
    cols = [companion_scan_chunked(a, zero, eye[j].expand(B, N, m), reverse, reset)[1] for j in range(m)]
    return torch.stack(cols, -1)


# ----------------------------------------------------------------------------------------------
# The ops

def companion_scan(a: Tensor, x: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                   reset: Optional[Tensor] = None, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """y_t = sum_k a_t[k-1] y_{t-k} + x_t. a: (B, T, N, m), x: (B, T, N) -> y (B, T, N), state (B, N, m).

    reset: (B, T) bool per-step cuts (reset[b, t] zeroes the whole transition of step t) or None.
    backend: as block_scan.
    """
    backend = resolve_backend("companion", a, x, h0, backend=backend)
    if backend == "ref":
        return companion_scan_ref(a, x, h0, reverse, reset)
    if backend == "triton":
        from .triton import companion_scan_triton
        return companion_scan_triton(a, x, h0, reverse, reset)
    return companion_scan_chunked(a, x, h0, reverse, reset)


def companion_product(a: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                      backend: Optional[str] = None) -> Tensor:
    """State map of a companion (H-LRU) slice: the product of the companion matrices of a, with the
    steps where reset[b, t] (per-step cuts) zeroed. a: (B, T, N, m) -> (B, N, m, m).

    "ref" multiplies the materialised matrices; the other backends never form (B, T, N, m, m).
    """
    if resolve_backend("companion_product", a, backend=backend) == "ref":
        C = companion_matrix(a)
        if reset is not None:
            C = C * (~reset).to(C.dtype)[:, :, None, None, None]
        return block_product_ref(C, reverse)
    return companion_product_chunked(a, reverse, reset)


class CompanionScan(ScanOp):
    """trans = a: (B, T, N, m) (first row of the companion matrix), u = x: (B, T, N), state (B, N, m).

    Returns y: (B, T, N) (the newest value of the state) and the full last state (B, N, m).
    """

    name = "companion"

    def __call__(self, a, x, h0=None, reverse=False, reset=None):
        return companion_scan(a, x, h0, reverse, transition_mask(reset, reverse), self.backend)

    def product(self, a, reverse=False, reset=None):
        return companion_product(a, reverse, transition_mask(reset, reverse), self.backend)

    def local(self, a, x, reverse=False, reset=None):
        backend = resolve_backend(self.name, a, x, backend=self.backend)
        if backend == "torch":
            return CompanionLocal(a, x, reverse, transition_mask(reset, reverse))
        if backend == "triton":
            from .triton import companion_local_triton
            return companion_local_triton(a, x, reverse, transition_mask(reset, reverse), op=self)
        return TwoPassScan(self, a, x, reverse, reset)

    def carry(self, a, x, reverse=False, reset=None):
        native = resolve_backend(self.name, a, x, backend=self.backend) != "ref"  # the reference does not split
        return _local_map(self, a, x, reverse, reset) if native else super().carry(a, x, reverse, reset)


COMPANION = CompanionScan()


class GatedCompanionScan(GatedScan):
    """H-LRU. trans = gate logits (B, T, N, m+1), u = values v (B, T, N); state (B, N, m).

    Rows normalised over m+1 entries: a_{t,1..m} = P[..., :m], a_{t,0} = P[..., m];
    y_t = sum_k a_{t,k} y_{t-k} + a_{t,0} v_t.
    """

    name = "hlru"
    inner = COMPANION

    @staticmethod
    def fused_scan(*args, **kw):
        from .triton import hlru_scan_triton
        return hlru_scan_triton(*args, **kw)

    @staticmethod
    def fused_local(*args, **kw):
        from .triton import companion_local_triton
        return companion_local_triton(*args, **kw)


def _lags_of(h0: Optional[Tensor], m: int, like: Tensor) -> Tensor:
    """The m - 1 values before a slice in time order, (B, m - 1, N), from its initial companion
    state h0 (B, N, m) with h0[..., k - 1] = y_{-k}; zeros without h0. like: y (B, T, N)."""
    if h0 is None:
        return like.new_zeros(like.shape[0], m - 1, like.shape[2])
    return h0[..., : m - 1].flip(-1).transpose(1, 2).to(like.dtype)


class CompanionLags(ScanOp):
    """A companion-layout op (H-LRU) whose output also holds the m - 1 values before the slice.

        op(trans, u, h0, reverse=False, reset) -> (y_ext (B, m - 1 + T, N), s_last (B, N, m))

    y_ext[:, m - 1 + t] = y_t and y_ext[:, m - 1 - k] = y_{-k} = h0[..., k - 1] (zeros without h0),
    so the state readout gets every lag by shifting y instead of storing m copies of it. The lags
    come from h0, so the split scan of sequence parallelism (`local`) gives them from the carry,
    and their gradient joins dL/dh0. product / apply / carry are the inner op's.
    """

    def __init__(self, inner: ScanOp, m: int):
        self.inner, self.m = inner, m
        self.name = f"{inner.name}_lags"

    def __call__(self, trans, u, h0=None, reverse=False, reset=None):
        if reverse:
            raise ValueError("CompanionLags: the H-LRU state readout is causal (reverse=False only)")
        y, s_last = self.inner(trans, u, h0, reverse, reset)
        if self.m == 1:
            return y, s_last
        return torch.cat([_lags_of(h0, self.m, y), y], 1), s_last

    def prepare(self, trans, u):
        inner, trans, u = self.inner.prepare(trans, u)
        return CompanionLags(inner, self.m), trans, u

    def local(self, trans, u, reverse=False, reset=None):
        if reverse:
            raise ValueError("CompanionLags: the H-LRU state readout is causal (reverse=False only)")
        part = self.inner.local(trans, u, reverse, reset)
        return part if self.m == 1 else _LagsLocal(part, self.m)

    def product(self, trans, reverse=False, reset=None):
        return self.inner.product(trans, reverse, reset)

    def carry(self, trans, u, reverse=False, reset=None):
        return self.inner.carry(trans, u, reverse, reset)

    def apply(self, P, h):
        return self.inner.apply(P, h)

    def apply_t(self, P, g):
        return self.inner.apply_t(P, g)

    def __repr__(self) -> str:
        return f"CompanionLags({self.inner!r}, m={self.m})"


class _LagsLocal(LocalScan):
    """CompanionLags' split scan: the inner op's, with the lags taken from h0 at `finish` and
    their gradient added to dL/dh0 (in `a` too, so a carry's gradient can leave before `finish`)."""

    def __init__(self, part: LocalScan, m: int):
        self.part, self.m = part, m

    @property
    def P(self):
        return self.part.P

    @property
    def s(self):
        return self.part.s

    def finish(self, h0):
        y, h_last = self.part.finish(h0)
        return torch.cat([_lags_of(h0, self.m, y), y], 1), h_last

    def saved(self):
        return self.part.saved()

    def adjoint(self, g_h, saved):
        m = self.m
        g_y = None if g_h is None else g_h[:, m - 1:]
        grad = self.part.adjoint(g_y, saved)
        g_lags = None
        if g_h is not None:  # y_ext[:, m - 1 - k] = h0[..., k - 1]
            g_lags = F.pad(g_h[:, : m - 1].transpose(1, 2).flip(-1), (0, 1))
        return _LagsGrad(grad, g_lags)


class _LagsGrad(LocalGrad):
    def __init__(self, grad: LocalGrad, g_lags: Optional[Tensor]):
        super().__init__(grad.op, grad.P)
        self.grad = grad
        self.g_lags = None if g_lags is None else g_lags.to(grad.a.dtype)
        self.a = grad.a if g_lags is None else grad.a + self.g_lags

    def finish(self, g_last):
        g_trans, g_u, g_h0 = self.grad.finish(g_last)
        if g_h0 is not None and self.g_lags is not None:
            g_h0 = g_h0 + self.g_lags.to(g_h0.dtype)
        return g_trans, g_u, g_h0
