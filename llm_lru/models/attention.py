"""The attention mixer (causal or sliding window, RoPE, grouped KV heads) and its rotary embedding.

The mixer computes q, k, v and RoPE; `self.attend` does the attending (llm_lru.kernels'
`local_attention`: no Tq x Tk mask or score matrix, CPU tiles or CUDA flex), and with a KV cache
(chunked prefill, step mode) `self.extend_cache` joins the cached keys with this call's.
Sequence parallelism replaces both (llm_lru.parallel) to gather K and V across ranks; the mixer
does not change.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from llm_lru.kernels import local_attention


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate pairs (x[..., :hd/2], x[..., hd/2:]) by position-dependent angles.

    x: (B, H, T, hd); positions: (T,) int64 global positions. Computed in fp32.
    """
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float()[..., : hd // 2], x.float()[..., hd // 2:]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    return out.to(x.dtype)


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
