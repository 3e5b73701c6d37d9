"""Helpers for the launcher tests: a seconds-long training config and process watching."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def shard_overrides(shards, seq_len: int = 32, workers: int = 1) -> list:
    """configs/tiny.yaml shrunk to seconds per step, on real shards from `llm-lru prep` (the
    stdlib_shards fixture) read by `workers` DataLoader worker processes: the path users take."""
    return ["model.vocab_size=0", "model.d_model=32", "model.n_layers=2", "model.pattern=BA", "model.n_heads=2",
            "data.source=shards", f"data.path={shards}", f"data.num_workers={workers}", "data.shuffle_buffer=64",
            f"train.seq_len={seq_len}", "train.global_batch_size=4", "train.warmup_steps=2", "train.val_every=0",
            "logging.tensorboard=false", "logging.progress=lines"]


def env() -> dict:
    e = {**os.environ, "PYTHON": PYTHON, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_ref(rank, world, overrides):
    from llm_lru.config import load_config
    from llm_lru.train import trainer
    from llm_lru.train.cli import resolve_vocab

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    resolve_vocab(cfg)          # model.vocab_size=0: from the shards' tokenizer, as `llm-lru train` does
    trainer.train(cfg)
    return metrics(cfg.out_dir) if rank == 0 else None


def reference_metrics(world: int, overrides: list) -> list:
    """metrics.jsonl of configs/tiny.yaml + `overrides` trained uninterrupted in a world of `world`
    gloo processes (no launcher: the reference for a launched, interrupted run)."""
    from tests.distributed import run_world

    return run_world(_train_ref, world, list(overrides), timeout=600)[0]


def read_status(run_dir) -> dict:
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}
