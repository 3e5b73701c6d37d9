"""`llm-lru train CONFIG.yaml [key=value ...] [--resume auto|none|PATH]`.

The config is loaded, validated and checked against the world size (WORLD_SIZE, set by
torchrun; 1 when run alone) before any process group starts, so a bad key or a batch that does
not split stops every rank at once with the key named. Then llm_lru.parallel.init_mesh joins the
job (torchrun / srun+torchrun, elastic restarts included) or starts a world of one on a free
localhost port, and builds the mesh that the trainer uses.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from llm_lru.config import ConfigError, RunConfig, check_world, load_config, primary_data_path


def resolve_vocab(cfg: RunConfig) -> None:
    """model.vocab_size = 0 means "from the data": read it from the shards' tokenizer."""
    if cfg.model.vocab_size > 0:
        return
    path = primary_data_path(cfg.data)   # a mixture's sources share one tokenizer (checked by the loader)
    if not path:
        raise ConfigError("model.vocab_size: 0 means 'from the data's tokenizer', but data.path is empty "
                          f"(data.source={cfg.data.source}); set model.vocab_size")
    from llm_lru.data_prep import read_manifest

    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.vocab_size: 0 needs the manifest of {path}: {e}") from None
    cfg.model.vocab_size = int(manifest["tokenizer"]["vocab_size"])


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
    from llm_lru.train.tracking import require_wandb

    require_wandb(cfg)
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `llm-lru train`; returns the exit status."""
    cfg = parse(list(sys.argv[1:] if argv is None else argv))
    import torch

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    import torch.distributed as dist

    from llm_lru.parallel import init_mesh
    from llm_lru.train.checkpoint import CheckpointWriteError
    from llm_lru.train.trainer import TooManyBadSteps, train

    mesh = init_mesh(cfg.parallel)  # starts or joins the process groups

    try:
        summary = train(cfg, mesh)
    except TooManyBadSteps as e:
        print(f"llm-lru train: stopped: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:
        print(f"llm-lru train: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["preempted"]:
        from llm_lru.train.checkpoint import PREEMPTED_EXIT

        print(f"llm-lru train: preempted at step {summary['step']}; checkpoint {summary['checkpoint']}; "
              f"run again to continue (exit {PREEMPTED_EXIT})", file=sys.stderr)
        return PREEMPTED_EXIT
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"llm-lru train: done at step {summary['step']}, {summary['tokens']} tokens, "
              f"{summary['bad_steps']} skipped steps; checkpoint {summary['checkpoint']}")
    return 0
