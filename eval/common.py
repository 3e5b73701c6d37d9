"""Pieces every suite uses: prompt -> greedy answer, tables, plots, the progress bar.

A suite returns a result dict:
    {"suite": name, "metrics": {name: number}, "tables": [Table dicts], "plots": [file names],
     "settings": {...}}
with Table = {"title": str, "columns": [str], "rows": [[value, ...]]}.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .prefill import cut_at_stop, greedy_generate, prefill


def table(title: str, columns: Sequence[str], rows: List[List[Any]]) -> Dict[str, Any]:
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows]}


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True, leave=True)


@torch.no_grad()
def answer(model, prompt: List[int], chunk_size: int, max_new: int, stop_ids: Sequence[int] = (),
           mesh=None) -> List[int]:
    """Greedy continuation of one prompt (read by chunked prefill, split over mesh's SP group
    when sp > 1; every rank then gets the same answer), cut at the first stop id."""
    device = model.embed.weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    last, state = prefill(model, ids, chunk_size, mesh=mesh)
    out = greedy_generate(model, state, last, max_new, stop_ids)
    return cut_at_stop(out[0].tolist(), stop_ids)


def heatmap(path: Path, grid: List[List[Optional[float]]], rows: Sequence[Any], cols: Sequence[Any],
            title: str, xlabel: str, ylabel: str) -> None:
    """grid[i][j] in [0, 1] (None = not run) as an annotated heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = np.array([[np.nan if v is None else v for v in r] for r in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.5 * len(rows)))
    im = ax.imshow(a, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, "-" if np.isnan(a[i, j]) else f"{a[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_plot(path: Path, series: Dict[str, List[tuple]], title: str, xlabel: str, ylabel: str,
              logx: bool = False, vline: Optional[float] = None, vlabel: str = "") -> None:
    """series name -> [(x, y)] as a line plot PNG; an optional vertical marker line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if vline:
        ax.axvline(vline, color="gray", linestyle="--", label=vlabel or None)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def need_tokenizer(target, suite: str):
    if target.tokenizer is None:
        raise ValueError(f"suite '{suite}' needs a tokenizer: none found with the model; pass --tokenizer "
                         "bytes|PREP_DIR|tokenizer.json")
    return target.tokenizer
