"""Helpers for the launcher tests: a seconds-long training config and process watching."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# configs/tiny.yaml shrunk to seconds per step on random tokens.
TINY_OVERRIDES = [
    "model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.pattern=BA", "model.n_heads=2",
    "data.source=random", "data.path=''", "train.seq_len=32", "train.global_batch_size=4",
    "train.warmup_steps=2", "train.val_every=0", "logging.tensorboard=false", "logging.progress=lines",
]


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
