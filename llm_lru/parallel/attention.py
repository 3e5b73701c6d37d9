"""Attention over a sequence split across SP ranks, wrapping any `attend` function.

    attend(q, k, v, doc_start=None, window=0, causal=True) -> (B, H, Tq, hd)
    q: (B, H, T, hd), k, v: (B, Hkv, T, hd) this rank's slice, RoPE applied at global positions;
    doc_start: (B, T) bool or None (the same on every rank: all None or all tensors).

Rank r holds global positions [r*T, (r+1)*T). The inner attend treats its queries as the LAST Tq
of the keys it is given, so each rank hands it exactly the keys its queries may see, ending at
its own last token:
- window = 0 (full causal), or window - 1 > T: all-gather K, V and doc_start over the group
  (differentiable: backward sums the key gradients over ranks and keeps this rank's part).
  Contiguous slices would give the last rank ~2K - 1 times the first rank's (query, key) pairs, so
  by default (balance=True) the queries are redistributed "zigzag", as in ring-attention /
  context-parallel implementations: the global sequence is cut into 2K chunks (each slice into
  halves of T // 2 and T - T // 2 rows, so odd T works too), rank r attends query chunks r and
  2K - 1 - r, each in its own inner call against keys [max(0, start - (window - 1)), end of that
  chunk), and every rank then has the same number of causal pairs (exactly for even T). Queries
  reach their computing rank, and outputs return to their owner, by all_to_all_single inside a
  differentiable function (backward: the mirrored exchange of the gradients). balance=False
  passes this rank's queries once, with keys [max(0, r*T - (window - 1)), (r+1)*T).
- 0 < window - 1 <= T: a halo of the previous rank's last window - 1 keys (one send / recv per
  neighbour, the key gradients sent back in backward); rank 0 needs none.
Document masks stay exact because they only compare positions inside the keys passed.
Bidirectional attention (causal=False, encoder stacks): this rank's queries are not the last
keys, which the attend contract assumes, so q is all-gathered too, the whole sequence attended on
every rank and this rank's rows kept (exact; K times the attention flops — encoders only).

KV caches (chunked prefill under SP): `SPCache` wraps the mixer's `extend_cache` seam. It
all-gathers this call's K, V and document starts over the group, so the cache it hands on holds
every rank's tokens of the earlier chunks, the same on every rank (full-attention KV memory is
then NOT split across ranks; recurrent and sliding-window states are constant-size anyway).
The attend then receives Tk = Tc + K*T keys (the cache, then the K slices in rank order) for its
T queries, and passes the inner attend the keys [lo, Tc + (r+1)*T): they end at this rank's last
token (lo = Tc + r*T - (window - 1) for a sliding window, else 0). Causal only.
Decoding one token at a time runs replicated with the seams unwrapped (parallelize.unsplit).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .comm import (all_gather, all_to_all_autograd, gather_autograd, group_rank, group_size, recv, send, send_async,
                   wait_sends)

Tensor = torch.Tensor


class _Halo(torch.autograd.Function):
    """kv: (2, B, Hkv, T, hd) -> the previous rank's last n time steps (2, B, Hkv, n, hd), and its doc_start.

    Forward: rank r sends its tail to r + 1 and receives r - 1's (rank 0 receives nothing: n = 0).
    Backward: the halo's gradient goes back to its owner and is added to that rank's tail.
    With a graph the sends do not wait for the receiver (as the ring scan's carries): they are
    waited for in backward, once every rank has finished its forward.
    """

    @staticmethod
    def forward(ctx, kv: Tensor, doc: Optional[Tensor], n: int, group: Any):
        K, r = group_size(group), group_rank(group)
        T = kv.shape[3]
        ctx.group, ctx.r, ctx.K, ctx.n, ctx.T = group, r, K, n, T
        ctx.halo_shape = (*kv.shape[:3], n, kv.shape[4])
        ctx.dtype, ctx.device = kv.dtype, kv.device
        has_doc = doc is not None
        if r < K - 1:  # chain order (send down, then receive from above): no cycle, no deadlock
            tail = [kv[:, :, :, T - n:].reshape(-1)]
            if has_doc:
                tail.append(doc[:, T - n:].to(kv.dtype).reshape(-1))
            (send_async if ctx.needs_input_grad[0] else send)(torch.cat(tail), r + 1, group)
        if r == 0:
            halo = kv[:, :, :, :0].clone()
            return halo, (doc[:, :0].clone() if has_doc else None)
        shape = (*kv.shape[:3], n, kv.shape[4])
        numel = torch.Size(shape).numel()
        buf = recv(kv.new_empty(numel + (doc.shape[0] * n if has_doc else 0)), r - 1, group)
        halo = buf[:numel].view(shape)
        hdoc = buf[numel:].view(doc.shape[0], n).bool() if has_doc else None
        if hdoc is not None:
            ctx.mark_non_differentiable(hdoc)
        return halo, hdoc

    @staticmethod
    def backward(ctx, g_halo, _g_doc):
        K, r, n, T = ctx.K, ctx.r, ctx.n, ctx.T
        wait_sends()  # the forward's tails: every rank has received them (it finished its forward)
        if r > 0:
            if g_halo is None:
                g_halo = torch.zeros(ctx.halo_shape, dtype=ctx.dtype, device=ctx.device)
            send_async(g_halo, r - 1, ctx.group)
            torch.autograd.Variable._execution_engine.queue_callback(wait_sends)  # done by backward's end
        g = None
        if r < K - 1:
            got = recv(torch.empty(ctx.halo_shape, dtype=ctx.dtype, device=ctx.device), r + 1, ctx.group)
            g = got.new_zeros(*got.shape[:3], T, got.shape[4])
            g[:, :, :, T - n:] = got
        return g, None, None, None


class SPAttention:
    """`attend` over an SP group; see the module doc. sp = 1 (group None) calls `inner` as is.

    balance: spread the queries of gathered causal attention zigzag over the group (see the module
    doc). On by default: every rank then does the same attention work, where contiguous slices make
    the whole group wait for the last rank (~2K - 1 times the first rank's pairs); it costs two
    all-to-alls of the queries' size forward and two backward, and gives the same values.
    """

    def __init__(self, inner: Callable, group: Any, balance: bool = True):
        self.inner, self.group, self.balance = inner, group, balance

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, doc_start: Optional[Tensor] = None,
                 window: int = 0, causal: bool = True) -> Tensor:
        if self.group is None or group_size(self.group) == 1:
            return self.inner(q, k, v, doc_start=doc_start, window=window, causal=causal)
        T = q.shape[2]
        r = group_rank(self.group)
        if k.shape[2] != T:
            return self._cached(q, k, v, doc_start, window, causal, r)
        if not causal:
            return self._bidirectional(q, k, v, doc_start, window, r)
        if window == 1:  # each query sees only itself: nothing to exchange
            return self.inner(q, k, v, doc_start=doc_start, window=window, causal=True)
        if 0 < window - 1 <= T:
            halo, hdoc = _Halo.apply(torch.stack([k, v]), doc_start, window - 1, self.group)
            k_all = torch.cat([halo[0], k], 2)
            v_all = torch.cat([halo[1], v], 2)
            doc = torch.cat([hdoc, doc_start], 1) if doc_start is not None else None
        else:
            kv = gather_autograd(torch.stack([k, v]), self.group)           # (K, 2, B, Hkv, T, hd)
            kv = torch.cat(kv.unbind(0), 3)                                   # (2, B, Hkv, K*T, hd)
            doc = None
            if doc_start is not None:
                doc = torch.cat(all_gather(doc_start, self.group).unbind(0), 1)
            if self.balance:
                return self._zigzag(q, kv[0], kv[1], doc, window, r)
            lo = 0 if window == 0 else max(0, r * T - (window - 1))
            hi = (r + 1) * T
            k_all, v_all = kv[0, :, :, lo:hi], kv[1, :, :, lo:hi]
            doc = doc[:, lo:hi] if doc is not None else None
        return self.inner(q, k_all, v_all, doc_start=doc, window=window, causal=True)

    def _zigzag(self, q, k, v, doc, window, r):
        """Causal attention of this rank's queries q (B, H, T, hd) against the gathered k, v
        (B, Hkv, K*T, hd) and doc (B, K*T) or None, with the work balanced over the group: rank r
        computes global chunks r and 2K - 1 - r (chunk j: half j % 2 of slice j // 2)."""
        K, T = group_size(self.group), q.shape[2]
        half = T // 2
        size = lambda j: half if j % 2 == 0 else T - half                # noqa: E731
        start = lambda j: (j // 2) * T + (j % 2) * half                  # noqa: E731
        computer = lambda j: j if j < K else 2 * K - 1 - j               # noqa: E731
        # all_to_all_single orders rows by rank, and within one pair of ranks (the middle rank of
        # an odd K keeps both its chunks) by chunk index: both sides sort the same way.
        mine = sorted((2 * r, 2 * r + 1), key=lambda j: (computer(j), j))
        theirs = sorted((r, 2 * K - 1 - r), key=lambda j: (j // 2, j))
        send_rows, recv_rows = [0] * K, [0] * K
        for j in mine:
            send_rows[computer(j)] += size(j)
        for j in theirs:
            recv_rows[j // 2] += size(j)
        x = q.permute(2, 0, 1, 3)                                           # (T, B, H, hd): rows are time
        got = all_to_all_autograd(torch.cat([x[start(j) - r * T:][:size(j)] for j in mine]),
                                  send_rows, recv_rows, self.group)
        outs, row = [], 0
        for j in theirs:
            n, hi = size(j), start(j) + size(j)
            lo = 0 if window == 0 else max(0, start(j) - (window - 1))
            qj = got[row:row + n]
            row += n
            if n:  # T = 1 leaves the first half of every slice empty
                qj = self.inner(qj.permute(1, 2, 0, 3), k[:, :, lo:hi], v[:, :, lo:hi],
                                doc_start=doc[:, lo:hi] if doc is not None else None, window=window,
                                causal=True).permute(2, 0, 1, 3)
            outs.append(qj)
        back = all_to_all_autograd(torch.cat(outs), recv_rows, send_rows, self.group)  # chunks in `mine` order
        if mine[0] > mine[1]:
            back = torch.cat([back[size(mine[0]):], back[:size(mine[0])]])
        return back.permute(1, 2, 0, 3)

    def _cached(self, q, k, v, doc_start, window, causal, r):
        """Keys already gathered by SPCache: (cache, slice 0, ..., slice K-1); keep those this
        rank's queries may see, ending at its last token."""
        K, T, Tk = group_size(self.group), q.shape[2], k.shape[2]
        Tc = Tk - K * T
        if Tc < 0 or v.shape[2] != Tk:
            raise ValueError(f"attend under SP with a KV cache: expected the cache then all {K} ranks' "
                             f"{T} keys each (see SPCache), got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
        if not causal:
            raise ValueError("attend under SP: a KV cache needs causal attention (bidirectional layers "
                             "have no left-to-right state)")
        hi = Tc + (r + 1) * T
        lo = 0 if window == 0 else max(0, hi - T - (window - 1))
        doc = doc_start[:, lo:hi] if doc_start is not None else None
        return self.inner(q, k[:, :, lo:hi], v[:, :, lo:hi], doc_start=doc, window=window, causal=True)

    def _bidirectional(self, q, k, v, doc_start, window, r):
        """Every query attends to the whole gathered sequence; keep this rank's T rows."""
        T = q.shape[2]
        whole = lambda x: torch.cat(gather_autograd(x, self.group).unbind(0), 2)  # noqa: E731
        doc = None
        if doc_start is not None:
            doc = torch.cat(all_gather(doc_start, self.group).unbind(0), 1)
        out = self.inner(whole(q), whole(k), whole(v), doc_start=doc, window=window, causal=False)
        return out[:, :, r * T:(r + 1) * T]

    def __repr__(self) -> str:
        return f"SPAttention({getattr(self.inner, '__name__', self.inner)!r})"


class SPCache:
    """`extend_cache` over an SP group: the cached keys, then every rank's slice of this call's
    (all-gathered, rank order), the same on every rank; see the module doc.

    Called like the inner seam: (state, k, v, starts) with this rank's k, v (B, Hkv, T, hd) and
    starts (B, T) -> (k, v, starts) of length Tc + K*T. sp = 1 (group None) calls `inner` as is.
    """

    def __init__(self, inner: Callable, group: Any):
        self.inner, self.group = inner, group

    def __call__(self, state: dict, k: Tensor, v: Tensor, starts: Tensor):
        if self.group is None or group_size(self.group) == 1:
            return self.inner(state, k, v, starts)
        kv = gather_autograd(torch.stack([k, v]), self.group)              # (K, 2, B, Hkv, T, hd)
        kv = torch.cat(kv.unbind(0), 3)
        starts = torch.cat(all_gather(starts, self.group).unbind(0), 1)
        return self.inner(state, kv[0], kv[1], starts)

    def __repr__(self) -> str:
        return f"SPCache({getattr(self.inner, '__name__', self.inner)!r})"
