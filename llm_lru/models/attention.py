"""Softmax attention mixers (causal, sliding window) and the attention function they call.

The mixer computes q, k, v and RoPE; `self.attend` does the attending, and with a KV cache
(chunked prefill, step mode) `self.extend_cache` joins the cached keys with this call's.
Sequence parallelism replaces both (llm_lru.parallel) to gather K and V across ranks; the mixer
does not change.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import apply_rope

# Above this many query x key entries per batch row, the mask is built one query block at a time.
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


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                    window: int = 0, causal: bool = True) -> torch.Tensor:
    """Softmax attention over the keys at hand.

    q: (B, H, Tq, hd); k, v: (B, Hkv, Tk, hd), RoPE applied; queries are the last Tq keys.
    doc_start: (B, Tk) bool or None; window: 0 = unlimited, else |i - j| < window.
    Returns (B, H, Tq, hd).
    """
    B, H, Tq, hd = q.shape
    Tk = k.shape[2]
    gqa = k.shape[1] != H
    if doc_start is None and not window and causal and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Bound the mask's memory on long inputs: one block of queries at a time.
    step = max(1, _MASK_BLOCK // max(Tk, 1))
    outs = []
    for s in range(0, Tq, step):
        e = min(Tq, s + step)
        mask = attention_mask(e - s, Tk, doc_start, window, causal, q.device, q_start=Tk - Tq + s)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=mask, enable_gqa=gqa))
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


def extend_cache(state: dict, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor):
    """The keys a call with a KV cache attends over: the cached ones, then this call's.

    state: dict(k, v (B, Hkv, Tc, hd), starts (B, Tc)); k, v: (B, Hkv, T, hd); starts: (B, T) bool.
    Returns (k, v, starts) of length Tc + T, in time order.
    """
    return torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2), torch.cat([state["starts"], starts], 1)


class Attention(nn.Module):
    """Multi-head attention with RoPE and grouped KV heads; `window` > 0 makes it sliding-window.

    State (step mode / chunked prefill): dict(k, v, starts) of the cached keys, values and their
    document starts; sliding-window layers keep only the last `window` keys.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, window: int = 0,
                 rope_theta: float = 10000.0, causal: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.window, self.rope_theta, self.causal = window, rope_theta, causal
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.attend = local_attention
        self.extend_cache = extend_cache

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> dict:
        empty = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "starts": torch.zeros(batch, 0, dtype=torch.bool, device=device)}

    def forward(self, x: torch.Tensor, doc_start: Optional[torch.Tensor] = None, state: Optional[dict] = None,
                pos_offset: int = 0):
        """x: (B, T, D) -> (y (B, T, D), new state or None)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        pos = torch.arange(pos_offset, pos_offset + T, device=x.device)
        q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        new_state = None
        if state is not None:
            starts = doc_start if doc_start is not None else torch.zeros(B, T, dtype=torch.bool, device=x.device)
            k, v, starts = self.extend_cache(state, k, v, starts)
            doc_start = starts if bool(starts.any()) else None
            keep = self.window if self.window else k.shape[2]
            new_state = {"k": k[:, :, -keep:], "v": v[:, :, -keep:], "starts": starts[:, -keep:]}
        y = self.attend(q, k, v, doc_start, self.window, self.causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), new_state
