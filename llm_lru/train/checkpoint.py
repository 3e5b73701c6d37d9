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
        universal/state/            made on demand when a run resumes at another DP size:
                                    DeepSpeed's universal checkpoint of ds/state (ds_to_universal)
    RUN/status.json                 rank 0: {"status": running | finished | preempted | failed, "step"}

Preemption: a signal of checkpoint.save_signals (default SIGTERM, SIGUSR1) reaching any rank makes
every rank finish its step, save a checkpoint at that step and exit with PREEMPTED_EXIT (75,
EX_TEMPFAIL: "run me again"); status.json then says "preempted". The handler only records the
signal, so a second one during the save changes nothing.

A checkpoint is complete iff COMPLETE exists, parses, and every listed file exists with its
recorded size; anything else (a crash mid-save, a truncated file) is skipped with a warning.
`find_checkpoint(path)` accepts a run dir, its checkpoints/ dir or one checkpoint dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

CKPT_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
DS_SUBDIR = "ds"
DS_TAG = "state"
UNIVERSAL_SUBDIR = "universal"
STATUS = "status.json"
PREEMPTED_EXIT = 75     # os.EX_TEMPFAIL: a signal save; the run continues when started again
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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota); the partial one was removed."""


def without_frames(error: BaseException) -> BaseException:
    """`error` (and its chain) without tracebacks: their frames hold the failed writer's open files,
    whose space a removed checkpoint does not give back while they stay open. Collected now."""
    import gc

    e: Optional[BaseException] = error
    while e is not None:
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    gc.collect()
    return error


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def discard_failed_save(ckpt: Path, error: Optional[BaseException], model_bytes: int) -> str:
    """Remove the partial checkpoint `ckpt` left by a failed save; return the message that says why
    it failed: the checkpoint, the bytes it needs (the newest complete checkpoint's size, else
    `model_bytes`), the free space, and that `latest` still names the previous checkpoint."""
    ckpt = Path(ckpt)
    previous = latest_complete(ckpt.parent, warn=False)
    need = _tree_bytes(previous) if previous is not None and previous != ckpt else model_bytes
    shutil.rmtree(ckpt, ignore_errors=True)
    free = shutil.disk_usage(ckpt.parent).free
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC or "space" in str(error).lower() \
        or free < need
    why = "the disk is full" if full else f"{type(error).__name__}: {str(error).strip()[:300]}"
    keep = f"'latest' still names {previous}" if previous is not None else "no earlier checkpoint exists"
    return (f"checkpoint {ckpt} could not be written ({why}): it needs about {need:,} bytes and "
            f"{free:,} bytes are free on {ckpt.parent}. The partial checkpoint was removed; {keep}. "
            f"Free some space (or set out_dir on a larger disk) and run again to resume")


# --- preemption ---------------------------------------------------------------------------

class SaveSignals:
    """Record the first of `names` (e.g. ["SIGTERM", "SIGUSR1"]) that reaches this process.

    install() replaces the handlers (main thread only; elsewhere it warns and does nothing),
    restore() puts the previous ones back. The handler does no I/O: the training loop reads
    `received` once per step and agrees with the other ranks before it saves.
    """

    def __init__(self, names: Sequence[str]):
        self.signals = [getattr(signal, n) for n in names]
        self.received: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> "SaveSignals":
        if threading.current_thread() is not threading.main_thread():
            if self.signals:
                warnings.warn("checkpoint.save_signals: not the main thread, signals are not caught", stacklevel=2)
            return self
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def write_status(run_dir: Path, status: str, step: int) -> None:
    """RUN/status.json, replaced atomically: what the last attempt of the run did (see launch/slurm.sbatch).
    A disk too full for these few bytes leaves the previous status with a warning, not a traceback."""
    tmp = Path(run_dir) / f".{STATUS}.tmp"
    try:
        _fsync_write(tmp, json.dumps({"status": status, "step": step}) + "\n")
        os.replace(tmp, Path(run_dir) / STATUS)
    except OSError as e:
        warnings.warn(f"{Path(run_dir) / STATUS}: could not record status '{status}': {e}", stacklevel=2)
        tmp.unlink(missing_ok=True)


def read_status(run_dir: Path) -> Dict[str, Any]:
    """RUN/status.json as a dict ({"status": "none"} when the run never started)."""
    try:
        return json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {"status": "none", "step": 0}


# --- resuming at another world size -------------------------------------------------------

def read_meta(ckpt: Path) -> Dict[str, Any]:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def check_resume_model(ckpt: Path, model) -> None:
    """Refuse to resume `ckpt` (a ConfigError naming every key) when this run's ModelConfig differs
    from the one it was trained with in anything but RESUMABLE_MODEL_FIELDS; a config.yaml that
    predates a key counts with the value of then (LEGACY_MODEL_DEFAULTS)."""
    from llm_lru.config import LEGACY_MODEL_DEFAULTS, RESUMABLE_MODEL_FIELDS, ConfigError, load_config

    path = Path(ckpt) / "config.yaml"
    if not path.is_file():  # a checkpoint from before configs were saved with it: nothing to compare
        return
    from omegaconf import OmegaConf

    written = set(OmegaConf.load(path).get("model") or {})
    saved = load_config(path, saved=True).model
    diffs = []
    for f in dataclasses.fields(saved):
        old, new = getattr(saved, f.name), getattr(model, f.name)
        if f.name in RESUMABLE_MODEL_FIELDS or old == new:
            continue
        why = " (its config predates the key)" if f.name in LEGACY_MODEL_DEFAULTS and f.name not in written else ""
        diffs.append(f"model.{f.name}: {old!r} in {path}{why}, {new!r} in this run")
    if diffs:
        raise ConfigError("checkpoint.resume: the model differs from the checkpoint's: " + "; ".join(diffs)
                          + ". Set those keys to the checkpoint's values to resume it")


def check_resume(ckpt: Path, sp: int, dp: int, global_batch: int) -> bool:
    """Whether `ckpt` can be resumed by a run of (sp, dp, global batch); True when DP changed.

    Raises ValueError naming the key when it cannot: another parallel.sp, or another
    train.global_batch_size (the data order and the schedule are defined per global batch).
    """
    meta = read_meta(ckpt)
    if meta["sp"] != sp:
        raise ValueError(f"parallel.sp: {ckpt} was written with sp={meta['sp']}, this run has sp={sp}; "
                         "a resume may change the DP size (the number of nodes), not the SP size")
    saved_batch = meta.get("global_batch_size", global_batch)
    if saved_batch != global_batch:
        raise ValueError(f"train.global_batch_size: {ckpt} was trained with {saved_batch}, this run has "
                         f"{global_batch}; keep it when resuming (micro batch x accumulation x dp adapts)")
    return meta["dp"] != dp


def to_universal(ckpt: Path) -> Path:
    """DeepSpeed's universal checkpoint of ckpt/ds (built once, beside it); returns its load dir.

    Loaded with `{"checkpoint": {"load_universal": true}}` in the DS config, it restores weights
    and the ZeRO-partitioned optimizer state at any DP size. Built in a temporary dir and renamed,
    so an interrupted conversion is redone, never half used. Call on one rank.
    """
    out = Path(ckpt) / UNIVERSAL_SUBDIR
    if (out / DS_TAG).is_dir():
        return out
    from deepspeed.checkpoint import ds_to_universal

    tmp = Path(ckpt) / f".{UNIVERSAL_SUBDIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(Path(ckpt) / DS_SUBDIR / DS_TAG), output_folder=str(tmp / DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)
    os.replace(tmp, out)
    return out


def group_hyperparams(optimizer) -> List[Dict[str, Any]]:
    """The param groups' settings (all but their params), to be put back by repair_universal_load."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def repair_universal_load(optimizer, hyper: List[Dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load (seen with 2 param groups, dp 2 -> 1):
    every group gets the first group's settings (weight decay on norms and biases), and every
    group's state shares one `step` tensor, which each group's update then advances again.

    `optimizer` is the engine's (ZeRO wrapper or client); `hyper` is group_hyperparams() of it
    from before the load (the settings come from the config, not from the checkpoint).
    """
    for group, h in zip(optimizer.param_groups, hyper):
        group.update(h)
    inner = getattr(optimizer, "optimizer", optimizer)
    for st in inner.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
