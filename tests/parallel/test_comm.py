"""The differentiable all_gather and reduce_scatter of llm_lru.parallel.comm on real gloo processes."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llm_lru.parallel.comm import gather_autograd, reduce_scatter
from tests.distributed import run_world


def _pieces(k: int) -> torch.Tensor:
    return torch.randn(k, 3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _weights(k: int) -> torch.Tensor:
    # Each rank weights the gathered tensor differently, so each rank's gradient is a different sum.
    return torch.randn(k, k, 3, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)


def _gather_worker(rank: int, world_size: int, k: int):
    x = _pieces(k)[rank].clone().requires_grad_(True)
    got = gather_autograd(x, dist.group.WORLD)
    (got * _weights(k)[rank]).sum().backward()
    rows = torch.arange(k * 2, dtype=torch.float64).view(k, 2) * (rank + 1)
    return got.detach(), x.grad, reduce_scatter(rows, dist.group.WORLD)


@pytest.mark.parametrize("k", [2, 3])
def test_gather_autograd_and_reduce_scatter_match_one_process(k):
    pieces, weights = _pieces(k), _weights(k)
    # Reference in one process: all ranks' losses summed, gradients by autograd.
    x = pieces.clone().requires_grad_(True)
    sum((x * weights[r]).sum() for r in range(k)).backward()
    rows_sum = torch.arange(k * 2, dtype=torch.float64).view(k, 2) * sum(r + 1 for r in range(k))
    for rank, (got, grad, scattered) in enumerate(run_world(_gather_worker, k, k)):
        torch.testing.assert_close(got, pieces, rtol=0, atol=0)
        torch.testing.assert_close(grad, x.grad[rank], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scattered, rows_sum[rank], rtol=0, atol=0)
