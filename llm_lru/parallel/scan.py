"""Recurrent carries across SP ranks: a ScanOp that wraps any ScanOp (DESIGN.md §4).

Each rank holds a contiguous slice of the sequence. "Scan order" is rank order for forward
scans and reversed rank order for reverse scans (BLUR's backward-in-time half); the owner of
the sequence start in scan order (rank 0 forward, rank K-1 reverse) is the only rank whose h0
counts. With c_k the state entering slice k (scan order) and d_k the state leaving it:

    d_k = P_k c_k + s_k           (P_k, s_k): the slice map of the op's carry-free pass
    c_{k+1} = keep_k * d_k        keep_k = 0 for a batch row whose document starts at the
                                  slice's position 0 in a reverse scan (the carry toward the
                                  previous document is dropped; forward resets are inside P_k)
    returned h_last = d_{K-1}     the whole sequence's final state, the same on every rank

Every layer runs the op's split scan (llm_lru.kernels.common.scan: `part = op.local(...)`, `part.finish(c)`) in
three steps written out below: the carry-free pass, the exchange, the finish. Backward mirrors
it: the carry-free adjoint pass (`part.adjoint`) gives a_k = dL/dc_k from the slice's own
outputs, the exchange gives the gradient at its final state, `grad.finish` writes the rest.

carry="allgather" (LASP-2 style): ONE all-gather per layer of every rank's (P_k, s_k, keep_k);
every rank folds its c_k. Backward: ONE all-gather of (a_k, dL/dh_last) lets every rank fold
the gradient that later ranks send to its final state, delta_k = keep_k * (a_{k+1} + P_{k+1}^T
delta_{k+1}).

carry="ring": rank k receives c_k from rank k-1 and sends c_{k+1} = keep_k * (P_k c_k + s_k) on
before it writes its states; the final state is broadcast from the last rank. Backward: the
gradient of c travels the other way, one send per rank, sent (a_k + P_k^T delta_k) before the
slice's gradients are written. Under a graph the sends do not wait for the receiver (isend,
waited for in backward and at backward's end), so a rank runs ahead of the ones it feeds.

The op's stateless work (`ScanOp.prepare`: gate normalisation) runs before the split, under
autograd. What the backward needs goes through ctx.save_for_backward, so activation
checkpointing drops it and recomputes it (the recomputed forward exchanges again, on every rank).

Gradient convention (both carries): the total loss is the SUM of the ranks' local losses; every
input's gradient on every rank is exact for that total (h0's gradient lands on its owner, zeros
elsewhere). Every rank must run backward through every SP scan it ran (collectives inside).
Not twice differentiable.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from llm_lru.config import CARRIES
from llm_lru.kernels import ScanOp

from .comm import all_gather, all_reduce, broadcast, group_rank, group_size, recv, send, send_async, wait_sends

Tensor = torch.Tensor


def _order(rank: int, k: int, reverse: bool) -> int:
    """Group rank <-> position in scan order (an involution)."""
    return k - 1 - rank if reverse else rank


def _keep(reset: Optional[Tensor], reverse: bool, s: Tensor, dt: torch.dtype) -> Tensor:
    """(B, 1, ...) factor for the carry leaving this slice: 0 where a reverse scan must drop it."""
    B = s.shape[0]
    if reverse and reset is not None:
        keep = (~reset[:, 0]).to(dt)
    else:
        keep = torch.ones(B, dtype=dt, device=s.device)
    return keep.view(B, *([1] * (s.dim() - 1)))


def _carry_dtype(*xs: Tensor) -> torch.dtype:
    dt = torch.float32  # carries are folded in fp32 at least, whatever the input dtype
    for x in xs:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def _unpack(got: Tensor, shapes: Sequence[torch.Size], k: int, reverse: bool) -> List[List[Tensor]]:
    """(K, n) gathered rows -> per field, a list in scan order."""
    fields, at = [], 0
    for shape in shapes:
        n = shape.numel()
        rows = got[:, at:at + n]
        fields.append([rows[_order(j, k, reverse)].view(shape) for j in range(k)])
        at += n
    return fields


def _start(ctx, inner: ScanOp, group, reverse: bool, reset, trans: Tensor, u: Tensor):
    """This rank's position and its carry-free pass: (K, k, part)."""
    K = group_size(group)
    k = _order(group_rank(group), K, reverse)
    ctx.inner, ctx.group, ctx.reverse, ctx.K, ctx.k = inner, group, reverse, K, k
    return K, k, inner.local(trans, u, reverse, reset)


def _stash(ctx, part, h0: Optional[Tensor], final_state: bool, h: Tensor, d: Tensor, final: Tensor):
    """Hand the part's saved tensors to autograd; the outputs (see SPScan for final_state)."""
    ctx.save_for_backward(*part.saved())
    ctx.part, ctx.h0_like, ctx.final_state = part, h0, final_state
    if not final_state:  # this slice's own final state, no gradient
        ctx.mark_non_differentiable(d)
        return h, d
    return h, final.to(d.dtype)


def _input_grads(ctx, grad, delta: Tensor):
    """(g_trans, g_u, g_h0) of the slice, finished from delta = dL/dh_last; h0's only on its owner."""
    g_trans, g_u, g_c = grad.finish(delta)
    h0 = ctx.h0_like
    g_h0 = None
    if h0 is not None and h0.requires_grad:
        g_h0 = g_c.to(h0.dtype) if ctx.k == 0 else torch.zeros_like(h0)
    ctx.part = None
    return None, None, None, None, None, g_trans, g_u, g_h0


class _AllGatherScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inner, group, reverse, reset, final_state, trans, u, h0):
        K, k, part = _start(ctx, inner, group, reverse, reset, trans, u)
        dt = _carry_dtype(part.P, part.s)
        s = part.s if k > 0 or h0 is None else inner.apply(part.P, h0.to(part.P.dtype)) + part.s
        keep = _keep(reset, reverse, s, dt)
        got = all_gather(torch.cat([part.P.reshape(-1).to(dt), s.reshape(-1).to(dt), keep.reshape(-1)]), group)
        Ps, Ss, keeps = _unpack(got, [part.P.shape, s.shape, keep.shape], K, reverse)
        c, d = None, None  # fold: c = the carry entering slice j, d = the state leaving it
        for j in range(K):
            if j == k:
                c_k = c
            d = Ss[j] if c is None else inner.apply(Ps[j], c) + Ss[j]
            c = keeps[j] * d
        h, d_k = part.finish(h0 if k == 0 else c_k)
        ctx.Ps, ctx.keeps = Ps, keeps
        return _stash(ctx, part, h0, final_state, h, d_k, d)

    @staticmethod
    def backward(ctx, g_h, g_final):
        k, K, inner = ctx.k, ctx.K, ctx.inner
        grad = ctx.part.adjoint(g_h, ctx.saved_tensors)  # a_k = grad.a, before any exchange
        a = grad.a if k > 0 else torch.zeros_like(grad.a)  # the owner's c is h0: nobody folds it
        dt = ctx.Ps[0].dtype
        if ctx.final_state:
            g_fin = torch.zeros_like(a) if g_final is None else g_final
            got = all_gather(torch.cat([a.reshape(-1).to(dt), g_fin.reshape(-1).to(dt)]), ctx.group)
            As, Gs = _unpack(got, [a.shape, a.shape], K, ctx.reverse)
            delta = sum(Gs[1:], Gs[0])  # the final state's gradient, summed over every rank's use of it
        else:
            As = _unpack(all_gather(a.to(dt), ctx.group).view(K, -1), [a.shape], K, ctx.reverse)[0]
            delta = torch.zeros_like(As[0])
        for j in range(K - 1, k, -1):  # the gradient leaving slice j toward slice j - 1
            delta = ctx.keeps[j - 1] * (As[j] + inner.apply_t(ctx.Ps[j], delta))
        return _input_grads(ctx, grad, delta)


class _RingScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inner, group, reverse, reset, final_state, trans, u, h0):
        K, k, part = _start(ctx, inner, group, reverse, reset, trans, u)
        prev, nxt, last = _order(k - 1, K, reverse), _order(k + 1, K, reverse), _order(K - 1, K, reverse)
        like = torch.zeros_like(part.s)
        keep = _keep(reset, reverse, like, like.dtype)
        c = recv(like, prev, group) if k > 0 else h0
        if k < K - 1:  # the next rank's carry before this slice's states are written
            d = part.s if c is None else inner.apply(part.P, c.to(part.P.dtype)) + part.s
            # with a graph, do not idle until the next rank posts its recv (waited for in backward)
            (send if isinstance(ctx, _NoCtx) else send_async)(keep * d, nxt, group)
        h, d = part.finish(c)
        ctx.prev, ctx.nxt, ctx.keep = prev, nxt, keep
        final = broadcast(d if k == K - 1 else like, last, group) if final_state else d
        return _stash(ctx, part, h0, final_state, h, d, final)

    @staticmethod
    def backward(ctx, g_h, g_final):
        k, K = ctx.k, ctx.K
        saved = ctx.saved_tensors  # first: under activation checkpointing this reruns the forward
        wait_sends()  # the forward's carries: every rank has received them (it finished its forward)
        grad = ctx.part.adjoint(g_h, saved)
        total = None
        if ctx.final_state:  # every rank's use of the final state (a collective: all ranks)
            total = all_reduce(torch.zeros_like(grad.a) if g_final is None else g_final, ctx.group)
        if k == K - 1:  # dL/dh_last of this slice: from the next rank, or the sequence's final state
            delta = total if total is not None else torch.zeros_like(grad.a)
        else:
            delta = ctx.keep * recv(grad.a, ctx.nxt, ctx.group)
        if k > 0:  # the previous rank's gradient before this slice's gradients are written
            send_async(grad.h0_grad(delta), ctx.prev, ctx.group)
        torch.autograd.Variable._execution_engine.queue_callback(wait_sends)  # done by backward's end
        return _input_grads(ctx, grad, delta.to(grad.a.dtype))


class SPScan(ScanOp):
    """The ScanOp `inner` over a sequence split across the ranks of `group` (see module doc).

    Called like the inner op on this rank's slice: (trans, u, h0, reverse, reset) -> (h, h_last),
    h for the slice, h_last the WHOLE sequence's final state (identical on every rank).
    `product`, `apply` and `apply_t` stay the inner op's, local to the slice.
    final_state=False: the caller does not need the sequence's final state (training): h_last is
    then this slice's own final state, without gradient, and no collective serves it (the ring
    carry then pipelines: a rank moves on to its next layer as soon as it has sent its carry).
    """

    def __init__(self, inner: ScanOp, group: Any, carry: str = "allgather", final_state: bool = True):
        if carry not in CARRIES:
            raise ValueError(f"parallel.carry: must be one of {', '.join(CARRIES)}, got '{carry}'")
        self.inner, self.group, self.carry, self.final_state = inner, group, carry, final_state
        self.name = f"sp_{inner.name}"

    def __call__(self, trans, u, h0=None, reverse=False, reset=None):
        if self.group is None or group_size(self.group) == 1:
            return self.inner(trans, u, h0, reverse, reset)
        # Stateless work (gate normalisation) first, under autograd: then a rank waits for its carry
        # only for the scan itself, and in backward sends its carry's gradient before going on to it.
        inner, trans, u = self.inner.prepare(trans, u)
        fn = _AllGatherScan if self.carry == "allgather" else _RingScan
        args = (inner, self.group, bool(reverse), reset, self.final_state, trans, u, h0)
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (trans, u, h0)):
            return fn.apply(*args)
        with torch.no_grad():  # inference: the same exchange, nothing kept
            return fn.forward(_NoCtx(), *args)

    def product(self, trans, reverse=False, reset=None):
        return self.inner.product(trans, reverse, reset)

    def apply(self, P, h):
        return self.inner.apply(P, h)

    def apply_t(self, P, g):
        return self.inner.apply_t(P, g)

    def __repr__(self) -> str:
        return f"SPScan({self.inner!r}, carry={self.carry!r})"


class _NoCtx:
    """Stands in for autograd's ctx when the forward runs without a graph."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass
