"""The device mesh, built once: world = dp x sp.

Ranks of one SP group are contiguous and hold consecutive slices of the same sequences:
    rank = dp_rank * sp + sp_rank
so SP group i is ranks [i*sp, (i+1)*sp) and DP group j is ranks {j, j+sp, j+2*sp, ...}.
Built on torch's DeviceMesh (works on gloo and NCCL alike); a single process without a process
group gets a mesh of one (no groups, every collective in llm_lru.parallel is skipped).

    mesh = init_mesh(cfg.parallel)         # joins / starts torch.distributed when needed
    mesh.sp_group, mesh.sp_rank, mesh.pos_offset(T_local)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")


def resolve_backend(backend: str = "auto") -> str:
    """'auto' -> nccl when CUDA is available, gloo otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"parallel.backend: must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


@dataclass
class Mesh:
    """Who this process is in the dp x sp world, and the process groups to talk to its peers.

    sp_group / dp_group are None in a world of one; sp_ranks / dp_ranks are global ranks in
    group order (sp_ranks[i] holds slice i of this SP group's sequences); world_group is the
    group of the whole mesh (None: the default group).
    """

    world_size: int = 1
    rank: int = 0
    dp: int = 1
    sp: int = 1
    backend: str = "none"
    sp_group: Optional[Any] = None
    dp_group: Optional[Any] = None
    sp_ranks: List[int] = field(default_factory=lambda: [0])
    dp_ranks: List[int] = field(default_factory=lambda: [0])
    device_mesh: Optional[Any] = None
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

    def __repr__(self) -> str:
        return (f"Mesh(world={self.world_size}, dp={self.dp}, sp={self.sp}, rank={self.rank}, "
                f"dp_rank={self.dp_rank}, sp_rank={self.sp_rank}, backend={self.backend})")


def single_mesh() -> Mesh:
    """A mesh of one process: no process group, sp = dp = 1."""
    return Mesh()


def build_mesh(sp: int = 1) -> Mesh:
    """The dp x sp mesh over the already initialised default process group (or a mesh of one)."""
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
    dp = world // sp
    backend = str(dist.get_backend())
    if world == 1:
        return Mesh(backend=backend)
    from torch.distributed.device_mesh import init_device_mesh
    device_type = "cuda" if backend == "nccl" else "cpu"
    # Row-major (dp, sp): the sp dimension varies fastest, so SP groups are contiguous ranks.
    dm = init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))
    sp_group, dp_group = dm.get_group("sp"), dm.get_group("dp")
    return Mesh(world_size=world, rank=rank, dp=dp, sp=sp, backend=backend,
                sp_group=sp_group, dp_group=dp_group,
                sp_ranks=dist.get_process_group_ranks(sp_group),
                dp_ranks=dist.get_process_group_ranks(dp_group), device_mesh=dm)


def init_mesh(parallel_cfg: Any = None, sp: Optional[int] = None, backend: Optional[str] = None) -> Mesh:
    """Join (or start) torch.distributed and build the mesh from `parallel` config keys.

    parallel_cfg: llm_lru.config.ParallelConfig (uses .sp and .backend) or None; sp / backend
    override it. Starts the default process group from the torchrun/SLURM environment when
    WORLD_SIZE > 1 and none exists yet (on CUDA, sets the device from LOCAL_RANK first).
    """
    sp = sp if sp is not None else getattr(parallel_cfg, "sp", 1)
    backend = resolve_backend(backend if backend is not None else getattr(parallel_cfg, "backend", "auto"))
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return build_mesh(sp)
