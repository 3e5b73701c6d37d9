"""Recurrent carries across SP ranks: a ScanOp that wraps any ScanOp (DESIGN.md §4).

Each rank holds a contiguous slice of the sequence. "Scan order" is rank order for forward
scans and reversed rank order for reverse scans (BLUR's backward-in-time half); the owner of
the sequence start in scan order (rank 0 forward, rank K-1 reverse) is the only rank whose h0
counts. With c_k the state entering slice k (scan order) and d_k the state leaving it:

    d_k = P_k c_k + s_k           P_k = inner.product(slice), s_k = slice's h_last from zero
    c_{k+1} = keep_k * d_k        keep_k = 0 for a batch row whose document starts at the
                                  slice's position 0 in a reverse scan (the carry toward the
                                  previous document is dropped; forward resets are inside P_k)
    returned h_last = d_{K-1}     the whole sequence's final state, the same on every rank

Where the op defers its initial state (`defers_state`: the chunked PyTorch scans, see
kernels.chunked.deferred_state), a rank never waits for a carry before it scans: its scan runs
the carry-free pass (every chunk from zero), then asks for its carry with the slice's (P_k, s_k)
in hand, then writes its states from it. Backward alike: the backward scan's carry-free pass,
then dL/dh_last, and dL/dc_k handed back from the backward scan's own map before the slice's
gradients are written. What stays in the critical path per layer is the small fold over chunks.

carry="allgather" (LASP-2 style): ONE all-gather per layer of every rank's (P_k, s_k, keep_k),
taken inside the scan after its carry-free pass; every rank folds its c_k and finishes its
scan from it. Backward mirrors it: each rank's a_k = dL/dc_k from its own outputs alone (its
backward scan's map with a zero seed), ONE all-gather of (a_k, dL/dh_last) lets every rank fold
the gradient that later ranks send to its final state, delta_k = keep_k * (a_{k+1} + P_{k+1}^T
delta_{k+1}), and the backward scan finishes from delta_k. Ops that read h0 first (reference,
Triton) instead compute (P_k, s_k) in a carry pass (`carry(trans, u, reverse, reset)`, one
pass where offered) and rescan from c_k, and differentiate twice (a_k's pass, then delta_k's);
with final_state=False the last rank then skips its carry pass (nobody folds its (P, s)).

carry="ring": rank k receives c_k from rank k-1 and sends c_{k+1} = keep_k * (P_k c_k + s_k) on
as soon as it has it (deferred: before it writes its states; otherwise after its scan); the
final state is broadcast from the last rank. Backward: the gradient of c travels the other way,
one send per rank. Under a graph the sends do not wait for the receiver (isend, waited for in
backward and at backward's end), so a rank runs ahead of the ones it feeds. The op's stateless
work (`ScanOp.prepare`: gate normalisation) runs before any carry is asked for, and its backward
after the carry's gradient has been sent.

Gradient convention (both carries): the total loss is the SUM of the ranks' local losses; every
input's gradient on every rank is exact for that total (h0's gradient lands on its owner, zeros
elsewhere). Every rank must run backward through every SP scan it ran (collectives inside).
Not twice differentiable.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from llm_lru.kernels.chunked import deferred_state
from llm_lru.kernels.ops import ScanOp

from .comm import all_gather, all_reduce, broadcast, group_rank, group_size, recv, send, send_async, wait_sends

Tensor = torch.Tensor
CARRIES = ("allgather", "ring")


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


def apply_transposed(op: ScanOp, P: Tensor, g: Tensor) -> Tensor:
    """P^T g for any op's state layout: the vector-Jacobian product of the linear map h -> apply(P, h)."""
    x = torch.zeros_like(g, requires_grad=True)
    with torch.enable_grad():
        y = op.apply(P.detach(), x)
    return torch.autograd.grad(y, x, g)[0]


def _outer_hooks_active() -> bool:
    """True inside activation checkpointing (or any saved-tensor hooks): the slice's graph must
    then be rebuilt in backward, because a nested autograd.grad would re-trigger the
    checkpoint's recomputation (and its collectives) on some ranks only."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except Exception:  # private API gone: keep the graph (shielded below), always correct
        return False


class _Slice:
    """This rank's slice scanned from carry c, and the autograd graph of that scan for backward.

    keep=True builds the graph in forward (shielded from outer saved-tensor hooks); keep=False
    runs the forward without a graph and `rebuild`s it in backward from the saved inputs and
    carry (one more scan, none of its activations held between forward and backward).
    """

    def __init__(self, inner: ScanOp, reverse: bool, reset: Optional[Tensor], keep: bool):
        self.inner, self.reverse, self.reset, self.keep = inner, reverse, reset, keep
        self.c: Optional[Tensor] = None
        self.deferral = None

    def run(self, trans: Tensor, u: Tensor, c: Optional[Tensor], c_grad: bool, build: bool,
            resolve: Optional[Callable] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(h, h_last, c) of the slice from carry c; records the graph when build (and keep).

        resolve: c is then only a template (shape, dtype) and the carry is resolve(slice_map),
        which the scan calls once its carry-free pass is done (chunked.deferred_state): a rank
        scans its chunks while its carry is on the way, and may send its own carry on before
        it writes its states."""
        self.c_grad = build and c is not None and c_grad
        if resolve is not None:
            c = torch.zeros_like(c)
        if build and self.keep:
            with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
                self._build(trans, u, c, resolve)
            return self.h.detach(), self.h_last.detach(), None if self.c is None else self.c.detach()
        with torch.no_grad(), self._deferring(c, resolve):
            h, h_last = self.inner(trans, u, c, self.reverse, self.reset)
        return h, h_last, c

    @contextmanager
    def _deferring(self, c: Optional[Tensor], resolve: Optional[Callable]):
        if resolve is None:
            yield
            return
        with deferred_state(c, resolve) as deferral:
            yield deferral
            if not deferral.consumed:
                raise RuntimeError(f"{self.inner!r} says it defers its initial state but never asked for it")

    def _build(self, trans: Tensor, u: Tensor, c: Optional[Tensor], resolve: Optional[Callable] = None) -> None:
        self.trans = trans.detach().requires_grad_(trans.requires_grad)
        self.u = u.detach().requires_grad_(u.requires_grad)
        self.c = None if c is None else c.detach().requires_grad_(self.c_grad)
        with torch.enable_grad(), self._deferring(self.c, resolve) as deferral:
            self.h, self.h_last = self.inner(self.trans, self.u, self.c, self.reverse, self.reset)
        self.deferral = deferral  # its `seed` defers backward's dL/dh_last the same way

    def rebuild(self, trans: Tensor, u: Tensor, c: Optional[Tensor]) -> None:
        if not self.keep:
            defer = c is not None and self.inner.defers_state(trans, u)
            self._build(trans, u, c, (lambda slice_map: c) if defer else None)

    def vjp_deferred(self, g_h: Tensor, seed: Callable) -> dict:
        """vjp of h alone, dL/dh_last coming from seed(h0_grad_of) once the backward scan's
        carry-free pass is done (see chunked.Deferral); seed runs exactly once, also when there is
        nothing to differentiate (it may hold a collective)."""
        self.deferral.seed = seed
        part = self.vjp([self.h], [g_h], with_c=True, retain=False)
        if self.deferral.seed is not None:
            self.deferral.seed = None
            seed(lambda extra: torch.zeros_like(self.h_last))
        return part

    def leaves(self, with_c: bool) -> List[Tensor]:
        xs = [self.trans, self.u] + ([self.c] if with_c and self.c is not None else [])
        return [x for x in xs if x.requires_grad]

    def vjp(self, outputs: Sequence[Tensor], grads: Sequence[Tensor], with_c: bool, retain: bool) -> dict:
        """{id(leaf): grad} for the slice's leaves, given the gradients of `outputs`."""
        leaves = self.leaves(with_c)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
        if not leaves or not pairs:
            return {}
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                  retain_graph=retain, allow_unused=True)
        return {id(x): g for x, g in zip(leaves, got) if g is not None}

    def input_grads(self, *parts: dict) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        out = []
        for x in (self.trans, self.u):
            gs = [p[id(x)] for p in parts if id(x) in p]
            out.append(sum(gs[1:], gs[0]) if gs else (torch.zeros_like(x) if x.requires_grad else None))
        return out[0], out[1]


def _state_like(inner: ScanOp, trans: Tensor, u: Tensor, reverse: bool) -> Tensor:
    """A state of the slice's shape and dtype, from a one-step probe scan."""
    with torch.no_grad():
        return inner(trans[:, :1], u[:, :1], None, reverse, None)[1]


def _slice_carry(inner: ScanOp, trans: Tensor, u: Tensor, reverse: bool, reset) -> Tuple[Tensor, Tensor]:
    """(P, s) of the slice: h_last(c) = P c + s. One pass when the op offers `carry` (e.g. a
    kernel that writes no states); else its scan from zero and its product."""
    carry = getattr(inner, "carry", None)
    if callable(carry):
        return carry(trans, u, reverse, reset)
    _, s = inner(trans, u, None, reverse, reset)
    return inner.product(trans, reverse, reset), s


def _fold(op: ScanOp, Ps: List[Tensor], Ss: List[Tensor], keeps: List[Tensor]) -> Tuple[List[Tensor], Tensor]:
    """Carries entering each slice (scan order; c_0 unused) and the final state d_{K-1}."""
    c: List[Optional[Tensor]] = [None]
    for j in range(len(Ss)):
        d = Ss[j] if c[j] is None else op.apply(Ps[j], c[j]) + Ss[j]
        c.append(keeps[j] * d)
    return c, d


def _unpack(got: Tensor, shapes: Sequence[torch.Size], k: int, reverse: bool) -> List[List[Tensor]]:
    """(K, n) gathered rows -> per field, a list in scan order."""
    fields, at = [], 0
    for shape in shapes:
        n = shape.numel()
        rows = got[:, at:at + n]
        fields.append([rows[_order(j, k, reverse)].view(shape) for j in range(k)])
        at += n
    return fields


def _save(ctx, sl: _Slice, build: bool, trans: Tensor, u: Tensor, c: Optional[Tensor]) -> None:
    """Without a kept graph, the slice's inputs and carry go through save_for_backward, so outer
    hooks (activation checkpointing) manage them like any other saved tensor."""
    if build and not sl.keep:
        ctx.save_for_backward(trans, u, c)


def _restore(ctx, sl: _Slice) -> None:
    if not sl.keep:
        sl.rebuild(*ctx.saved_tensors)


def _gather_fold(inner: ScanOp, group, reverse: bool, reset, P: Tensor, s: Tensor):
    """ONE all-gather of every slice's (P, s, keep) -> (Ps, keeps, carries, final state), scan order."""
    dt = _carry_dtype(P, s)
    keep_k = _keep(reset, reverse, s, dt)
    got = all_gather(torch.cat([P.reshape(-1).to(dt), s.reshape(-1).to(dt), keep_k.reshape(-1)]), group)
    Ps, Ss, keeps = _unpack(got, [P.shape, s.shape, keep_k.shape], group_size(group), reverse)
    cs, final = _fold(inner, Ps, Ss, keeps)
    return Ps, keeps, cs, final


def _allgather_two_pass(sl: "_Slice", inner: ScanOp, group, reverse: bool, reset, build: bool, final_state: bool,
                        trans: Tensor, u: Tensor, h0: Optional[Tensor], k: int, K: int):
    """The all-gather for ops that read h0 first (reference, Triton): a carry pass (P, s) from zero,
    the gather, and the slice scanned again from its carry. The owner of the sequence start scans
    once, from h0."""
    if k == 0:  # its scan from h0 is already the right one
        c = h0
        h, s, _ = sl.run(trans, u, h0, h0 is not None and h0.requires_grad, build)
        with torch.no_grad():  # P_0 is never needed; only its shape (one-step probe)
            P = torch.zeros_like(inner.product(trans[:, :1], reverse, None))
    elif k == K - 1 and not final_state:
        # Nobody folds the last slice's (P, s) unless the sequence's final state is served:
        # skip its carry pass and send zeros of the right shapes (one-step probes).
        with torch.no_grad():
            P = torch.zeros_like(inner.product(trans[:, :1], reverse, None))
            s = torch.zeros_like(_state_like(inner, trans, u, reverse))
    else:
        with torch.no_grad():
            P, s = _slice_carry(inner, trans, u, reverse, reset)
    Ps, keeps, cs, final = _gather_fold(inner, group, reverse, reset, P, s)
    d = s
    if k > 0:
        h, d, c = sl.run(trans, u, cs[k].to(s.dtype), True, build)
    return h, d, c, Ps, keeps, final


class _AllGatherScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inner, group, reverse, reset, build, keep, final_state, trans, u, h0):
        K, r = group_size(group), group_rank(group)
        k = _order(r, K, reverse)
        sl = _Slice(inner, reverse, reset, keep)
        if inner.defers_state(trans, u):
            # One scan per rank: its carry-free pass, then the gather (inside the scan), then its states.
            like = _state_like(inner, trans, u, reverse)
            ex = {}

            def resolve(slice_map):
                P, s = slice_map()
                if k == 0 and h0 is not None:  # the owner's slice starts from h0
                    s = inner.apply(P, h0.to(P.dtype)) + s
                ex["Ps"], ex["keeps"], cs, ex["final"] = _gather_fold(inner, group, reverse, reset, P, s)
                c = cs[k] if k > 0 else (h0 if h0 is not None else torch.zeros_like(like))
                return c.to(like.dtype)

            h, d, c = sl.run(trans, u, like, k > 0 or (h0 is not None and h0.requires_grad), build, resolve)
            Ps, keeps, final = ex["Ps"], ex["keeps"], ex["final"]
        else:
            h, d, c, Ps, keeps, final = _allgather_two_pass(sl, inner, group, reverse, reset, build, final_state,
                                                            trans, u, h0, k, K)
        _save(ctx, sl, build, trans, u, c)
        ctx.inner, ctx.group, ctx.reverse, ctx.k = inner, group, reverse, k
        ctx.sl, ctx.Ps, ctx.keeps, ctx.state_shape, ctx.dt = sl, Ps, keeps, d.shape, final.dtype
        ctx.h0_like, ctx.final_state = h0, final_state
        if not final_state:  # this slice's own final state, no gradient
            ctx.mark_non_differentiable(d)
            return h, d
        return h, final.to(d.dtype)

    @staticmethod
    def backward(ctx, g_h, g_final):
        sl, k, dt = ctx.sl, ctx.k, ctx.dt
        _restore(ctx, sl)
        K = len(ctx.Ps)
        g_h = torch.zeros_like(sl.h) if g_h is None else g_h
        zero_state = torch.zeros(ctx.state_shape, dtype=dt, device=g_h.device)

        def gather(a):  # a_k: the gradient at c_k from this slice's own outputs -> dL/dh_last of this slice
            if ctx.final_state:
                g_fin = zero_state if g_final is None else g_final.to(dt)
                got = all_gather(torch.cat([a.reshape(-1), g_fin.reshape(-1)]), ctx.group)
                As, Gs = _unpack(got, [a.shape, a.shape], K, ctx.reverse)
                delta = sum(Gs[1:], Gs[0])  # the final state's gradient, summed over every rank's use of it
            else:
                As = _unpack(all_gather(a, ctx.group).view(K, -1), [a.shape], K, ctx.reverse)[0]
                delta = zero_state
            for j in range(K - 1, k, -1):  # gradient leaving slice j toward slice j - 1
                delta = ctx.keeps[j - 1] * (As[j] + apply_transposed(ctx.inner, ctx.Ps[j], delta))
            return delta.to(sl.h_last.dtype)

        g_h0 = None
        if sl.deferral is not None:  # one backward scan: a_k, the gather, the rest
            def seed(h0_grad_of):
                return gather(h0_grad_of(torch.zeros_like(sl.h_last)).to(dt) if k > 0 else zero_state)
            part = sl.vjp_deferred(g_h, seed)
            g_c = part.pop(id(sl.c), None) if sl.c is not None else None
            g_trans, g_u = sl.input_grads(part)
            if k == 0 and sl.c.requires_grad:
                g_h0 = (g_c if g_c is not None else torch.zeros_like(sl.c)).to(ctx.h0_like.dtype)
        elif k == 0:
            part = sl.vjp([sl.h, sl.h_last], [g_h, gather(zero_state)], with_c=True, retain=False)
            if sl.c is not None and sl.c.requires_grad:
                g_h0 = part.pop(id(sl.c), torch.zeros_like(sl.c)).to(ctx.h0_like.dtype)
            g_trans, g_u = sl.input_grads(part)
        else:
            part1 = sl.vjp([sl.h], [g_h], with_c=True, retain=True)
            delta = gather(part1.pop(id(sl.c), zero_state).to(dt))
            part2 = sl.vjp([sl.h_last], [delta], with_c=False, retain=False) if bool(delta.any()) else {}
            g_trans, g_u = sl.input_grads(part1, part2)
        if k > 0 and ctx.h0_like is not None and ctx.h0_like.requires_grad:
            g_h0 = torch.zeros_like(ctx.h0_like)  # only the owner's h0 enters the sequence
        ctx.sl = None
        return None, None, None, None, None, None, None, g_trans, g_u, g_h0


class _RingScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inner, group, reverse, reset, build, keep, final_state, trans, u, h0):
        K, r = group_size(group), group_rank(group)
        k = _order(r, K, reverse)
        prev, nxt, last = _order(k - 1, K, reverse), _order(k + 1, K, reverse), _order(K - 1, K, reverse)
        sl = _Slice(inner, reverse, reset, keep)
        like = _state_like(inner, trans, u, reverse)
        keep_k = _keep(reset, reverse, like, like.dtype)
        send_on = send_async if build else send  # with a graph, do not idle until the next rank posts its recv
        c_grad = k > 0 or (h0 is not None and h0.requires_grad)
        if inner.defers_state(trans, u):
            # The scan asks for its carry after its carry-free pass (done while the carry travels),
            # and the next rank gets d = P c + s before this one writes its states.
            def resolve(slice_map):
                c = recv(like, prev, group) if k > 0 else (h0 if h0 is not None else torch.zeros_like(like))
                if k < K - 1:
                    P, s = slice_map()
                    send_on((keep_k * (inner.apply(P, c.to(P.dtype)) + s)).to(like.dtype), nxt, group)
                return c

            h, d, c = sl.run(trans, u, like, c_grad, build, resolve)
        else:
            c = h0 if k == 0 else recv(like, prev, group)
            h, d, c = sl.run(trans, u, c, c_grad, build)
            if k < K - 1:
                send_on(keep_k * d, nxt, group)
        _save(ctx, sl, build, trans, u, c)
        ctx.group, ctx.k, ctx.K, ctx.prev, ctx.nxt = group, k, K, prev, nxt
        ctx.sl, ctx.keep, ctx.h0_like, ctx.final_state = sl, keep_k, h0, final_state
        if not final_state:  # no broadcast: ranks run ahead of the ones they feed (pipelined)
            ctx.mark_non_differentiable(d)
            return h, d
        return h, broadcast(d if k == K - 1 else like, last, group)

    @staticmethod
    def backward(ctx, g_h, g_final):
        sl, k, K = ctx.sl, ctx.k, ctx.K
        wait_sends()  # the forward's carries: every rank has received them (it finished its forward)
        _restore(ctx, sl)
        g_h = torch.zeros_like(sl.h) if g_h is None else g_h
        total = None
        if ctx.final_state:  # every rank's use of the final state (a collective: all ranks)
            total = all_reduce(torch.zeros_like(sl.h_last) if g_final is None else g_final, ctx.group)

        def delta_in():  # dL/dh_last of this slice: from the next rank, or the sequence's final state
            if k == K - 1:
                return total if total is not None else torch.zeros_like(sl.h_last)
            return ctx.keep * recv(sl.h_last, ctx.nxt, ctx.group)

        if sl.deferral is not None:  # recv after the backward scan's carry-free pass, send before its gradients
            def seed(h0_grad_of):
                delta = delta_in().to(sl.h_last.dtype)
                if k > 0:
                    send_async(h0_grad_of(delta), ctx.prev, ctx.group)
                return delta
            part = sl.vjp_deferred(g_h, seed)
            g_c = part.pop(id(sl.c), None) if sl.c is not None else None
        else:
            part = sl.vjp([sl.h, sl.h_last], [g_h, delta_in().to(sl.h_last.dtype)], with_c=True, retain=False)
            g_c = part.pop(id(sl.c), None) if sl.c is not None else None
            if k > 0:
                send_async(g_c if g_c is not None else torch.zeros_like(sl.c), ctx.prev, ctx.group)
        g_h0 = None
        if k > 0:
            torch.autograd.Variable._execution_engine.queue_callback(wait_sends)  # done by backward's end
            if ctx.h0_like is not None and ctx.h0_like.requires_grad:
                g_h0 = torch.zeros_like(ctx.h0_like)
        elif sl.c is not None and sl.c.requires_grad:
            g_h0 = (g_c if g_c is not None else torch.zeros_like(sl.c)).to(ctx.h0_like.dtype)
        g_trans, g_u = sl.input_grads(part)
        ctx.sl = None
        return None, None, None, None, None, None, None, g_trans, g_u, g_h0


class SPScan(ScanOp):
    """The ScanOp `inner` over a sequence split across the ranks of `group` (see module doc).

    Called like the inner op on this rank's slice: (trans, u, h0, reverse, reset) -> (h, h_last),
    h for the slice, h_last the WHOLE sequence's final state (identical on every rank).
    `product` and `apply` stay the inner op's, local to the slice.
    recompute: True runs the slice's scan without a graph in forward and again with one in
    backward (less memory, one more scan); None (default) does so only inside activation
    checkpointing; False never.
    final_state=False: the caller does not need the sequence's final state (training): h_last is
    then this slice's own final state, without gradient, and no collective serves it (the ring
    carry then pipelines: a rank moves on to its next layer as soon as it has sent its carry).
    """

    def __init__(self, inner: ScanOp, group: Any, carry: str = "allgather", recompute: Optional[bool] = None,
                 final_state: bool = True):
        if carry not in CARRIES:
            raise ValueError(f"parallel.carry: must be one of {', '.join(CARRIES)}, got '{carry}'")
        self.inner, self.group, self.carry, self.recompute = inner, group, carry, recompute
        self.final_state = final_state
        self.name = f"sp_{inner.name}"

    def __call__(self, trans, u, h0=None, reverse=False, reset=None):
        if self.group is None or group_size(self.group) == 1:
            return self.inner(trans, u, h0, reverse, reset)
        # Stateless work (gate normalisation) first, under autograd: then a rank waits for its carry
        # only for the scan itself, and in backward sends its carry's gradient before going on to it.
        inner, trans, u = self.inner.prepare(trans, u)
        build = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (trans, u, h0))
        fn = _AllGatherScan if self.carry == "allgather" else _RingScan
        if not build:  # inference: the same exchange, no graph kept
            with torch.no_grad():
                return fn.forward(_NoCtx(), inner, self.group, bool(reverse), reset, False, True,
                                  self.final_state, trans, u, h0)
        recompute = _outer_hooks_active() if self.recompute is None else self.recompute
        return fn.apply(inner, self.group, bool(reverse), reset, True, not recompute, self.final_state,
                        trans, u, h0)

    def product(self, trans, reverse=False, reset=None):
        return self.inner.product(trans, reverse, reset)

    def apply(self, P, h):
        return self.inner.apply(P, h)

    def __repr__(self) -> str:
        return f"SPScan({self.inner!r}, carry={self.carry!r})"


class _NoCtx:
    """Stands in for autograd's ctx when the forward runs without a graph."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass
