"""Generated data behind the loader interface: `random` tokens and registered `synthetic` tasks.

A task is a function registered under a name:

    fn(rng: numpy.random.Generator, seq_len: int, **task_args) -> dict(
        tokens    = int array (seq_len + 1,)   inputs are tokens[:-1], targets tokens[1:]
        loss_mask = bool array (seq_len,) or None (None: every target counts); False positions
                    get label -100
        doc_starts= None (one document from position 0), an int array of input positions where a
                    document starts, or a bool array (seq_len,)
        targets   = (optional) int array (seq_len,): the label of each input position, for tasks
                    whose answers are not the next input (a sequence labelling, e.g. the word
                    problem with an answer at every position); None or absent: tokens[1:]
    )

`rng` is seeded from (train.seed, split, global sample index), so sample k is the same whatever
the rank layout and across resumes; the function must draw all randomness from it. If the
function takes a `vocab_size` argument and task_args has none, model.vocab_size is passed.
The tasks are the generators of llm_lru.data_prep.tasks (`TASKS`: copy, MQAR, state tracking, the
MAD suite); `register_task` adds a caller's own under a new name. `task_batch` draws n samples of
a task on their own seed stream (what the eval `task` suite scores).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from .tasks import TASKS

TaskFn = Callable[..., Dict[str, Any]]


def register_task(name: str, fn: TaskFn) -> TaskFn:
    """Register `fn` as synthetic task `name` (data.task); returns fn (usable as a decorator body)."""
    if not callable(fn):
        raise TypeError(f"register_task('{name}'): fn must be callable")
    TASKS[name] = fn
    return fn


def make_sample(name: str, rng: np.random.Generator, seq_len: int, task_args: Dict[str, Any],
                vocab_size: int = 0, with_targets: bool = False):
    """Run task `name` once and check its output: (tokens (L+1,), loss_mask (L,), doc_start (L,)),
    and targets (L,) (the labels; tokens[1:] unless the task gives its own) when with_targets.

    A caller without with_targets takes tokens[1:] as the labels: a task whose scored targets
    differ from them then stops with a ValueError naming it rather than train on wrong labels.
    """
    if name not in TASKS:
        raise ValueError(f"data.task: unknown synthetic task '{name}' (registered: {', '.join(sorted(TASKS))})")
    fn = TASKS[name]
    args = dict(task_args)
    if vocab_size and "vocab_size" not in args and "vocab_size" in inspect.signature(fn).parameters:
        args["vocab_size"] = vocab_size
    out = fn(rng, seq_len, **args)
    tokens = np.asarray(out["tokens"])
    if tokens.shape != (seq_len + 1,) or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"data.task '{name}': tokens must be an int array of shape ({seq_len + 1},), got "
                         f"{tokens.dtype} {tokens.shape}")
    mask = out.get("loss_mask")
    mask = np.ones(seq_len, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != (seq_len,):
        raise ValueError(f"data.task '{name}': loss_mask must have shape ({seq_len},), got {mask.shape}")
    ds = out.get("doc_starts")
    starts = np.zeros(seq_len, bool)
    if ds is None:
        starts[0] = True
    else:
        ds = np.asarray(ds)
        if ds.dtype == bool:
            if ds.shape != (seq_len,):
                raise ValueError(f"data.task '{name}': doc_starts mask must have shape ({seq_len},)")
            starts = ds
        else:
            starts[ds[ds < seq_len]] = True
    targets = out.get("targets")
    if targets is None:
        targets = tokens[1:]
    else:
        targets = np.asarray(targets)
        if targets.shape != (seq_len,) or not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"data.task '{name}': targets must be an int array of shape ({seq_len},), got "
                             f"{targets.dtype} {targets.shape}")
        if not with_targets and (targets[mask] != tokens[1:][mask]).any():
            raise ValueError(f"data.task '{name}': its answers are not the next tokens (a labelling task); "
                             "this caller reads labels from tokens[1:] and cannot train it "
                             "(it needs make_sample(..., with_targets=True))")
    for what, ids in (("token", tokens), ("target", targets)):
        if vocab_size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"data.task '{name}': {what} ids outside [0, model.vocab_size={vocab_size})")
    if with_targets:
        return tokens.astype(np.int64), mask, starts, targets.astype(np.int64)
    return tokens.astype(np.int64), mask, starts


def task_batch(task: str, task_args: Dict[str, Any], seq_len: int, n: int, seed: int,
               vocab_size: int = 0) -> Dict[str, np.ndarray]:
    """n samples of a task with their own seed stream (split id 2: neither the
    loader's train (0) nor val (1) samples): tokens (n, L+1), mask (n, L), starts (n, L),
    targets (n, L) (the labels: tokens[:, 1:] unless the task gives its own)."""
    rows: List[Tuple[np.ndarray, ...]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        rows.append(make_sample(task, rng, seq_len, task_args, vocab_size, with_targets=True))
    tokens, mask, starts, targets = (np.stack(x) for x in zip(*rows))
    return {"tokens": tokens, "mask": mask, "starts": starts, "targets": targets}
