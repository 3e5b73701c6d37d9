"""Data: corpora -> tokenizer -> packed WebDataset shards (`llm-lru prep`), and the loader.

Public API (imported lazily, so that `llm-lru prep` never imports torch):
- build_loader(run_cfg, split, dp_rank, dp_size, sp_rank, sp_size, batch_size) -> Loader
- TASKS, register_task(name, fn), task_batch: the synthetic tasks for data.source=synthetic
  (generators in tasks.py, sampling in synthetic.py)
- read_manifest(dir) -> dict; load_tokenizer(dir_or_manifest) -> LoadedTokenizer
- run_prep(PrepConfig, out, workers) and verify(dir) -> list of problems
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_loader": "sources", "has_val_split": "sources", "Loader": "loader",
    "register_task": "synthetic", "TASKS": "synthetic", "task_batch": "synthetic", "make_sample": "synthetic",
    "read_manifest": "manifest",
    "load_tokenizer": "tokenizer", "make_tokenizer": "tokenizer", "LoadedTokenizer": "tokenizer",
    "run_prep": "prep", "verify": "prep", "PrepConfig": "prep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__} has no attribute {name}")
