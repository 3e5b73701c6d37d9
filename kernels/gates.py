"""Row normalisations of BD-LRU / H-LRU gate logits (DESIGN.md §2), one definition for all paths.

Each row of m+1 logits becomes m+1 weights with L1 norm 1 (non-negative except for tanh), so the
max-row-sum norm of the transition is at most 1 and the state stays bounded.
"""
from __future__ import annotations

import torch

NORMS = ("softmax", "sigmoid", "relu", "tanh")
_EPS = 1e-6


def normalize_rows(logits: torch.Tensor, norm: str = "softmax") -> torch.Tensor:
    """(..., m+1) logits -> (..., m+1) weights with unit L1 norm per row (computed in fp32+)."""
    g = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if norm == "softmax":
        return torch.softmax(g, -1)
    if norm == "sigmoid":
        p = torch.sigmoid(g)
        return p / p.sum(-1, keepdim=True)
    if norm == "relu":
        p = torch.relu(g)
        return p / (p.sum(-1, keepdim=True) + _EPS)
    if norm == "tanh":
        p = torch.tanh(g)
        return p / (p.abs().sum(-1, keepdim=True) + _EPS)
    raise ValueError(f"gate norm: unknown '{norm}' (one of {', '.join(NORMS)})")
