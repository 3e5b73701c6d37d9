"""Token-local building blocks: RMSNorm, SwiGLU MLP, rotary position embeddings."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x) * W3 x). x: (B, T, D)."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def ffn_width(d_model: int, ffn_dim: int = 0) -> int:
    """Explicit width, or 8/3 * d_model rounded up to a multiple of 64 (LLaMA convention)."""
    return ffn_dim or 64 * ((8 * d_model // 3 + 63) // 64)


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
