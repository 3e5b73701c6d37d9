"""The gloo test harness returns the ranks' tensors intact (they travel as shared-memory handles)."""
import torch

from tests.distributed import run_world


def _reduce_and_return(rank, world_size):
    import torch.distributed as dist
    t = torch.full((1000,), float(rank))
    dist.all_reduce(t)
    return {"sum": t, "big": torch.full((100_000,), float(rank))}


def test_tensors_come_back_from_every_rank():
    out = run_world(_reduce_and_return, 2)
    assert [float(o["sum"][0]) for o in out] == [1.0, 1.0]
    assert [float(o["big"][-1]) for o in out] == [0.0, 1.0]
