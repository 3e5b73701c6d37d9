"""The training/eval loader: a deterministic plan over the manifest, read through webdataset.

Which sample goes into which batch is a pure function of (seed, epoch, global position),
computed from the manifest's per-shard sample counts, so that:

- the epoch is one global order of samples, the same whatever the DP size or the number of
  loader workers: optimizer step k takes positions [k*G, (k+1)*G) of it (G =
  train.global_batch_size), so a run resumed at another DP size trains on exactly the batches
  the uninterrupted run would have, and every sample of an epoch is read exactly once;
- every DP rank takes the same `steps_per_epoch` batches; the last N mod G samples of each
  epoch's shuffled order are left out that epoch (a different set each epoch; counted in
  `dropped_per_epoch` and logged once);
- however few the shards, no rank or worker is starved: positions are cut across shard boundaries;
- resuming needs only the global number of samples consumed (`state_dict()`), and yields exactly
  the batches the uninterrupted loader would have yielded next, also at another DP size or
  worker count (the position is re-split; it must be a whole number of the new layout's steps).

Epoch e: shards in a seeded permutation, concatenated; the first E = N // G * G positions are cut
into windows of `data.shuffle_buffer` samples (rounded to a multiple of G), each permuted with a
seed of (seed, epoch, window). Micro batch i of DP rank r takes shuffled positions
[i*D + r*B, i*D + (r+1)*B) (D = dp_size * B); loader worker w serves the batches with
i % W == w. Each worker reads the whole window its batches lie in (dp_size x W reads of the token
data, which is small next to a step's compute). split="val" never shuffles and reads only its rows.

Batches: dict of torch tensors cut to this SP rank's slice T_local = seq_len // sp_size:
input_ids int64 (B, T_local), labels int64 (B, T_local) (-100: ignored), doc_start bool (B, T_local).
"""
from __future__ import annotations

import functools
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from llm_lru.data_prep.manifest import read_manifest
from llm_lru.data_prep.shards import read_samples
from llm_lru.data_prep.tokenizer import sha256_file

log = logging.getLogger("llm_lru.data")
IGNORE = -100
NOMINAL_EPOCH = 1000    # steps per "epoch" of the endless random/synthetic sources
STATE_VERSION = 2
# Signals a loader worker ignores when the run config names none (checkpoint.save_signals' default).
DEFAULT_IGNORED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def _ignore_signals(names: Tuple[str, ...], worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore the save signals (and SIGINT) in a loader worker.

    torchrun delivers a forwarded signal to each worker's whole process group, and SLURM to every
    process of the step, so loader workers get SIGTERM / SIGUSR1 with the trainer. PyTorch's worker
    loop installs a SIGTERM handler that dies of it (before this function runs, so ours wins), and
    the trainer then raises "DataLoader worker ... is killed by signal" before it can save. Ignored
    here, the trainer alone decides: it finishes the step, saves, and shuts its loader down, which
    ends the workers (they also exit by themselves when the trainer dies: PyTorch's watchdog).
    """
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


@dataclass
class Layout:
    """Where this loader sits: DP rank/size, SP rank/size, sequences per rank per step."""

    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    batch_size: int
    seq_len: int

    def check(self) -> None:
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} not in [0, dp_size={self.dp_size})")
        if not 0 <= self.sp_rank < self.sp_size:
            raise ValueError(f"sp_rank {self.sp_rank} not in [0, sp_size={self.sp_size})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size} (train.global_batch_size / dp_size)")
        if self.seq_len % self.sp_size:
            raise ValueError(f"train.seq_len={self.seq_len} is not divisible by the SP size {self.sp_size}")

    def to_batch(self, tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray,
                 targets: Optional[np.ndarray] = None) -> Dict[str, torch.Tensor]:
        """tokens (B, L+1), mask (B, L) loss mask, starts (B, L) -> this SP rank's slice.
        targets (B, L): the labels where a task gives its own (default: the next tokens)."""
        t = self.seq_len // self.sp_size
        sl = slice(self.sp_rank * t, (self.sp_rank + 1) * t)
        tok = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        labels = (tok[:, 1:] if targets is None else torch.from_numpy(np.asarray(targets, dtype=np.int64))).clone()
        labels[~torch.from_numpy(np.ascontiguousarray(mask))] = IGNORE
        return {"input_ids": tok[:, :-1][:, sl].contiguous(), "labels": labels[:, sl].contiguous(),
                "doc_start": torch.from_numpy(np.ascontiguousarray(starts[:, sl]))}


# ---- the shard plan ------------------------------------------------------------------------
@dataclass
class Plan:
    """The pure sample -> batch mapping of one rank (see the module docstring)."""

    base: str
    shards: List[Tuple[str, int, str]]        # (name, samples, sha256)
    layout: Layout
    workers: int                              # logical workers W (>= 1)
    seed: int
    shuffle: bool
    window: int                               # shuffle window, a multiple of B
    skip_bad: bool
    pad_id: int
    dtype: str                                # token dtype on disk (manifest)

    global_batch: int                         # samples per optimizer step over all DP ranks (G)

    def __post_init__(self):
        self.counts = np.array([s[1] for s in self.shards], np.int64)
        self.n = int(self.counts.sum())
        lay = self.layout
        self.row = lay.dp_size * lay.batch_size              # positions per micro step, all ranks
        if self.global_batch % self.row:
            raise ValueError(f"train.global_batch_size={self.global_batch} is not a multiple of "
                             f"dp_size x batch_size = {lay.dp_size} x {lay.batch_size}")
        self.epoch_len = self.n // self.global_batch * self.global_batch
        self.steps = self.epoch_len // self.row

    def shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch, 0x5A]).permutation(len(self.shards))

    def first(self, i: int) -> int:
        """Shuffled epoch position of this rank's first row of micro batch i."""
        return i * self.row + self.layout.dp_rank * self.layout.batch_size

    def locate(self, q: int) -> Tuple[int, int, int]:
        """Shuffled position q -> (window c, window start, window length); a batch never straddles two."""
        c = q // self.window
        start = c * self.window
        return c, start, min(self.window, self.epoch_len - start)


class ShardStream:
    """Reads plan windows; keeps one open shard so sequential windows never re-read."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.verified: Dict[str, bool] = {}
        self.cursor: Optional[Tuple[int, int, Iterator]] = None   # (shard, next local index, iterator)
        self.bad_count = 0

    def _ok(self, k: int) -> bool:
        """sha256 of shard k against the manifest, once per process; False if skipped as bad."""
        name, _, sha = self.plan.shards[k]
        if name not in self.verified:
            path = Path(self.plan.base) / name
            try:
                good = path.is_file() and sha256_file(path) == sha
                reason = "missing" if not path.is_file() else "sha256 differs from the manifest"
            except OSError as e:
                good, reason = False, str(e)
            if not good:
                self._bad(name, reason)
            self.verified[name] = good
        return self.verified[name]

    def _bad(self, name: str, reason: str) -> None:
        path = Path(self.plan.base) / name
        if not self.plan.skip_bad:
            raise ValueError(f"shard {path}: {reason} (set data.skip_bad_shards=true to skip it)")
        self.bad_count += 1
        log.warning("skipping bad shard %s: %s; its samples are fully masked (labels -100). "
                    "Bad shards seen by this worker: %d", path, reason, self.bad_count)

    def read(self, k: int, lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples [lo, hi) of shard k: tokens (n, L+1), starts (n, L) bool, valid (n,) bool."""
        L = self.plan.layout.seq_len
        n = hi - lo
        tokens = np.full((n, L + 1), self.plan.pad_id, np.int64)
        starts = np.zeros((n, L), bool)
        valid = np.zeros(n, bool)
        starts[:, 0] = True
        if not self._ok(k):
            return tokens, starts, valid
        name = self.plan.shards[k][0]
        if self.cursor is None or self.cursor[0] != k or self.cursor[1] != lo:
            self.cursor = (k, lo, read_samples(str(Path(self.plan.base) / name), L, skip=lo, dtype=self.plan.dtype))
        it = self.cursor[2]
        try:
            for r in range(n):
                try:
                    tok, st = next(it)
                except StopIteration:
                    raise ValueError(f"shard {Path(self.plan.base) / name}: ended at sample {lo + r}, "
                                     f"manifest says {self.plan.shards[k][1]}") from None
                tokens[r] = tok
                starts[r] = False
                starts[r, st[st < L]] = True
                valid[r] = True
        except ValueError as e:
            self.cursor = None
            if not self.plan.skip_bad:
                raise
            self.verified[name] = False
            self._bad(name, str(e))
            tokens[r:], starts[r:], valid[r:] = self.plan.pad_id, False, False
            starts[r:, 0] = True
            return tokens, starts, valid
        self.cursor = (k, hi, it)
        return tokens, starts, valid

    def read_range(self, order: np.ndarray, a: int, b: int):
        """Positions [a, b) of the epoch order (shards concatenated in `order`)."""
        counts = self.plan.counts[order]
        ends = np.cumsum(counts)
        parts = []
        k = int(np.searchsorted(ends, a, side="right"))
        while a < b:
            first = int(ends[k] - counts[k])
            hi = min(b, int(ends[k]))
            parts.append(self.read(int(order[k]), a - first, hi - first))
            a = hi
            k += 1
        return tuple(np.concatenate(x) for x in zip(*parts))


class _ShardDataset(torch.utils.data.IterableDataset):
    """Yields the plan's batches G0 + p, G0 + p + W, ... in DataLoader worker p (forever)."""

    def __init__(self, plan: Plan, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        p = info.id if info else 0
        plan, lay = self.plan, self.plan.layout
        stream = ShardStream(plan)
        cache_key, cache = None, None
        g = self.start + p
        while True:
            e, i = divmod(g, plan.steps)
            q = plan.first(i)
            if not plan.shuffle:
                tokens, starts, valid = stream.read_range(plan.shard_order(e), q, q + lay.batch_size)
            else:
                c, wstart, wlen = plan.locate(q)
                if cache_key != (e, c):
                    tokens, starts, valid = stream.read_range(plan.shard_order(e), wstart, wstart + wlen)
                    perm = np.random.default_rng([plan.seed, e, c]).permutation(wlen)
                    cache_key, cache = (e, c), (tokens[perm], starts[perm], valid[perm])
                sl = slice(q - wstart, q - wstart + lay.batch_size)
                tokens, starts, valid = (x[sl] for x in cache)
            mask = np.repeat(valid[:, None], lay.seq_len, axis=1)
            yield lay.to_batch(tokens, mask, starts)
            g += plan.workers


class _GeneratedDataset(torch.utils.data.IterableDataset):
    """Random or synthetic batches; sample k (global index, as in the shard plan) is a pure function
    of (seed, split, k), so the stream is the same whatever the DP layout."""

    def __init__(self, kind: str, layout: Layout, seed: int, split_id: int, start: int,
                 vocab_size: int, task: str = "", task_args: Optional[Dict[str, Any]] = None):
        self.kind, self.layout, self.seed, self.split_id, self.start = kind, layout, seed, split_id, start
        self.vocab_size, self.task, self.task_args = vocab_size, task, dict(task_args or {})

    def batch(self, g: int) -> Dict[str, torch.Tensor]:
        lay = self.layout
        B, L = lay.batch_size, lay.seq_len
        first = (g * lay.dp_size + lay.dp_rank) * B          # global index of this batch's first sample
        if self.kind == "random":
            tokens = np.stack([np.random.default_rng([self.seed, self.split_id, first + b]).integers(
                0, self.vocab_size, size=L + 1) for b in range(B)])
            starts = np.zeros((B, L), bool)
            starts[:, 0] = True
            return lay.to_batch(tokens, np.ones((B, L), bool), starts)
        from llm_lru.data_prep.synthetic import make_sample
        rows = []
        for b in range(B):
            rng = np.random.default_rng([self.seed, self.split_id, first + b])
            rows.append(make_sample(self.task, rng, L, self.task_args, self.vocab_size, with_targets=True))
        tokens, mask, starts, targets = (np.stack(x) for x in zip(*rows))
        return lay.to_batch(tokens, mask, starts, targets)

    def __iter__(self):
        g = self.start
        while True:
            yield self.batch(g)
            g += 1


class Loader:
    """Iterable over batches for one DP rank; endless (epochs follow each other).

    Attributes: steps_per_epoch (same on every DP rank), step (batches consumed), epoch,
    dropped_per_epoch (shards only). state_dict()/load_state_dict() give exact resume.
    """

    def __init__(self, kind: str, layout: Layout, seed: int, num_workers: int, plan: Optional[Plan] = None,
                 gen: Optional[_GeneratedDataset] = None, fingerprint: Optional[Dict[str, Any]] = None,
                 ignore_signals: Tuple[str, ...] = DEFAULT_IGNORED_SIGNALS):
        self.kind, self.layout, self.seed = kind, layout, seed
        self.num_workers, self.plan, self.gen = num_workers, plan, gen
        self.ignore_signals = tuple(ignore_signals)     # in the worker processes (see _ignore_signals)
        self.step = 0
        self.steps_per_epoch = plan.steps if plan else NOMINAL_EPOCH
        self.dropped_per_epoch = plan.n - plan.epoch_len if plan else 0
        self.fingerprint = dict(fingerprint or {})

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _dataset(self) -> Tuple[torch.utils.data.IterableDataset, int]:
        """(the dataset that yields the batches from self.step on, worker processes to read it)."""
        if self.plan is not None:
            return _ShardDataset(self.plan, self.step), self.num_workers
        self.gen.start = self.step
        return self.gen, 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        ds, workers = self._dataset()
        if workers > 0:
            # pin_memory on CUDA hosts: host-to-device copies can then overlap the step.
            it = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=workers, prefetch_factor=4, persistent_workers=False,
                pin_memory=torch.cuda.is_available(),
                worker_init_fn=functools.partial(_ignore_signals, self.ignore_signals)))
        else:
            it = iter(ds)
        try:
            for batch in it:
                self.step += 1
                yield batch
        finally:
            # A worker's exception keeps the iterator alive through its traceback, and with it the
            # other workers; stop them now rather than at garbage collection (seconds of joins).
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown:
                shutdown()
            # PyTorch's last resort for a worker that did not exit is SIGTERM, which ours ignore.
            for w in getattr(it, "_workers", ()):
                if w.is_alive():
                    os.kill(w.pid, signal.SIGKILL)
                    w.join()

    def state_dict(self) -> Dict[str, Any]:
        """Plain JSON-able position: enough to resume exactly, also at another DP size.

        `position` counts samples consumed over all DP ranks since the start (epochs included).
        """
        lay = self.layout
        return {"version": STATE_VERSION, "source": self.kind, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.step % self.steps_per_epoch,
                "position": self.step * lay.dp_size * lay.batch_size, "steps_per_epoch": self.steps_per_epoch,
                "seed": self.seed, "dp_rank": lay.dp_rank, "dp_size": lay.dp_size,
                "batch_size": lay.batch_size, "seq_len": lay.seq_len, **self.fingerprint}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        """Continue from a state_dict(), re-split over this loader's DP layout.

        Refuses a state made with a stream-changing setting (seed, seq_len, the global batch, the
        data), or a position that is not a whole number of this layout's micro steps.
        """
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: version {d.get('version')!r}, this loader reads {STATE_VERSION} "
                             "(the plan changed; restart the data stream)")
        mine = self.state_dict()
        for key in ("source", "seed", "seq_len", *self.fingerprint):
            if key in d and d[key] != mine[key]:
                raise ValueError(f"loader state: '{key}' was {d[key]!r} when saved, is {mine[key]!r} now; "
                                 f"the data stream would differ, so resuming is refused")
        row = self.layout.dp_size * self.layout.batch_size
        if int(d["position"]) % row:
            raise ValueError(f"loader state: position {d['position']} is not a whole number of micro steps of "
                             f"dp_size x batch_size = {row}; keep train.global_batch_size when resuming")
        self.step = int(d["position"]) // row


def _manifest(key: str, folder: str) -> Dict[str, Any]:
    try:
        return read_manifest(folder)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def has_val_split(run_cfg) -> bool:
    """Whether validation data exists: generated sources always, shards when data.val_path is
    set (a missing one is an error that names it) or data.path's manifest has a 'val' split."""
    d = run_cfg.data
    if d.source != "shards":
        return True
    if d.val_path:
        _manifest("data.val_path", d.val_path)
        return True
    return "val" in _manifest("data.path", d.path)["splits"]


def ignored_signals(run_cfg) -> Tuple[str, ...]:
    """What loader workers ignore: the run's checkpoint.save_signals, and SIGINT (the trainer's)."""
    ckpt = getattr(run_cfg, "checkpoint", None)
    names = list(ckpt.save_signals) if ckpt is not None else list(DEFAULT_IGNORED_SIGNALS)
    return tuple(dict.fromkeys([*names, "SIGINT"]))


def layout_of(run_cfg, split: str, dp_rank: int, dp_size: int, sp_rank: int, sp_size: int,
              batch_size: Optional[int]) -> Layout:
    """Where a loader of `split` sits (batch_size: sequences per DP rank per micro step; default
    train.global_batch_size // dp_size), checked."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got '{split}'")
    t = run_cfg.train
    B = batch_size if batch_size is not None else t.global_batch_size // dp_size
    lay = Layout(dp_rank, dp_size, sp_rank, sp_size, B, t.seq_len)
    lay.check()
    return lay


def build_loader(run_cfg, split: str = "train", dp_rank: int = 0, dp_size: int = 1, sp_rank: int = 0,
                 sp_size: int = 1, batch_size: Optional[int] = None) -> Loader:
    """The loader of one DP rank for `split` ("train" | "val"); see the module docstring.

    batch_size: sequences per DP rank per micro step; default train.global_batch_size // dp_size.
    Shards: data.path (split "val": data.val_path if set, else data.path's val split); the weighted
    mixture of data.sources is sources.py's. Its worker processes ignore the run's save signals
    (see _ignore_signals).
    """
    d, t = run_cfg.data, run_cfg.train
    lay = layout_of(run_cfg, split, dp_rank, dp_size, sp_rank, sp_size, batch_size)
    B, seed = lay.batch_size, t.seed
    vocab = run_cfg.model.vocab_size
    if d.source in ("random", "synthetic"):
        if d.source == "random" and vocab < 1:
            raise ValueError("model.vocab_size: must be set (> 0) for data.source=random")
        gen = _GeneratedDataset(d.source, lay, seed, 0 if split == "train" else 1, 0, vocab, d.task, d.task_args)
        if d.source == "synthetic":
            gen.batch(0)        # fail now, naming the task, rather than in the first step
        return Loader(d.source, lay, seed, 0, gen=gen, fingerprint={"task": d.task})
    if d.source != "shards":
        raise ValueError(f"data.source: must be shards, random or synthetic, got '{d.source}'")
    if d.sources:
        raise ValueError("data.sources: a mixture is built by llm_lru.data_prep.build_loader (sources.py)")
    key = "data.path"
    folder = d.path
    if split == "val" and d.val_path:
        key, folder = "data.val_path", d.val_path
    if not folder:
        raise ValueError(f"{key}: required for data.source=shards")
    m = _manifest(key, folder)
    want = split if split in m["splits"] else None
    if split == "val" and want is None and key == "data.val_path":
        want = "train"          # a separate prep folder used whole as validation data
    if want is None:
        raise ValueError(f"{key}: {folder} has no '{split}' split (prep with --val-fraction, or set data.val_path)")
    if m["seq_len"] != t.seq_len:
        raise ValueError(f"train.seq_len={t.seq_len} differs from the shards' seq_len {m['seq_len']} ({key}={folder})")
    tv = m["tokenizer"]["vocab_size"]
    if vocab and vocab < tv:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tv} ({key}={folder})")
    shards = [(s["name"], s["samples"], s["sha256"]) for s in m["splits"][want]["shards"]]
    shuffle = d.shuffle and split == "train"
    # Positions per optimizer step (the unit a resume at another dp re-splits). Validation, and a
    # caller's own batch size that does not divide the global batch, step one micro batch at a time.
    G = t.global_batch_size if split == "train" and t.global_batch_size % (dp_size * B) == 0 else dp_size * B
    window = max(G, (d.shuffle_buffer // G) * G) if shuffle else G
    workers = max(1, d.num_workers)
    plan = Plan(m["_dir"], shards, lay, workers, seed, shuffle, window, d.skip_bad_shards,
                m["tokenizer"]["pad_id"], m["dtype"], G)
    if plan.steps < 1:
        raise ValueError(f"{key}: {plan.n} '{want}' samples cannot fill one step of {G} sequences "
                         f"(dp_size {dp_size} x batch {B})")
    loader = Loader("shards", lay, seed, d.num_workers, plan=plan,
                    fingerprint={"num_samples": plan.n, "global_batch": G, "shuffle": shuffle, "window": window},
                    ignore_signals=ignored_signals(run_cfg))
    if loader.dropped_per_epoch and dp_rank == 0:
        log.info("%s: %d of %d samples per epoch are left out so that every DP rank takes %d steps "
                 "(a different set each epoch when shuffling)", folder, loader.dropped_per_epoch, plan.n, plan.steps)
    return loader
