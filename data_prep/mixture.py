"""Weighted mixtures of shard sources (data.sources: [{path, weight, name, val_path}, ...]).

Global sample position j (the same positions as the one-source loader: optimizer step k takes
[k*G, (k+1)*G), micro step g of DP rank r takes [g*D + r*B, g*D + (r+1)*B), D = dp x B) is given a
source by a seeded draw: positions come in blocks of ASSIGN_BLOCK, and block b's labels are
`rng([seed, MIX_TAG, b]).choice(S, ASSIGN_BLOCK, p=weights / sum)`, so sample j comes from source s
with probability w_s / sum(w), independently of the DP size and the number of loader workers.
The c-th sample drawn from a source is that source's sample at its own position c: its own
epochs (epoch e = c // n_s, shuffled in windows with its own seed, every sample once per epoch,
nothing dropped), so a source that runs out starts its next epoch on its own, whatever the others do.

The loader's state holds the global position and every source's position (samples taken from it),
so a resume continues exactly, also at another DP size or worker count. Weights may change on a
resume: the sources continue from their positions and the labels from there on follow the new
weights. The sources themselves (names, sample counts), the seed, seq_len and the global batch
may not.

Validation (split "val") is the same mixture over each source's validation data (its val_path, or
its folder's val split; a source with neither is left out), read without shuffling.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from llm_lru.config import source_name
from llm_lru.data_prep.loader import STATE_VERSION, Layout, Loader, Plan, ShardStream, _manifest, ignored_signals

log = logging.getLogger("llm_lru.data")
ASSIGN_BLOCK = 4096     # positions per seeded draw of source labels
MIX_TAG = 0x4D4958      # "MIX": keeps the label stream apart from the shuffle streams


@dataclass
class Source:
    """One source of the mixture: its name, folder, weight and the plan of its own sample order."""

    name: str
    path: str
    weight: float
    plan: Plan              # a one-sample-per-step plan: epoch_len = every sample of the split


class Labels:
    """Source labels and per-source positions of consecutive global positions, from a start.

    advance(n) -> (labels, source positions) of positions [position, position + n), and moves on.
    """

    def __init__(self, seed: int, weights: np.ndarray, position: int, counts: np.ndarray):
        self.seed = seed
        self.p = np.asarray(weights, np.float64) / float(np.sum(weights))
        self.position = int(position)
        self.counts = np.array(counts, np.int64)
        self._block: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def _labels(self, a: int, b: int) -> np.ndarray:
        parts = []
        while a < b:
            blk = a // ASSIGN_BLOCK
            if self._block[0] != blk:
                rng = np.random.default_rng([self.seed, MIX_TAG, blk])
                self._block = (blk, rng.choice(len(self.p), size=ASSIGN_BLOCK, p=self.p))
            hi = min(b, (blk + 1) * ASSIGN_BLOCK)
            parts.append(self._block[1][a - blk * ASSIGN_BLOCK: hi - blk * ASSIGN_BLOCK])
            a = hi
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def advance(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        labels = self._labels(self.position, self.position + n)
        where = np.empty(n, np.int64)
        for s in range(len(self.p)):
            idx = np.flatnonzero(labels == s)
            where[idx] = self.counts[s] + np.arange(len(idx))
            self.counts[s] += len(idx)
        self.position += n
        return labels, where


class SourceReader:
    """Sample c of one source's endless stream (its epochs one after the other); keeps one window."""

    def __init__(self, source: Source):
        self.plan = source.plan
        self.stream = ShardStream(self.plan)
        self.key: Optional[Tuple[int, int]] = None
        self.window: Tuple[np.ndarray, ...] = ()

    def sample(self, c: int) -> Tuple[np.ndarray, np.ndarray, bool]:
        plan = self.plan
        e, q = divmod(int(c), plan.epoch_len)
        w, start, length = plan.locate(q)
        if self.key != (e, w):
            tokens, starts, valid = self.stream.read_range(plan.shard_order(e), start, start + length)
            if plan.shuffle:
                perm = np.random.default_rng([plan.seed, e, w]).permutation(length)
                tokens, starts, valid = tokens[perm], starts[perm], valid[perm]
            self.key, self.window = (e, w), (tokens, starts, valid)
        tokens, starts, valid = self.window
        return tokens[q - start], starts[q - start], bool(valid[q - start])


class _MixtureDataset(torch.utils.data.IterableDataset):
    """Yields this rank's micro batches start + p, start + p + W, ... in DataLoader worker p."""

    def __init__(self, sources: List[Source], layout: Layout, seed: int, workers: int, start: int,
                 counts: np.ndarray):
        self.sources, self.layout, self.seed, self.workers = sources, layout, seed, workers
        self.start, self.counts = start, counts

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        p = info.id if info else 0
        lay = self.layout
        row = lay.dp_size * lay.batch_size
        labels = Labels(self.seed, np.array([s.weight for s in self.sources]), self.start * row, self.counts)
        readers = [SourceReader(s) for s in self.sources]
        mine = slice(lay.dp_rank * lay.batch_size, (lay.dp_rank + 1) * lay.batch_size)
        g = self.start
        while True:
            which, where = labels.advance(row)     # every rank's samples of micro step g
            if (g - self.start) % self.workers == p:
                rows = [readers[s].sample(c) for s, c in zip(which[mine], where[mine])]
                tokens, starts, valid = (np.stack(x) for x in zip(*rows))
                yield lay.to_batch(tokens, np.repeat(valid[:, None], lay.seq_len, axis=1), starts)
            g += 1


class MixtureLoader(Loader):
    """The Loader of a weighted mixture (see the module docstring); state_dict() holds every
    source's position. `take_notes()` returns (once) what happened since: sources that started
    a new epoch. loader_options go to Loader as they are (its worker settings)."""

    def __init__(self, sources: List[Source], layout: Layout, seed: int, num_workers: int,
                 fingerprint: Dict[str, Any], **loader_options: Any):
        super().__init__("mixture", layout, seed, num_workers, fingerprint=fingerprint, **loader_options)
        self.sources = sources
        self.row = layout.dp_size * layout.batch_size
        self.steps_per_epoch = max(1, sum(s.plan.n for s in sources) // self.row)   # nominal
        self.dropped_per_epoch = 0
        self._start_counts = np.zeros(len(sources), np.int64)
        self._start_step = 0
        self._labels = self._fresh_labels()
        self._notes: List[str] = []

    def _fresh_labels(self) -> Labels:
        return Labels(self.seed, np.array([s.weight for s in self.sources]), self._start_step * self.row,
                      self._start_counts)

    def _dataset(self):
        return _MixtureDataset(self.sources, self.layout, self.seed, max(1, self.num_workers), self.step,
                               self.counts()), self.num_workers

    def counts(self) -> np.ndarray:
        """Samples taken from each source over all DP ranks, up to the batches consumed (self.step)."""
        lab = self._labels
        target = self.step * self.row
        if target < lab.position:   # moved back (a rewind): walk again from the last loaded state
            lab = self._labels = self._fresh_labels()
        before = lab.counts.copy()
        if target > lab.position:
            lab.advance(target - lab.position)
        for s, src in enumerate(self.sources):
            old, new = before[s] // src.plan.epoch_len, lab.counts[s] // src.plan.epoch_len
            if new > old:
                self._notes.append(f"data source '{src.name}' ({src.path}): used all {src.plan.n} samples "
                                   f"{new - old} time(s) more; now in its epoch {new}")
        return lab.counts.copy()

    def take_notes(self) -> List[str]:
        """Messages for the run's log since the last call (source epochs begun)."""
        self.counts()
        notes, self._notes = self._notes, []
        return notes

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        inner = super().__iter__()
        try:
            for batch in inner:
                yield batch
        finally:
            inner.close()

    def state_dict(self) -> Dict[str, Any]:
        d = super().state_dict()
        counts = self.counts()
        d["sources"] = [{"name": s.name, "path": s.path, "num_samples": s.plan.n, "position": int(c),
                         "epoch": int(c // s.plan.epoch_len)} for s, c in zip(self.sources, counts)]
        return d

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        """Continue from a state_dict(): the global position, re-split over this layout, and every
        source's position. Position 0 is the start of the stream: every source at 0."""
        if d.get("source") != "mixture":
            raise ValueError(f"loader state: saved by a '{d.get('source')}' loader, this run reads a mixture "
                             "(data.sources); the data stream would differ, so resuming is refused")
        saved = {s["name"]: s for s in d.get("sources", [])}
        mine = {s.name: s for s in self.sources}
        if set(saved) != set(mine):
            raise ValueError(f"loader state: data.sources were {sorted(saved)} when saved, are {sorted(mine)} now; "
                             "a resume may change the weights, not the sources")
        for name, s in mine.items():
            if saved[name]["num_samples"] != s.plan.n:
                raise ValueError(f"loader state: data source '{name}' had {saved[name]['num_samples']} samples "
                                 f"when saved, {s.plan.n} now ({s.path}); resuming is refused")
        Loader.load_state_dict(self, {k: v for k, v in d.items() if k != "sources"})
        if int(d["position"]) == 0:
            counts = np.zeros(len(self.sources), np.int64)
        else:
            counts = np.array([saved[s.name]["position"] for s in self.sources], np.int64)
        self._start_step, self._start_counts = self.step, counts
        self._labels = self._fresh_labels()


def source_tokens(state: Dict[str, Any]) -> Dict[str, int]:
    """{"tokens/NAME": input tokens taken from NAME so far} from a mixture loader's state_dict()
    ({} for any other loader)."""
    if state.get("source") != "mixture":
        return {}
    return {f"tokens/{s['name']}": int(s["position"]) * int(state["seq_len"]) for s in state["sources"]}


def data_report(loader) -> Tuple[Dict[str, int], List[str]]:
    """(per-source token metrics, log messages) of a train loader after a step; empty for one source."""
    take = getattr(loader, "take_notes", None)
    notes = take() if take else []
    return source_tokens(loader.state_dict()), notes


def _val_folder(src) -> Optional[Tuple[str, str, str]]:
    """(key, folder, split) of a source's validation data, or None when it has none."""
    if src.val_path:
        m = _manifest("data.sources.val_path", src.val_path)
        return "val_path", src.val_path, "val" if "val" in m["splits"] else "train"
    m = _manifest("data.sources.path", src.path)
    return ("path", src.path, "val") if "val" in m["splits"] else None


def has_val_split(data) -> bool:
    """Whether some source of data.sources has validation data."""
    return any(_val_folder(s) is not None for s in data.sources)


def build_mixture_loader(run_cfg, split: str, layout: Layout) -> MixtureLoader:
    """The loader of data.sources for `split` on `layout` (checked by the caller)."""
    d, t = run_cfg.data, run_cfg.train
    picked = []
    for i, src in enumerate(d.sources):
        if split == "train":
            picked.append((i, src, "path", src.path, "train"))
            continue
        where = _val_folder(src)
        if where is None:
            log.info("data.sources[%d] (%s) has no validation data: left out of validation", i, src.path)
        else:
            picked.append((i, src, *where))
    if not picked:
        raise ValueError("data.sources: no source has validation data (a 'val' split or a val_path)")
    shuffle = d.shuffle and split == "train"
    one = Layout(0, 1, 0, 1, 1, t.seq_len)  # a source plan: its samples one at a time, all of them per epoch
    window = max(1, d.shuffle_buffer) if shuffle else ASSIGN_BLOCK
    sources, first = [], None
    for i, src, field, folder, split_name in picked:
        key = f"data.sources[{i}].{field}"
        m = _manifest(key, folder)
        if split_name not in m["splits"]:
            raise ValueError(f"{key}: {folder} has no '{split_name}' split")
        name = source_name(src)
        tok = m["tokenizer"]
        if first is None:
            first = (name, folder, tok, m["seq_len"])
        elif m["seq_len"] != first[3]:
            raise ValueError(f"data.sources: '{first[0]}' ({first[1]}) has seq_len {first[3]}, '{name}' ({folder}) "
                             f"has {m['seq_len']}; a mixture's sources must share one seq_len")
        elif (tok.get("sha256"), tok.get("vocab_size")) != (first[2].get("sha256"), first[2].get("vocab_size")):
            raise ValueError(f"data.sources: '{first[0]}' ({first[1]}) and '{name}' ({folder}) were prepared with "
                             f"different tokenizers ({first[2].get('kind')} {first[2].get('sha256', '')[:12]}, "
                             f"vocab {first[2].get('vocab_size')} vs {tok.get('kind')} {tok.get('sha256', '')[:12]}, "
                             f"vocab {tok.get('vocab_size')}); a mixture needs one tokenizer")
        if m["seq_len"] != t.seq_len:
            raise ValueError(f"train.seq_len={t.seq_len} differs from the seq_len {m['seq_len']} of "
                             f"data source '{name}' ({key}={folder})")
        vocab = run_cfg.model.vocab_size
        if vocab and vocab < tok["vocab_size"]:
            raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tok['vocab_size']} ({key}={folder})")
        shards = [(s["name"], s["samples"], s["sha256"]) for s in m["splits"][split_name]["shards"]]
        # Its own shuffle seed: two sources never share an order by construction.
        seed = int(np.random.SeedSequence([t.seed, MIX_TAG, i]).generate_state(1)[0])
        plan = Plan(m["_dir"], shards, one, 1, seed, shuffle, window, d.skip_bad_shards, tok["pad_id"], m["dtype"], 1)
        if plan.n < 1:
            raise ValueError(f"{key}: {folder} has no '{split_name}' samples")
        sources.append(Source(name, folder, src.weight, plan))
    G = t.global_batch_size if split == "train" else layout.dp_size * layout.batch_size
    fingerprint = {"global_batch": G, "shuffle": shuffle, "window": window}
    return MixtureLoader(sources, layout, t.seed, d.num_workers, fingerprint, ignore_signals=ignored_signals(run_cfg))
