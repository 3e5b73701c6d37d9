"""The attention reference: one boolean mask (B or 1, 1, Tq, Tk) and SDPA, built one query block at a
time. O(Tq x Tk) memory; `local_attention` (op.py) is held to it in the tests."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# Above this many query x key entries per batch row, the reference builds its mask one query block at a time.
_MASK_BLOCK = 1 << 22


def doc_ids(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) document starts -> (B, T) id of each position's document: the position of its start
    (-1 for a document that began before the first position). Same id <=> same document."""
    pos = torch.arange(doc_start.shape[1], device=doc_start.device)
    return torch.cummax(torch.where(doc_start, pos, -1), dim=1).values


def attention_mask(Tq: int, Tk: int, doc_start: Optional[torch.Tensor], window: int, causal: bool,
                   device: torch.device, q_start: Optional[int] = None) -> torch.Tensor:
    """Boolean mask (B or 1, 1, Tq, Tk), True = may attend. Query i sits at key position
    q_start + i (default Tk - Tq: the queries are the last Tq keys)."""
    q_start = Tk - Tq if q_start is None else q_start
    qpos = torch.arange(q_start, q_start + Tq, device=device)
    diff = qpos[:, None] - torch.arange(Tk, device=device)[None, :]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        allowed &= diff >= 0
    if window:
        allowed &= diff.abs() < window
    mask = allowed[None, None]
    if doc_start is not None:
        ids = doc_ids(doc_start)
        mask = mask & (ids[:, qpos, None] == ids[:, None, :])[:, None]
    return mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                    window: int = 0, causal: bool = True) -> torch.Tensor:
    """The reference: SDPA with the dense `attention_mask` (built one query block at a time).
    O(Tq x Tk) memory; the tests hold `local_attention` to it. Arguments as `local_attention`."""
    B, H, Tq, hd = q.shape
    Tk = k.shape[2]
    gqa = k.shape[1] != H
    if doc_start is None and not window and causal and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    step = max(1, _MASK_BLOCK // max(Tk, 1))
    outs = []
    for s in range(0, Tq, step):
        e = min(Tq, s + step)
        mask = attention_mask(e - s, Tk, doc_start, window, causal, q.device, q_start=Tk - Tq + s)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=mask, enable_gqa=gqa))
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]
