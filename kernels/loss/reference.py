"""The plain loss the chunked one is tested against: every token's logits in fp32 (or float64), then
F.cross_entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _logits(h: Tensor, weight: Tensor) -> Tensor:
    """F.linear(h, weight) in fp32 at least (float64 stays float64, for the tests)."""
    out = F.linear(h, weight)
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str = "mean",
                                   ignore_index: int = -100) -> Tensor:
    """The plain loss: logits F.linear(hidden, weight) in fp32 (or float64) for every token, then
    F.cross_entropy.

    hidden: (B, T, D) or (M, D); weight: (V, D); labels: hidden.shape[:-1] int64.
    reduction 'sum', or 'mean' over the counted tokens (0 when none is counted).
    """
    logits = _logits(hidden, weight)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                            reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)
