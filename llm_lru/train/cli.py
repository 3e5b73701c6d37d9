"""`llm-lru train CONFIG.yaml [key=value ...] [--resume auto|none|PATH]`.

The config is loaded, validated and checked against the world size (WORLD_SIZE, set by
torchrun; 1 when run alone) before any process group starts, so a bad key or a batch that does
not split stops every rank at once with the key named. Under torchrun/srun+torchrun the process
joins the job; alone it runs as a world of one on a free localhost port.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import List, Optional

from llm_lru.config import ConfigError, RunConfig, check_world, load_config


def resolve_vocab(cfg: RunConfig) -> None:
    """model.vocab_size = 0 means "from the data": read it from the shards' tokenizer."""
    if cfg.model.vocab_size > 0:
        return
    if not cfg.data.path:
        raise ConfigError("model.vocab_size: 0 means 'from the data's tokenizer', but data.path is empty "
                          f"(data.source={cfg.data.source}); set model.vocab_size")
    from llm_lru.data_prep import read_manifest

    try:
        manifest = read_manifest(cfg.data.path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.vocab_size: 0 needs the manifest of data.path={cfg.data.path}: {e}") from None
    cfg.model.vocab_size = int(manifest["tokenizer"]["vocab_size"])


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
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(not agent_hosts_store and rank == 0), timeout=timedelta(minutes=30))
    store = dist.PrefixStore(f"llm_lru/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def init_world(cfg: RunConfig) -> None:
    """Join the torchrun/SLURM job from its env vars, or start a world of one."""
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from llm_lru.train.engine import disable_cpu_shm_comm

    disable_cpu_shm_comm()
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        _init_elastic_attempt(backend)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    assert dist.is_initialized()


def parse(argv: List[str]) -> RunConfig:
    """Parse argv into a validated RunConfig (raises ConfigError naming the key)."""
    ap = argparse.ArgumentParser(prog="llm-lru train", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="YAML config file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
    ap.add_argument("--resume", help="auto | none | a run or checkpoint dir (checkpoint.resume)")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    resolve_vocab(cfg)
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `llm-lru train`; returns the exit status."""
    cfg = parse(list(sys.argv[1:] if argv is None else argv))
    import torch

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    init_world(cfg)
    import torch.distributed as dist

    from llm_lru.train.trainer import TooManyBadSteps, train

    try:
        summary = train(cfg)
    except TooManyBadSteps as e:
        print(f"llm-lru train: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"llm-lru train: done at step {summary['step']}, {summary['tokens']} tokens, "
              f"{summary['bad_steps']} skipped steps; checkpoint {summary['checkpoint']}")
    return 0
