"""Tiny random models and run folders for the eval tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_lru.config import from_dict, save_config
from llm_lru.models import HybridLM

# Every causal mixer kind, small enough for CPU tests.
ALL_KINDS = {"vocab_size": 258, "d_model": 32, "n_layers": 6, "pattern": "LGBHAS", "n_heads": 2,
             "window": 8, "block_size": 2}


def tiny_model(seed: int = 0, **over) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(from_dict({"model": {**ALL_KINDS, **over}, "data": {"source": "random"}}).model).eval()


def fake_run(run_dir: Path, cfg_dict: dict, seed: int = 0) -> HybridLM:
    """A run dir in the trainer's checkpoint layout (llm_lru/train/checkpoint.py) holding a random
    HybridLM as a ZeRO-0 DeepSpeed checkpoint (mp_rank_00_model_states.pt with 'module')."""
    from llm_lru.train.checkpoint import mark_complete

    cfg = from_dict({**cfg_dict, "out_dir": str(run_dir)})
    torch.manual_seed(seed)
    model = HybridLM(cfg.model).eval()
    ckpt = run_dir / "checkpoints" / "step_00000001"
    (ckpt / "ds" / "state").mkdir(parents=True)
    (ckpt / "ds" / "latest").write_text("state")
    torch.save({"module": model.state_dict()}, ckpt / "ds" / "state" / "mp_rank_00_model_states.pt")
    save_config(cfg, run_dir / "config.yaml")
    save_config(cfg, ckpt / "config.yaml")
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "ds_dir": "ds", "ds_tag": "state", "zero_stage": 0}))
    mark_complete(ckpt, 1)
    return model


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
