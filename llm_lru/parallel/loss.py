"""The training loss under dp x sp: the mean over every token of the global batch.

Convention. Each rank holds a (B, T_local) slice of some sequences. The SP ops of this package
give every rank exact gradients of the SUM of the ranks' local losses. DeepSpeed then AVERAGES
gradients over its data-parallel world, which (with no mpu given) is the whole world W = dp x sp.
So each rank backpropagates

    loss_to_backward = W * (sum of this rank's token losses) / (number of counted tokens, globally)

and after DeepSpeed's average the gradient is exactly that of the global token mean
(labels == ignore_index are not counted). If gradients are averaged over a different number of
ranks (e.g. a DP group given to DeepSpeed through an mpu), pass it as `grad_average_size`.
With gradient accumulation DeepSpeed also divides by the number of micro steps: then each micro
batch's loss is its own token mean, and the step's gradient the mean of those (equal to the
global token mean when micro batches count the same number of tokens; pass `num_tokens` =
tokens counted over the whole step to make it exact in every case).

    loss, value = sp_dp_loss(logits, labels, mesh)                          # from (B, T, V) logits
    loss, value = sp_dp_scale(model.loss(ids, labels, reduction="sum"),     # training: no logits
                              (labels != -100).sum(), mesh)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .mesh import Mesh

Tensor = torch.Tensor


def sp_dp_loss(logits: Tensor, labels: Tensor, mesh: Optional[Mesh] = None, ignore_index: int = -100,
               num_tokens: Optional[int] = None, grad_average_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(loss_to_backward, loss_value) for this rank's slice; see the module doc for the convention.

    logits: (B, T, V) (any float dtype; the loss is taken in fp32), labels: (B, T) int64.
    loss_value: the global token mean (a detached scalar, the same on every rank), for logging.
    One all_reduce of two numbers over the world per call (none in a world of one).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)[:-1]}")
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=ignore_index, reduction="sum")
    return sp_dp_scale(total, (labels != ignore_index).sum(), mesh, num_tokens, grad_average_size)


def sp_dp_scale(total: Tensor, count: Tensor, mesh: Optional[Mesh] = None, num_tokens: Optional[int] = None,
                grad_average_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """sp_dp_loss from this rank's summed token loss instead of its logits (the training path:
    `HybridLM.loss(..., reduction='sum')` never holds the logits).

    total: scalar, the sum of this rank's token losses (with its graph); count: scalar, the number
    of tokens it counted (a tensor or an int). Returns (loss_to_backward, loss_value), as sp_dp_loss.
    """
    total = total.float()
    stats = torch.stack([total.detach(), torch.as_tensor(count, dtype=total.dtype, device=total.device)])
    distributed = mesh is not None and mesh.is_distributed and dist.is_initialized()
    if distributed:
        dist.all_reduce(stats, group=mesh.world_group)
    world = mesh.world_size if distributed else 1
    tokens = float(num_tokens) if num_tokens is not None else float(stats[1].item())
    tokens = max(tokens, 1.0)  # a batch of ignored labels only: zero loss, zero gradient
    scale = (grad_average_size if grad_average_size is not None else world) / tokens
    return total * scale, stats[0] / tokens
