"""`ppl`: validation perplexity, and loss by position up to and past the training length.

Rows of eval.ppl_length tokens (default 4 x train.seq_len) are made by joining consecutive
validation samples of the run's loader (their labels and document starts kept), and read by
chunked prefill. A token's position is its context length: tokens since its document started,
since states reset there and attention cannot cross it. Positions fall into powers-of-two bins;
the table and PNG show the loss per bin, with the training length marked.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from .common import line_plot, progress, table
from .prefill import token_logprobs


def _data_cfg(target, ecfg):
    """The run config whose validation split to read (the target's, or eval.data_path's)."""
    if ecfg.data_path:
        from llm_lru.config import RunConfig

        cfg = copy.deepcopy(target.cfg) if target.cfg is not None else RunConfig()
        from llm_lru.data_prep import read_manifest

        cfg.data.source, cfg.data.path, cfg.data.val_path = "shards", ecfg.data_path, ""
        cfg.data.sources = []   # a mixture run's sources give way to the folder asked for
        cfg.model.vocab_size = target.model.cfg.vocab_size
        cfg.train.seq_len = int(read_manifest(ecfg.data_path)["seq_len"])  # the loader reads whole samples
        return cfg
    if target.cfg is None:
        raise ValueError("suite 'ppl': the target carries no data config (an export); pass data_path=PREP_DIR")
    return copy.deepcopy(target.cfg)


def context_positions(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T) int64: tokens since the current document began (0 at its start;
    a row's first token counts as a start)."""
    B, T = doc_start.shape
    pos = torch.arange(T).expand(B, T)
    starts = doc_start.clone()
    starts[:, 0] = True
    last = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
    return pos - last


def rows_from_loader(cfg, length: int, n_rows: int):
    """n_rows rows of `length` tokens joined from consecutive validation samples."""
    from llm_lru.data_prep import build_loader

    T = cfg.train.seq_len
    per_row = max(1, math.ceil(length / T))
    loader = build_loader(cfg, split="val", batch_size=1)
    it = iter(loader)
    rows = []
    for _ in range(n_rows):
        parts = [next(it) for _ in range(per_row)]
        rows.append({k: torch.cat([p[k] for p in parts], 1)[:, :length] for k in ("input_ids", "labels", "doc_start")})
    return {k: torch.cat([r[k] for r in rows], 0) for k in rows[0]}


def run(target, ecfg, out: Path) -> Dict[str, Any]:
    cfg = _data_cfg(target, ecfg)
    train_len = target.train_len or cfg.train.seq_len
    length = ecfg.ppl_length or 4 * train_len
    if ecfg.max_length:
        length = min(length, ecfg.max_length)
    batch = rows_from_loader(cfg, length, ecfg.ppl_batches)
    bar = progress(ecfg.ppl_batches, "ppl", ecfg.progress and target.is_main)
    device = target.model.embed.weight.device
    nll, posn = [], []
    for b in range(ecfg.ppl_batches):
        ids = batch["input_ids"][b:b + 1].to(device)
        ds = batch["doc_start"][b:b + 1].to(device)
        lp, _ = token_logprobs(target.model, ids, ecfg.chunk_size, doc_start=ds,
                               targets=batch["labels"][b:b + 1].to(device), mesh=target.mesh)
        valid = batch["labels"][b] >= 0
        nll.append(-lp[0][valid])
        posn.append(context_positions(batch["doc_start"][b:b + 1])[0][valid])
        bar.update(1)
    bar.close()
    nll_all, pos_all = torch.cat(nll).double(), torch.cat(posn)
    edges = [0] + [2 ** k for k in range(0, max(1, int(math.ceil(math.log2(length)))) + 1)]
    rows, pts = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (pos_all >= lo) & (pos_all < hi)
        n = int(sel.sum())
        loss = float(nll_all[sel].mean()) if n else None
        rows.append([f"[{lo}, {hi})", n, loss, math.exp(loss) if loss is not None else None])
        if n:
            pts.append((max(lo, 0.5) if lo == 0 else lo, loss))
    inside, beyond = pos_all < train_len, pos_all >= train_len

    def mean(sel):
        return float(nll_all[sel].mean()) if bool(sel.any()) else None

    val_loss, loss_beyond = mean(inside), mean(beyond)
    metrics = {"val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss is not None else None,
               "loss_beyond_train_len": loss_beyond,
               "ppl_beyond_train_len": math.exp(loss_beyond) if loss_beyond is not None else None,
               "tokens": int(nll_all.numel()), "tokens_beyond_train_len": int(beyond.sum()),
               "max_context_position": int(pos_all.max()) if pos_all.numel() else 0}
    plot = "ppl_by_position.png"
    if target.is_main:  # under SP, rank 0 alone writes
        line_plot(out / plot, {"loss": pts}, "loss by context position", "position (tokens since document start)",
                  "mean NLL (nats)", logx=True, vline=train_len, vlabel="train length")
    return {"suite": "ppl", "metrics": metrics,
            "tables": [table("loss by context position", ["positions", "tokens", "loss", "ppl"], rows)],
            "plots": [plot], "settings": {"length": length, "rows": ecfg.ppl_batches, "train_len": train_len,
                                          "chunk_size": ecfg.chunk_size, "data": cfg.data.path or cfg.data.source}}
