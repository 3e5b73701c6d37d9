"""Collectives for sequence parallelism, with their autograd written out.

Only operations that gloo and NCCL both have: all_gather_single and reduce_scatter_single
(all_gather_into_tensor / reduce_scatter_tensor on older torch), all_to_all_single (uneven splits
work on gloo too), all_reduce, broadcast, blocking send / recv, and isend whose completion is
always waited for before the step ends (`send_async` / `wait_sends`; batch_isend_irecv is not
used: followed by destroy_process_group it aborted at exit on gloo in 2 of 4 runs). Group-local
ranks everywhere.
"""
from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist

Tensor = torch.Tensor
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Any) -> int:
    return dist.get_world_size(group)


def group_rank(group: Any) -> int:
    return dist.get_rank(group)


def all_gather(x: Tensor, group: Any) -> Tensor:
    """(...) on each rank -> (K, ...) stacked in group-rank order. Not differentiable."""
    k = group_size(group)
    x = x.contiguous()
    out = x.new_empty(k * x.numel())
    _gather_single(out, x.reshape(-1), group=group)
    return out.view(k, *x.shape)


def all_reduce(x: Tensor, group: Any) -> Tensor:
    """Sum over the group, on a copy (the input is left alone). Not differentiable."""
    x = x.detach().clone().contiguous()
    dist.all_reduce(x, group=group)
    return x


def reduce_scatter(x: Tensor, group: Any) -> Tensor:
    """(K, ...) on each rank -> (...): the sum over ranks of row k lands on group rank k.
    Not differentiable."""
    x = x.contiguous()
    out = x.new_empty(x.shape[1:])
    _reduce_scatter_single(out.view(-1), x.view(-1), group=group)
    return out


def send(x: Tensor, dst: int, group: Any) -> None:
    """Blocking send to group rank dst."""
    dist.send(x.contiguous(), group=group, group_dst=dst)


_PENDING: list = []  # (work, tensor) of isends not yet waited for; the tensor stays alive until then


def send_async(x: Tensor, dst: int, group: Any) -> None:
    """Send to group rank dst without waiting for the receiver (a blocking send on gloo waits until
    the receiver has posted its recv: the sender would idle for it). `wait_sends` completes it."""
    x = x.contiguous()
    _PENDING.append((dist.isend(x, group=group, group_dst=dst), x))


def wait_sends() -> None:
    """Wait for every pending `send_async` of this process."""
    while _PENDING:
        work, _ = _PENDING.pop(0)
        work.wait()


def recv(like: Tensor, src: int, group: Any) -> Tensor:
    """Blocking receive from group rank src of a tensor shaped and typed like `like`."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    dist.recv(out, group=group, group_src=src)
    return out


def broadcast(x: Tensor, src: int, group: Any) -> Tensor:
    """x from group rank src on every rank (a copy elsewhere). Not differentiable."""
    x = x.detach().clone().contiguous()
    dist.broadcast(x, group=group, group_src=src)
    return x


class _GatherFn(torch.autograd.Function):
    """all_gather forward; backward: reduce_scatter, so each rank receives the sum over ranks of
    the gradient of its own part only (1/K of an all_reduce's output)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, g: Tensor):
        return reduce_scatter(g, ctx.group), None


def gather_autograd(x: Tensor, group: Any) -> Tensor:
    """Differentiable all_gather: (...) -> (K, ...); every rank's copy feeds back to its owner."""
    return _GatherFn.apply(x, group)


def all_to_all(x: Tensor, send_rows: List[int], recv_rows: List[int], group: Any) -> Tensor:
    """Rows of x (dim 0) to every rank: the first send_rows[0] rows go to group rank 0, the next
    send_rows[1] to rank 1, ...; returns the rows received, recv_rows[j] of them from rank j, in
    rank order. The splits must match across ranks. Not differentiable."""
    x = x.contiguous()
    out = x.new_empty(sum(recv_rows), *x.shape[1:])
    dist.all_to_all_single(out, x, list(recv_rows), list(send_rows), group=group)
    return out


class _AllToAllFn(torch.autograd.Function):
    """all_to_all forward; backward: the mirrored exchange (each row's gradient back to its sender)."""

    @staticmethod
    def forward(ctx, x: Tensor, send_rows: List[int], recv_rows: List[int], group: Any) -> Tensor:
        ctx.send_rows, ctx.recv_rows, ctx.group = send_rows, recv_rows, group
        return all_to_all(x, send_rows, recv_rows, group)

    @staticmethod
    def backward(ctx, g: Tensor):
        return all_to_all(g, ctx.recv_rows, ctx.send_rows, ctx.group), None, None, None


def all_to_all_autograd(x: Tensor, send_rows: List[int], recv_rows: List[int], group: Any) -> Tensor:
    """Differentiable `all_to_all`: the gradient of every received row goes back to the rank that sent it."""
    return _AllToAllFn.apply(x, send_rows, recv_rows, group)
