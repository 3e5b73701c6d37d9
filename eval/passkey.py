"""`passkey`: a 5-digit number hidden at a depth in repeated filler text (Mohtashami & Jaggi 2023),
retrieved by greedy decoding; accuracy over a grid of lengths (tokens) x depths, as a heatmap."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

import numpy as np

from .common import answer, heatmap, need_tokenizer, progress, table
from .haystack import PASSKEY_FILLER, assemble

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(tok, length: int, depth: float, key: int, filler_ids) -> Any:
    """Token ids of exactly `length` (BOS first), or None when the fixed text does not fit."""
    prefix = [tok.bos_id] + tok.encode(PREFIX)
    return assemble(length, prefix, filler_ids, [tok.encode(NEEDLE.format(key=key))], [depth], tok.encode(QUESTION))


def first_number(text: str):
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def run(target, ecfg, out: Path) -> Dict[str, Any]:
    """Accuracy grid lengths x depths (ecfg.passkey_*), capped by ecfg.max_length."""
    tok = need_tokenizer(target, "passkey")
    lengths = [L for L in ecfg.passkey_lengths if not ecfg.max_length or L <= ecfg.max_length]
    depths = list(ecfg.passkey_depths)
    rng = np.random.default_rng([ecfg.seed, 101])
    unit = tok.encode(PASSKEY_FILLER)
    filler = unit * (max(lengths, default=0) // max(len(unit), 1) + 1)
    grid, rows = [], []
    bar = progress(len(lengths) * len(depths) * ecfg.passkey_trials, "passkey",
                   ecfg.progress and target.is_main)
    for L in lengths:
        grow = []
        for d in depths:
            hits, n = 0, 0
            for _ in range(ecfg.passkey_trials):
                key = int(rng.integers(10000, 100000))
                ids = passkey_prompt(tok, L, d, key, filler)
                bar.update(1)
                if ids is None:
                    continue
                max_new = len(tok.encode(f" {key}")) + 2
                got = tok.decode(answer(target.model, ids, ecfg.chunk_size, max_new, [tok.eos_id], target.mesh))
                hits += int(first_number(got) == key)
                n += 1
            acc = hits / n if n else None
            grow.append(acc)
            rows.append([L, d, n, acc])
        grid.append(grow)
    bar.close()
    plot = "passkey.png"
    if target.is_main:  # under SP, rank 0 alone writes
        heatmap(out / plot, grid, lengths, depths, "passkey accuracy", "depth", "length (tokens)")
    done = [a for g in grid for a in g if a is not None]
    metrics = {"accuracy": float(np.mean(done)) if done else None}
    for L, g in zip(lengths, grid):
        vals = [a for a in g if a is not None]
        metrics[f"accuracy@{L}"] = float(np.mean(vals)) if vals else None
    return {"suite": "passkey", "metrics": metrics,
            "tables": [table("passkey accuracy by length and depth", ["length", "depth", "trials", "accuracy"], rows)],
            "plots": [plot], "settings": {"lengths": lengths, "depths": depths, "trials": ecfg.passkey_trials,
                                          "train_len": target.train_len, "chunk_size": ecfg.chunk_size}}
