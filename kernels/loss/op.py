"""A linear layer + cross-entropy that never holds (B, T, V) logits (DESIGN.md §4b).

    loss = linear_cross_entropy(h, head.weight, labels)              # h (B, T, D), labels (B, T)
    ref  = linear_cross_entropy_reference(h, head.weight, labels)    # full logits, for the tests

`linear_cross_entropy` walks the tokens in chunks of `chunk_tokens`: each chunk's logits
(chunk_tokens x V, fp32) give its loss and, when gradients are wanted, its gradients with respect
to the hidden states and the weight right away (ChunkedLinearCrossEntropy), so no logits are kept
for the backward pass and at most one chunk of them exists at a time. On CUDA, fla's
`FusedLinearCrossEntropyLoss` does the same with a Triton kernel, where fla is installed.

The head layer that calls it is llm_lru.models.hybrid.LMHead.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .reference import _logits

Tensor = torch.Tensor


DEFAULT_CHUNK_TOKENS = 4096


REDUCTIONS = ("mean", "sum")


def _chunk_loss(h: Tensor, weight: Tensor, y: Tensor, ignore_index: int, want_grad: bool):
    """Summed loss of one chunk h (c, D), y (c,); with want_grad also d loss / d logits (c, V),
    built in place over the chunk's fp32 logits (zero on ignored rows)."""
    logits = _logits(h, weight)
    valid = y != ignore_index
    target = torch.where(valid, y, 0)[:, None]
    picked = logits.gather(1, target)[:, 0]
    # logsumexp in place over the one (c, V) buffer: torch.logsumexp would allocate a second one.
    top = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(top).exp_()
    norm = probs.sum(dim=1, keepdim=True)
    lse = (top + norm.log())[:, 0]
    total = torch.where(valid, lse - picked, 0.0).sum()
    if not want_grad:
        return total, None
    grad = probs.div_(norm)
    grad.scatter_add_(1, target, torch.full_like(picked[:, None], -1.0))
    return total, grad.masked_fill_(~valid[:, None], 0.0)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, labels), chunk by chunk, with its own backward.

    forward(hidden (M, D), weight (V, D), labels (M,) int64, chunk_tokens, ignore_index) -> scalar
    (fp32, or float64 for float64 inputs).
    The gradients are computed in the forward pass (one chunk of logits at a time) and kept; the
    backward only scales them by the incoming gradient. The weight's gradient accumulates in fp32
    (float64 for float64 weights).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int, ignore_index: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            loss, grad = _chunk_loss(h, weight, labels[start:start + chunk_tokens], ignore_index, True)
            total += loss
            grad = grad.to(weight.dtype)  # the backward of F.linear(h, w).float() runs in w's dtype
            if want_h:
                torch.mm(grad, weight, out=grad_h[start:start + chunk_tokens])
            if want_w:
                if grad.dtype == acc:
                    grad_w.addmm_(grad.t(), h)
                else:
                    grad_w += torch.mm(grad.t(), h).to(acc)
            del grad  # before the next chunk's logits are allocated: one (chunk, V) buffer at a time
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


@functools.lru_cache(maxsize=None)
def fla_loss_class() -> Optional[type]:
    """fla's FusedLinearCrossEntropyLoss, or None where fla is not installed (an optional extra).

    Imported on first use only: `import fla` takes seconds and warns on machines without a GPU.
    """
    try:
        from fla.modules.fused_linear_cross_entropy import FusedLinearCrossEntropyLoss
    except Exception:  # ImportError, or fla failing to set up its Triton kernels
        return None
    return FusedLinearCrossEntropyLoss


def loss_route(device: torch.device, needs_grad: bool) -> str:
    """'fla' (fla's fused Triton kernel) on CUDA when gradients are wanted and fla is installed;
    else 'chunked' (ChunkedLinearCrossEntropy, or its loop without gradients under no_grad).

    fla's kernel always computes the gradients, so forward-only calls (evaluation) take the
    chunked loop, which skips them.
    """
    if torch.device(device).type == "cuda" and needs_grad and fla_loss_class() is not None:
        return "fla"
    return "chunked"


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str = "mean",
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ignore_index: int = -100) -> Tensor:
    """Cross-entropy of the logits F.linear(hidden, weight) (fp32) against labels, without ever
    holding more than chunk_tokens x V logits, forward or backward.

    hidden: (B, T, D) or (M, D); weight: (V, D); labels: hidden.shape[:-1] int64, ignore_index
    where nothing is counted. reduction 'sum', or 'mean' over the counted tokens (0 when none
    is counted, with zero gradients). Equals linear_cross_entropy_reference up to float rounding.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: must be one of {', '.join(REDUCTIONS)}, got '{reduction}'")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"train.loss_chunk_tokens (chunk_tokens): must be a positive int, got {chunk_tokens!r}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: must be an integer tensor, got {labels.dtype}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match hidden states {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden states {tuple(hidden.shape[:-1])}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if loss_route(h.device, needs_grad) == "fla":
        # fla sizes its own chunks from a count (capped at V / D, rounded to a power of two).
        fused = fla_loss_class()(ignore_index=ignore_index, reduction="sum",
                                 num_chunks=max(1, math.ceil(h.shape[0] / chunk_tokens)))
        total = fused(h.contiguous(), y, weight)
    elif needs_grad:
        total = ChunkedLinearCrossEntropy.apply(h, weight, y, chunk_tokens, ignore_index)
    else:
        total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=h.device)
        for s in range(0, h.shape[0], chunk_tokens):
            total += _chunk_loss(h[s:s + chunk_tokens], weight, y[s:s + chunk_tokens], ignore_index, False)[0]
    if reduction == "sum":
        return total
    return total / (y != ignore_index).sum().clamp(min=1)
