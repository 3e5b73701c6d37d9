"""The loader a run's data section asks for: one shard folder or generated data (loader.py), or a
weighted mixture of shard folders (mixture.py). Here, not in loader.py, because the mixture is
built on the loader's pieces: loader.py never imports mixture.py."""
from __future__ import annotations

from typing import Optional

from llm_lru.data_prep import loader
from llm_lru.data_prep.mixture import build_mixture_loader
from llm_lru.data_prep.mixture import has_val_split as mixture_has_val_split


def build_loader(run_cfg, split: str = "train", dp_rank: int = 0, dp_size: int = 1, sp_rank: int = 0,
                 sp_size: int = 1, batch_size: Optional[int] = None) -> loader.Loader:
    """The loader of one DP rank for `split` ("train" | "val"): data.sources' mixture, else
    loader.build_loader (see there for the arguments)."""
    d = run_cfg.data
    if d.source == "shards" and d.sources:
        lay = loader.layout_of(run_cfg, split, dp_rank, dp_size, sp_rank, sp_size, batch_size)
        return build_mixture_loader(run_cfg, split, lay)
    return loader.build_loader(run_cfg, split, dp_rank, dp_size, sp_rank, sp_size, batch_size)


def has_val_split(run_cfg) -> bool:
    """Whether validation data exists (a missing data.val_path is an error that names it)."""
    d = run_cfg.data
    if d.source == "shards" and d.sources:
        return mixture_has_val_split(d)
    return loader.has_val_split(run_cfg)
