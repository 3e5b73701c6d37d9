"""Chunked prefill: read inputs of any length a chunk at a time, carrying the model's state.

The model already carries recurrent states and KV caches through `forward(..., state=...,
return_state=True)`; these helpers are the eval-side loops around it:

    logits_last, state = prefill(model, ids, chunk_size)            # (B, V), ModelState
    lp = token_logprobs(model, ids, chunk_size)                     # (B, T-1) log p(ids[t+1] | ids[:t+1])
    new = greedy_generate(model, state, logits_last, max_new=8)     # (B, max_new) int64

Memory per chunk is O(B * chunk_size * V) for the logits whatever T is. Recurrent and
sliding-window layers keep constant-size states; full-attention layers keep a KV cache that
grows with the tokens read (that is attention, not the loop).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F


def _chunks(T: int, chunk_size: int) -> Iterable[Tuple[int, int]]:
    if chunk_size <= 0:
        raise ValueError(f"eval.chunk_size: must be positive, got {chunk_size}")
    for s in range(0, T, chunk_size):
        yield s, min(T, s + chunk_size)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk_size: int, state=None, doc_start: Optional[torch.Tensor] = None,
            on_chunk: Optional[Callable[[int, torch.Tensor], None]] = None):
    """Read ids (B, T) in chunks; returns (logits of the last position (B, V), state after ids).

    on_chunk(start, logits (B, t, V)) sees every chunk's logits (e.g. to score them) before they
    are dropped. doc_start (B, T) bool marks document starts (states reset there).
    """
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prefill: ids must be (B, T) with T > 0, got shape {tuple(ids.shape)}")
    last = None
    for s, e in _chunks(ids.shape[1], chunk_size):
        ds = doc_start[:, s:e] if doc_start is not None else None
        logits, state = model(ids[:, s:e], ds, state=state, return_state=True)
        if on_chunk is not None:
            on_chunk(s, logits)
        last = logits[:, -1]
    return last, state


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor, chunk_size: int, doc_start: Optional[torch.Tensor] = None,
                   targets: Optional[torch.Tensor] = None, state=None):
    """Log-probabilities of the next tokens, computed chunk by chunk.

    ids (B, T); targets (B, T) (default: ids shifted left, the last column then unscored).
    Returns (logp (B, T) float32 of targets[:, t] given ids[:, :t+1] (NaN where unscored, i.e.
    target < 0 or, by default, t = T-1), greedy (B, T) bool: the argmax equals the target).
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

    prefill(model, ids, chunk_size, state=state, doc_start=doc_start, on_chunk=score)
    return logp, greedy


@torch.no_grad()
def greedy_generate(model, state, last_logits: torch.Tensor, max_new: int,
                    stop_ids: Optional[Iterable[int]] = None) -> torch.Tensor:
    """Greedy decoding from a prefilled state: (B, max_new) int64 token ids.

    A row that emitted a stop id keeps emitting it (callers cut at the first stop id); decoding
    ends early when every row has stopped.
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
