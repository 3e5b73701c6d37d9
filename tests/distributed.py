"""Run a function on a world of real processes over gloo, for tests and benchmarks.

    results = run_world(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

Each rank initialises torch.distributed (gloo, a free localhost port), calls fn, and returns its
result; the parent gets the list of results in rank order, or the first rank's traceback.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, received) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", out))
        # Tensors travel as shared-memory handles that this process serves: stay alive until
        # the parent has unpickled every result.
        received.wait(timeout=600)
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.barrier()
            except Exception:
                pass
            dist.destroy_process_group()


def run_world(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> List[Any]:
    """Run fn(rank, world_size, *args) on world_size gloo processes; results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    received = ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, received))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict = {}
    try:
        for _ in range(world_size):
            rank, status, out = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{out}")
            results[rank] = out
    finally:
        received.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
