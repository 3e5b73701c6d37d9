"""Chunked prefill: read inputs of any length a chunk at a time, carrying the model's state.

The model already carries recurrent states and KV caches through `forward(..., state=...,
return_state=True)`; these helpers are the eval-side loops around it:

    logits_last, state = prefill(model, ids, chunk_size)            # (B, V), ModelState
    lp = token_logprobs(model, ids, chunk_size)                     # (B, T-1) log p(ids[t+1] | ids[:t+1])
    new = greedy_generate(model, state, logits_last, max_new=8)     # (B, max_new) int64

Memory per chunk is O(B * chunk_size * V) for the logits whatever T is. Recurrent and
sliding-window layers keep constant-size states; full-attention layers keep a KV cache that
grows with the tokens read (that is attention, not the loop).

Sequence parallelism (`mesh` with sp = K > 1, the model parallelized over it): every rank calls
these with the same whole inputs and runs the same loop (collectives inside every forward). Each
chunk is cut into K equal slices, rank r reads slice r at positions chunk start + r * T_local,
and the state after the chunk (recurrent states, KV caches of every rank's keys) is the same on
every rank. Chunks are chunk_size rounded down to a multiple of K; a last chunk whose length K
does not divide reads its largest divisible head split, and the few (< K) remaining tokens
replicated on every rank with sp = 1 seams (`unsplit`): exact, no padding. Greedy decoding
runs replicated the same way. Results equal the one-process run to float tolerance.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from llm_lru.parallel.comm import all_gather, broadcast
from llm_lru.parallel.parallelize import unsplit


def sp_size(mesh) -> int:
    """The SP group size of `mesh` (1 for None)."""
    return 1 if mesh is None else mesh.sp


def _chunks(T: int, chunk_size: int) -> Iterable[Tuple[int, int]]:
    if chunk_size <= 0:
        raise ValueError(f"eval.chunk_size: must be positive, got {chunk_size}")
    for s in range(0, T, chunk_size):
        yield s, min(T, s + chunk_size)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk_size: int, state=None, doc_start: Optional[torch.Tensor] = None,
            on_chunk: Optional[Callable[[int, torch.Tensor], None]] = None, mesh=None):
    """Read ids (B, T) in chunks; returns (logits of the last position (B, V), state after ids).

    on_chunk(start, logits (B, t, V)) sees every chunk's logits (e.g. to score them) before they
    are dropped; under SP (mesh.sp > 1) only this rank's slice of each chunk (start = the slice's
    first position), and the replicated tail on every rank. doc_start (B, T) bool marks
    document starts (states reset there). The returned logits and state are the same on every rank.
    """
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prefill: ids must be (B, T) with T > 0, got shape {tuple(ids.shape)}")
    K = sp_size(mesh)
    if K > 1:
        return _prefill_sp(model, ids, chunk_size, state, doc_start, on_chunk, mesh)
    last = None
    for s, e in _chunks(ids.shape[1], chunk_size):
        ds = doc_start[:, s:e] if doc_start is not None else None
        logits, state = model(ids[:, s:e], ds, state=state, return_state=True)
        if on_chunk is not None:
            on_chunk(s, logits)
        last = logits[:, -1]
    return last, state


def _prefill_sp(model, ids, chunk_size, state, doc_start, on_chunk, mesh):
    """prefill with each chunk split over the SP group (see the module doc)."""
    K, r = mesh.sp, mesh.sp_rank
    B, T = ids.shape
    if chunk_size <= 0:
        raise ValueError(f"eval.chunk_size: must be positive, got {chunk_size}")
    if state is None:
        state = model.init_state(B, ids.device)
    step = max(K, chunk_size - chunk_size % K)
    last = None
    for s in range(0, T, step):
        e = min(T, s + step)
        split = (e - s) - (e - s) % K
        if split:
            t = split // K
            lo, hi = s + r * t, s + (r + 1) * t
            ds = doc_start[:, lo:hi] if doc_start is not None else None
            pos = state.pos
            # RoPE at the slice's global positions; the state then advances by the whole chunk.
            logits, state = model(ids[:, lo:hi], ds, state=state, pos_offset=r * t, return_state=True)
            state.pos = pos + split
            if on_chunk is not None:
                on_chunk(lo, logits)
            # The chunk's last position lives on the last rank.
            last = broadcast(logits[:, -1].contiguous(), K - 1, mesh.sp_group)
        if s + split < e:  # a tail of < K tokens: every rank reads it whole, with sp = 1 seams
            ds = doc_start[:, s + split:e] if doc_start is not None else None
            with unsplit(model):
                logits, state = model(ids[:, s + split:e], ds, state=state, return_state=True)
            if on_chunk is not None:
                on_chunk(s + split, logits)
            last = logits[:, -1]
    return last, state


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor, chunk_size: int, doc_start: Optional[torch.Tensor] = None,
                   targets: Optional[torch.Tensor] = None, state=None, mesh=None):
    """Log-probabilities of the next tokens, computed chunk by chunk.

    ids (B, T); targets (B, T) (default: ids shifted left, the last column then unscored).
    Returns (logp (B, T) float32 of targets[:, t] given ids[:, :t+1] (NaN where unscored, i.e.
    target < 0 or, by default, t = T-1), greedy (B, T) bool: the argmax equals the target).
    Under SP (mesh.sp > 1) every rank scores its slices, and gets the whole result.
    """
    B, T = ids.shape
    if targets is None:
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
    logp = torch.full((B, T), float("nan"))
    greedy = torch.zeros(B, T, dtype=torch.bool)

    def score(s: int, logits: torch.Tensor) -> None:
        t = targets[:, s:s + logits.shape[1]]
        valid = t >= 0
        lsm = F.log_softmax(logits.float(), -1)
        got = lsm.gather(-1, t.clamp_min(0)[..., None])[..., 0]
        logp[:, s:s + logits.shape[1]] = torch.where(valid, got, torch.nan).cpu()
        greedy[:, s:s + logits.shape[1]] = (valid & (logits.argmax(-1) == t)).cpu()

    prefill(model, ids, chunk_size, state=state, doc_start=doc_start, on_chunk=score, mesh=mesh)
    if sp_size(mesh) > 1:
        # Each position was scored on its owner (NaN / False elsewhere; tails on every rank).
        dev = ids.device
        lps = all_gather(logp.to(dev), mesh.sp_group)
        logp = lps[0]
        for other in lps[1:]:
            logp = torch.where(torch.isnan(logp), other, logp)
        greedy = all_gather(greedy.to(dev), mesh.sp_group).any(0)
        logp, greedy = logp.cpu(), greedy.cpu()
    return logp, greedy


@torch.no_grad()
def greedy_generate(model, state, last_logits: torch.Tensor, max_new: int,
                    stop_ids: Optional[Iterable[int]] = None) -> torch.Tensor:
    """Greedy decoding from a prefilled state: (B, max_new) int64 token ids.

    A row that emitted a stop id keeps emitting it (callers cut at the first stop id); decoding
    ends early when every row has stopped. A model under SP decodes with its seams unwrapped
    (`unsplit`): every rank steps the same replicated state, with no collective.
    """
    stop = torch.tensor(sorted(set(stop_ids or ())), dtype=torch.long, device=last_logits.device)
    B = last_logits.shape[0]
    out = torch.empty(B, 0, dtype=torch.long, device=last_logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=last_logits.device)
    logits = last_logits
    for i in range(max_new):
        tok = logits.argmax(-1)
        if stop.numel():
            tok = torch.where(done, stop[0], tok)
            done |= torch.isin(tok, stop)
        out = torch.cat([out, tok[:, None]], 1)
        if bool(done.all()) or i == max_new - 1:
            break
        with unsplit(model):
            logits, state = model.step(tok, state)
    return out


def cut_at_stop(ids: Iterable[int], stop_ids: Iterable[int]) -> list:
    """The ids before the first stop id."""
    stop = set(stop_ids)
    out = []
    for t in ids:
        if int(t) in stop:
            break
        out.append(int(t))
    return out
