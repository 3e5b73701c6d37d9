"""Checkpoints: written complete or not at all, found again by `--resume auto`, pruned to K.

Layout (RUN = cfg.out_dir)::

    RUN/config.yaml                 resolved config of the run (model.vocab_size filled in)
    RUN/metrics.jsonl               rank 0, one JSON object per optimizer step
    RUN/metrics.superseded.jsonl    records of an interrupted attempt's steps that a resume recomputed
    RUN/tb/                         TensorBoard event files
    RUN/checkpoints/latest          text: the name of the newest complete checkpoint (e.g.
                                    step_00000200); replaced atomically (os.replace) only after
                                    that checkpoint's COMPLETE marker is on disk
    RUN/checkpoints/step_00000200/
        config.yaml                 resolved config (same as RUN/config.yaml at that time)
        meta.json                   step, tokens seen, world/dp/sp, ZeRO stage, precision, and the
                                    data reference: data.path and its manifest.json (tokenizer)
        ds/                         DeepSpeed checkpoint dir (ds/latest -> tag "state"):
                                    deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                                        ".../step_00000200/ds") gives the fp32 state dict at any stage
        trainer/rank_00000.pt       per rank: loader state, RNG states (python, numpy, torch, cuda)
        COMPLETE                    written last by rank 0: JSON {step, files: {relpath: size}}

A checkpoint is complete iff COMPLETE exists, parses, and every listed file exists with its
recorded size; anything else (a crash mid-save, a truncated file) is skipped with a warning.
`find_checkpoint(path)` accepts a run dir, its checkpoints/ dir or one checkpoint dir.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

CKPT_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
DS_SUBDIR = "ds"
DS_TAG = "state"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "trainer" / f"rank_{rank:05d}.pt"


def rng_state() -> Dict[str, Any]:
    """All RNG states of this process (restored by set_rng_state for an exact resume)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def mark_complete(ckpt: Path, step: int) -> None:
    """Record every file of the checkpoint with its size, then publish it as `latest` (atomically)."""
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*")) if p.is_file()}
    files.pop(COMPLETE, None)
    _fsync_write(ckpt / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))
    tmp = ckpt.parent / f".{LATEST}.tmp"
    _fsync_write(tmp, ckpt.name + "\n")
    os.replace(tmp, ckpt.parent / LATEST)


def check_complete(ckpt: Path) -> Optional[str]:
    """None if `ckpt` is a complete checkpoint, else the reason it is not."""
    marker = ckpt / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {COMPLETE} marker ({e})"
    for rel, size in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != size:
            return f"truncated file {rel} ({p.stat().st_size} of {size} bytes)"
    return None


def list_checkpoints(ckpt_root: Path) -> List[Path]:
    """Checkpoint dirs under ckpt_root, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_complete(ckpt_root: Path, warn: bool = True) -> Optional[Path]:
    """The newest complete checkpoint under ckpt_root; incomplete newer ones are skipped with a warning."""
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        why = check_complete(ckpt)
        if why is None:
            return ckpt
        if warn:
            warnings.warn(f"skipping checkpoint {ckpt}: {why}", stacklevel=2)
    return None


def find_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint dir from a run dir, a checkpoints/ dir or a checkpoint dir."""
    path = Path(path)
    if (path / COMPLETE).exists() or _STEP_RE.match(path.name):
        why = check_complete(path)
        if why:
            raise ValueError(f"checkpoint {path} is not usable: {why}")
        return path
    root = path / CKPT_DIR if (path / CKPT_DIR).is_dir() else path
    found = latest_complete(root)
    if found is None:
        raise ValueError(f"no complete checkpoint under {path}")
    return found


def prune(ckpt_root: Path, keep: int) -> List[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than them."""
    ckpts = list_checkpoints(ckpt_root)
    complete = [c for c in ckpts if check_complete(c) is None]
    keep_set = set(complete[-keep:])
    newest_kept = complete[-1] if complete else None
    removed = []
    for c in ckpts:
        if c in keep_set:
            continue
        # An incomplete dir newer than the newest complete one may be a save in progress.
        if newest_kept is not None and c.name > newest_kept.name:
            continue
        shutil.rmtree(c, ignore_errors=True)
        removed.append(c)
    return removed
