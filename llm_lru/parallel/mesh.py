"""The device mesh, built once: world = dp x sp.

Ranks of one SP group are contiguous and hold consecutive slices of the same sequences:
    rank = dp_rank * sp + sp_rank
so SP group i is ranks [i*sp, (i+1)*sp) and DP group j is ranks {j, j+sp, j+2*sp, ...}.
Parameters are replicated over the whole world and DeepSpeed averages over all of it (DESIGN.md
§4), so the mesh needs process groups for SP only; a single process without a process group gets
a mesh of one (no groups, every collective in llm_lru.parallel is skipped).

    mesh = init_mesh(cfg.parallel)         # THE seam: starts or joins torch.distributed, builds the groups
    mesh.sp_group, mesh.sp_rank, mesh.pos_offset(T_local)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from llm_lru.config import PROCESS_GROUP_BACKENDS



def resolve_backend(backend: str = "auto") -> str:
    """'auto' -> nccl when CUDA is available, gloo otherwise."""
    if backend not in PROCESS_GROUP_BACKENDS:
        raise ValueError(f"parallel.backend: must be one of {', '.join(PROCESS_GROUP_BACKENDS)}, got '{backend}'")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


@dataclass
class Mesh:
    """Who this process is in the dp x sp world, and the process groups to talk to its peers.

    sp_group is None in a world of one; sp_ranks are global ranks in group order (sp_ranks[i]
    holds slice i of this SP group's sequences); world_group is the group of the whole mesh
    (None: the default group).
    """

    world_size: int = 1
    rank: int = 0
    dp: int = 1
    sp: int = 1
    backend: str = "none"
    sp_group: Optional[Any] = None
    sp_ranks: List[int] = field(default_factory=lambda: [0])
    world_group: Optional[Any] = None

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def pos_offset(self, t_local: int) -> int:
        """Global position of this rank's first token when each rank holds t_local of them."""
        return self.sp_rank * t_local

    def check_length(self, seq_len: int, what: str = "train.seq_len") -> int:
        """Refuse a sequence length that sp does not divide; returns the per-rank length."""
        if seq_len % self.sp:
            raise ValueError(f"{what}: sequence length {seq_len} is not divisible by parallel.sp={self.sp}")
        return seq_len // self.sp

    def local_slice(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous slice of a whole sequence tensor along `dim` (time): (B, T, ...)
        -> (B, T / sp, ...). Refuses a length that sp does not divide."""
        t_local = self.check_length(x.shape[dim], f"tensor of shape {tuple(x.shape)} (dim {dim})")
        return x.narrow(dim, self.sp_rank * t_local, t_local)

    # --- the few collectives the trainer needs, over the whole world (no-ops in a world of one) ---
    def all_sum(self, values: List[float], device: Any = None) -> List[float]:
        """Element-wise sum of `values` over every rank (float64)."""
        if not self.is_distributed:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, group=self.world_group)
        return t.tolist()

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(group=self.world_group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (picklable objects)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.world_group)
        return box[0]

    def __repr__(self) -> str:
        return (f"Mesh(world={self.world_size}, dp={self.dp}, sp={self.sp}, rank={self.rank}, "
                f"dp_rank={self.dp_rank}, sp_rank={self.sp_rank}, backend={self.backend})")


def single_mesh() -> Mesh:
    """A mesh of one process: no process group, sp = dp = 1."""
    return Mesh()


def build_mesh(sp: int = 1) -> Mesh:
    """The dp x sp mesh over the already initialised default process group (or a mesh of one).

    Every rank must call it (each SP group is created on every rank, as torch requires)."""
    if sp < 1:
        raise ValueError(f"parallel.sp: must be >= 1, got {sp}")
    if not (dist.is_available() and dist.is_initialized()):
        if sp != 1:
            raise ValueError(f"parallel.sp={sp} needs a distributed world of at least {sp} processes "
                             "(launch with torchrun or srun); this process runs alone")
        return single_mesh()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp:
        raise ValueError(f"parallel.sp: {sp} does not divide the world size {world}")
    backend = str(dist.get_backend())
    if world == 1:
        return Mesh(backend=backend)
    sp_group = None
    for first in range(0, world, sp):
        ranks = list(range(first, first + sp))
        group = dist.new_group(ranks)
        if rank in ranks:
            sp_group, sp_ranks = group, ranks
    return Mesh(world_size=world, rank=rank, dp=world // sp, sp=sp, backend=backend, sp_group=sp_group,
                sp_ranks=sp_ranks)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_elastic_attempt(backend: str) -> None:
    """Start the process group on a store namespace of this restart attempt.

    torchrun's agent keeps one rendezvous store across restarts; the keys a killed attempt
    wrote (its ranks' gloo addresses) are still there, and a restarted rank could read them and
    dial a dead peer ("connectFullMesh ... Connection refused"). A prefix per attempt avoids it.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(not agent_hosts_store and rank == 0), timeout=timedelta(minutes=30))
    store = dist.PrefixStore(f"llm_lru/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def init_mesh(parallel_cfg: Any = None, sp: Optional[int] = None, backend: Optional[str] = None) -> Mesh:
    """Start or join torch.distributed and build the mesh: the one place that does either.

    parallel_cfg: llm_lru.config.ParallelConfig (uses .sp and .backend) or None; sp / backend
    override it. Under torchrun or srun it joins the job from the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; under torchelastic on a store namespace per restart attempt);
    alone it starts a world of one on a free localhost port (DeepSpeed needs a process group
    even then); an already initialised default group is joined as it is. On CUDA it first sets
    the device from LOCAL_RANK.
    """
    sp = sp if sp is not None else getattr(parallel_cfg, "sp", 1)
    backend = resolve_backend(backend if backend is not None else getattr(parallel_cfg, "backend", "auto"))
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            _init_elastic_attempt(backend)
        else:
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return build_mesh(sp)
