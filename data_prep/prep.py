"""Corpus -> tokenizer -> documents packed into fixed-length samples -> WebDataset shards.

Pipeline: tasks (corpus.py) are read and tokenized by a pool of worker processes; results come
back in task order (`imap`), so the single packer in the main process sees the same documents in
the same order whatever the worker count, and the shards are byte-identical for the same inputs
and seed. Shard writes (tar + sha256, the costly part at short seq_len) go to the same pool.
Documents are joined as `doc EOS doc EOS ...` and cut into non-overlapping samples of
seq_len + 1 tokens; a trailing remainder shorter than a sample is dropped (and counted).
Documents go to the val split by a stable hash at `val_fraction`; when that picks none (a tiny
corpus), the last train sample becomes the val split, so val_fraction > 0 always yields one.

Resume: after a task that completed a shard (at most every SAVE_EVERY_S), the samples not yet in
a finished shard go to `.prep_pending-N.npz` and the position to `.prep_state.json`; a rerun of
the same command starts at the next task and keeps the finished shards (checked by sha256).
Shards written after the last save are written again, identically.

Interruption: SIGTERM (SLURM, a node shutdown, `kill`) stops a prep as Ctrl-C does, in the main
process: the pool is terminated, unfinished `*.tmp` shard files are removed, and the resume state
stays (a first one is written before any shard). A shard only gets its name by a rename after
its last byte, and the manifest, written last, is what makes the folder readable: an interrupted
folder never looks complete. Pool workers ignore SIGINT and SIGTERM: the main process decides.
"""
from __future__ import annotations

import io
import itertools
import json
import multiprocessing as mp
import os
import shlex
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from llm_lru.data_prep import corpus
from llm_lru.data_prep.manifest import FORMAT, MANIFEST, read_manifest, write_json_atomic
from llm_lru.data_prep.tokenizer import (LoadedTokenizer, from_path, load_tokenizer, make_tokenizer,
                                         save_tokenizer, sha256_file)

STATE = ".prep_state.json"
SAVE_EVERY_S = 10.0     # resume state at most this often (it holds up to a few shards of samples)
SPLITS = ("train", "val")


@dataclass
class PrepConfig:
    """Everything that determines the output bytes (worker count does not)."""

    inputs: List[str] = field(default_factory=list)   # resolved, sorted files
    corpus: str = ""
    tokenizer: str = "bytes"
    tokenizer_sha256: str = ""                          # of a user-supplied tokenizer.json
    eos_token: str = ""
    seq_len: int = 2048
    shard_size: int = 1000
    val_fraction: float = 0.0
    seed: int = 0
    max_bytes: int = 0
    text_field: str = "text"
    bpe_train_bytes: int = 256 << 20


def shard_name(split: str, index: int) -> str:
    return f"shard-{index:06d}.tar" if split == "train" else f"val-{index:06d}.tar"


_NPY_HEADERS: Dict[Tuple[str, int], bytes] = {}


def _npy(a: np.ndarray) -> bytes:
    """np.save bytes of a 1-D array; the header is cached per (dtype, length): writing it was a
    third of prep's time at short seq_len."""
    key = (a.dtype.str, len(a))
    if key not in _NPY_HEADERS:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        _NPY_HEADERS[key] = buf.getvalue()[: len(buf.getvalue()) - a.nbytes]
    return _NPY_HEADERS[key] + a.tobytes()


def write_shard(path: Path, first_index: int, tokens: np.ndarray, starts: List[np.ndarray]) -> None:
    """Write one tar of samples (tokens: (S, L+1)) with webdataset's TarWriter, atomically.

    mtime, owner and mode are fixed so that the bytes depend on the content only.
    """
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as w:
        for i in range(len(tokens)):
            w.write({"__key__": f"{first_index + i:09d}", "tokens.npy": _npy(tokens[i]),
                     "starts.npy": _npy(starts[i].astype(np.int32))})
    os.replace(tmp, path)


class Packer:
    """Joins documents with EOS and cuts samples of n = seq_len + 1 tokens."""

    def __init__(self, seq_len: int, eos_id: int, dtype: np.dtype):
        self.n, self.eos, self.dtype = seq_len + 1, eos_id, dtype
        self.tokens = np.empty(0, dtype)      # pending, shorter than one sample
        self.starts = np.empty(0, bool)

    def add(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Append one document; return the completed samples (S, n) and their start masks."""
        doc_starts = np.zeros(len(ids) + 1, bool)
        doc_starts[0] = True
        toks = np.concatenate([self.tokens, ids.astype(self.dtype), np.array([self.eos], self.dtype)])
        sts = np.concatenate([self.starts, doc_starts])
        k = len(toks) // self.n
        self.tokens, self.starts = toks[k * self.n:], sts[k * self.n:]
        return toks[: k * self.n].reshape(k, self.n), sts[: k * self.n].reshape(k, self.n)


def _write_job(path: str, first_index: int, toks: np.ndarray, sts: np.ndarray) -> Dict[str, Any]:
    """Write one shard and return its manifest record (runs in a worker when there is a pool)."""
    p = Path(path)
    write_shard(p, first_index, toks, [np.flatnonzero(s) for s in sts])
    return {"name": p.name, "samples": int(len(toks)), "tokens": int(toks.size),
            "documents": int(sts.sum()), "bytes": p.stat().st_size, "sha256": sha256_file(p)}


class _Done:
    """A finished future, for writes done in-process."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


class SplitWriter:
    """Collects samples of one split and writes a shard every `shard_size` samples.

    Writes (tar + sha256, the costly part of packing) go to `submit` - the worker pool when
    there is one - and at most `max_inflight` are outstanding; records are kept in shard order.
    """

    def __init__(self, out: Path, split: str, shard_size: int, seq_len: int, dtype: np.dtype,
                 submit=None, max_inflight: int = 2):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.submit = submit or (lambda fn, args: _Done(fn(*args)))
        self.max_inflight = max_inflight
        # Pending samples as a list of blocks: concatenating per document would copy a whole
        # shard's worth of tokens for every small document.
        self._tok: List[np.ndarray] = [np.empty((0, seq_len + 1), dtype)]
        self._st: List[np.ndarray] = [np.empty((0, seq_len + 1), bool)]
        self.pending = 0
        self.inflight: "deque[Tuple[np.ndarray, np.ndarray, Any]]" = deque()
        self.shards: List[Dict[str, Any]] = []     # finished, in order
        self.assigned = 0                          # shards handed to submit
        self.next_index = 0                        # samples handed to submit

    def _blocks(self) -> Tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self._tok), np.concatenate(self._st)

    def unwritten(self) -> Tuple[np.ndarray, np.ndarray]:
        """Samples not yet in a finished shard (in-flight shards, then pending): resume state."""
        toks, sts = self._blocks()
        return (np.concatenate([t for t, _, _ in self.inflight] + [toks]),
                np.concatenate([s for _, s, _ in self.inflight] + [sts]))

    def restore(self, tokens: np.ndarray, starts: np.ndarray, shards: List[Dict[str, Any]]) -> None:
        self._tok, self._st, self.pending = [tokens], [starts], len(tokens)
        self.shards = list(shards)
        self.assigned = len(shards)
        self.next_index = sum(s["samples"] for s in shards)

    def add(self, tokens: np.ndarray, starts: np.ndarray) -> int:
        """Queue samples; hand out full shards. Returns the number of shards handed out."""
        if len(tokens):
            self._tok.append(tokens)
            self._st.append(starts)
            self.pending += len(tokens)
        n = 0
        # Strictly more than a shard: the last sample stays pending until flush, so that
        # `take_last` can always move one (the bytes of every shard are unchanged).
        if self.pending > self.shard_size:
            toks, sts = self._blocks()
            while len(toks) > self.shard_size:
                self._write(toks[: self.shard_size], sts[: self.shard_size])
                toks, sts = toks[self.shard_size:], sts[self.shard_size:]
                n += 1
            self._tok, self._st, self.pending = [toks], [sts], len(toks)
        self.collect()
        return n

    def take_last(self) -> Tuple[np.ndarray, np.ndarray]:
        """Remove and return the last pending sample ((1, L+1) tokens and starts)."""
        toks, sts = self._blocks()
        self._tok, self._st, self.pending = [toks[:-1]], [sts[:-1]], len(toks) - 1
        return toks[-1:], sts[-1:]

    def flush(self) -> None:
        """Hand out the last, partial shard and wait for every write."""
        if self.pending:
            toks, sts = self._blocks()
            self._write(toks, sts)
            self._tok, self._st, self.pending = [toks[:0]], [sts[:0]], 0
        self.collect(wait=True)

    def collect(self, wait: bool = False) -> None:
        """Move finished writes (in order) to `shards`; block while too many are outstanding."""
        while self.inflight and (wait or self.inflight[0][2].ready() or len(self.inflight) > self.max_inflight):
            self.shards.append(self.inflight.popleft()[2].get())

    def _write(self, toks: np.ndarray, sts: np.ndarray) -> None:
        path = self.out / shard_name(self.split, self.assigned)
        fut = self.submit(_write_job, (str(path), self.next_index, toks, sts))
        self.inflight.append((toks, sts, fut))
        self.assigned += 1
        self.next_index += len(toks)


# ---- worker side: read and tokenize one task -----------------------------------------------
_TOK: Optional[LoadedTokenizer] = None
_BYTES = False


def _init_worker(tokenizer_file: str, kind: str) -> None:
    global _TOK, _BYTES
    if mp.parent_process() is not None:
        # A pool worker ignores Ctrl-C and SIGTERM: the main process decides (and ends the pool with
        # SIGKILL, _stop_pool). A worker killed by a signal while it waits for a task holds the
        # pool's queue lock for good, and Pool.terminate() then waits for that lock forever.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK = from_path(tokenizer_file)
    _BYTES = kind == "bytes"


def _encode(texts: List[str]) -> List[np.ndarray]:
    if _BYTES:
        # The bytes tokenizer maps byte b to id b: skip HF for speed (a test checks equality).
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    return [np.asarray(ids, np.uint32) for ids in _TOK.encode_batch(texts)]


def _work(job: Tuple[int, corpus.Task, str, int, float]):
    """Read + tokenize one task: (index, [(is_val, ids), ...], stats, bad)."""
    index, task, text_field, seed, val_fraction = job
    out: List[Tuple[bool, np.ndarray]] = []
    stats = {"bytes": 0, "bad_records": 0, "empty_documents": 0}
    bad: List[Dict[str, str]] = []
    for piece in task.pieces:
        docs, st, b = corpus.read_piece(piece, text_field)
        stats["bytes"] += st["bytes"]
        stats["bad_records"] += st["bad_records"]
        bad += b
        keep = [(i, d) for i, d in enumerate(docs) if d]
        stats["empty_documents"] += len(docs) - len(keep)
        for (i, _), ids in zip(keep, _encode([d for _, d in keep])):
            out.append((corpus.is_val(seed, piece, i, val_fraction), ids))
    return index, out, stats, bad


# ---- main side ------------------------------------------------------------------------------
def _check_out_dir(out: Path, cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Refuse a folder made by a different command; return the resume state, if any."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if (out / MANIFEST).exists():
        m = read_manifest(out)
        if m.get("config") != cfg:
            raise ValueError(f"--out {out}: holds shards made by a different command "
                             f"('{m.get('command')}'); choose another folder or delete it")
        return {"done": True}
    if (out / STATE).exists():
        st = json.loads((out / STATE).read_text())
        if st.get("config") != cfg:
            raise ValueError(f"--out {out}: holds an unfinished prep of a different command "
                             f"('{st.get('command')}'); choose another folder or delete it")
        return st
    if any(out.iterdir()):
        raise ValueError(f"--out {out}: exists, is not empty and is not a prep folder; nothing written")
    return None


def _bpe_texts(tasks: Sequence[corpus.Task], cfg: PrepConfig) -> Iterator[str]:
    """Training texts for bpe:N: train-split documents up to bpe_train_bytes."""
    seen = 0
    for task in tasks:
        for piece in task.pieces:
            docs, _, _ = corpus.read_piece(piece, cfg.text_field)
            for i, d in enumerate(docs):
                if d and not corpus.is_val(cfg.seed, piece, i, cfg.val_fraction):
                    yield d
                    seen += len(d)
                    if seen >= cfg.bpe_train_bytes:
                        return


def run_prep(cfg: PrepConfig, out: str | Path, workers: int = 1, command: str = "",
             progress: bool = True) -> Dict[str, Any]:
    """Run (or resume) a prep into `out`; returns the manifest. See the module docstring."""
    out = Path(out)
    if cfg.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {cfg.seq_len}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    files = corpus.stdlib_files() if cfg.corpus == "python-stdlib" else corpus.find_files(cfg.inputs)
    if cfg.corpus:
        cfg.inputs = []
    else:
        cfg.inputs = files
    if cfg.tokenizer != "bytes" and not cfg.tokenizer.startswith("bpe:"):
        tfile = Path(cfg.tokenizer) / "tokenizer.json" if Path(cfg.tokenizer).is_dir() else Path(cfg.tokenizer)
        if not tfile.is_file():
            raise ValueError(f"--tokenizer {cfg.tokenizer}: not bytes, bpe:N or an existing tokenizer.json / folder")
        cfg.tokenizer_sha256 = sha256_file(tfile)
    conf = asdict(cfg)
    state = _check_out_dir(out, conf)
    if state and state.get("done"):
        return read_manifest(out)
    tasks, bad_files = corpus.make_tasks(files, cfg.max_bytes)
    if not tasks:
        raise ValueError("empty corpus: the inputs hold no readable documents"
                         + (f" ({len(bad_files)} bad files, e.g. {bad_files[0]['path']})" if bad_files else ""))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _sigterm_as_interrupt():
            return _run(cfg, conf, out, tasks, bad_files, state, workers, command, progress)
    except BaseException:
        for tmp in out.glob("*.tmp"):   # a shard or state file cut off mid-write
            tmp.unlink(missing_ok=True)
        if created and not any(out.glob("*.tar")):
            # Nothing worth resuming: leave no half-made folder behind.
            for p in out.iterdir():
                p.unlink()
            out.rmdir()
        raise


class _sigterm_as_interrupt:
    """Within: SIGTERM raises KeyboardInterrupt in the main thread, so that the cleanup that Ctrl-C
    gets (pool terminated, partial files removed) also runs for SLURM's or a shutdown's SIGTERM."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def _run(cfg: PrepConfig, conf: Dict[str, Any], out: Path, tasks: List[corpus.Task],
         bad_files: List[Dict[str, str]], state: Optional[Dict[str, Any]], workers: int,
         command: str, progress: bool) -> Dict[str, Any]:
    if state:
        tok = load_tokenizer({"_dir": str(out), "tokenizer": state["tokenizer"]})
        tok_rec = state["tokenizer"]
    else:
        texts = _bpe_texts(tasks, cfg) if cfg.tokenizer.startswith("bpe:") else None
        tok = make_tokenizer(cfg.tokenizer, texts, eos_token=cfg.eos_token or None)
        tok_rec = save_tokenizer(tok, out)
    dtype = np.dtype("<u2" if tok.vocab_size <= 1 << 16 else "<u4")   # little-endian on disk, any host
    packers = {s: Packer(cfg.seq_len, tok.eos_id, dtype) for s in SPLITS}
    writers = {s: SplitWriter(out, s, cfg.shard_size, cfg.seq_len, dtype) for s in SPLITS}
    stats = {"files": len({p.path for t in tasks for p in t.pieces}), "bytes": 0, "documents": 0,
             "empty_documents": 0, "bad_records": 0, "bad_files": list(bad_files)}
    start = 0
    if state:
        start = state["next_task"]
        stats = state["stats"]
        pend = np.load(out / state["pending"])
        for s in SPLITS:
            for rec in state["shards"][s]:
                if not (out / rec["name"]).is_file() or sha256_file(out / rec["name"]) != rec["sha256"]:
                    raise ValueError(f"{out / rec['name']}: finished shard is missing or changed since the "
                                     f"interrupted run; delete {out} and run again")
            packers[s].tokens, packers[s].starts = pend[f"{s}_ptok"], pend[f"{s}_pst"]
            writers[s].restore(pend[f"{s}_wtok"], pend[f"{s}_wst"], state["shards"][s])
    jobs = ((i, tasks[i], cfg.text_field, cfg.seed, cfg.val_fraction) for i in range(start, len(tasks)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(t.size for t in tasks), initial=sum(t.size for t in tasks[:start]),
                   unit="B", unit_scale=True, desc="prep", file=sys.stderr)
    tok_file = str(out / "tokenizer.json")
    pool = None
    if workers > 1:
        # fork: workers start in milliseconds; they read and tokenize tasks and write shards.
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok_file, tok.kind))
        results = _bounded_imap(pool, _work, jobs, 2 * workers)
        for w in writers.values():
            w.submit, w.max_inflight = pool.apply_async, workers
    else:
        _init_worker(tok_file, tok.kind)
        results = map(_work, jobs)
    pending_n = state["pending_n"] + 1 if state else 0
    if not state:
        # A first resume state before any shard: an interrupted folder is this command's own
        # unfinished prep (a rerun continues it), never an unknown non-empty folder.
        _save_state(out, conf, command, tok_rec, 0, stats, packers, writers, pending_n)
        pending_n += 1
    saved_shards = sum(len(w.shards) for w in writers.values())
    last_save = time.monotonic()
    try:
        for index, docs, st, bad in results:
            for is_val, ids in docs:
                split = "val" if is_val else "train"
                writers[split].add(*packers[split].add(ids))
            stats["documents"] += len(docs)
            for k in ("bytes", "bad_records", "empty_documents"):
                stats[k] += st[k]
            stats["bad_files"] += bad
            if bar:
                bar.update(tasks[index].size)
            finished = sum(len(w.shards) for w in writers.values())
            if index + 1 < len(tasks) and finished > saved_shards and time.monotonic() - last_save > SAVE_EVERY_S:
                _save_state(out, conf, command, tok_rec, index + 1, stats, packers, writers, pending_n)
                pending_n, saved_shards, last_save = pending_n + 1, finished, time.monotonic()
        if cfg.val_fraction > 0 and writers["val"].next_index + writers["val"].pending == 0 \
                and writers["train"].next_index + writers["train"].pending > 1:
            # Too few documents for the hash to pick one: the last train sample becomes the val split.
            writers["val"].add(*writers["train"].take_last())
        for w in writers.values():
            w.flush()
    finally:
        if pool:
            _stop_pool(pool)
        if bar:
            bar.close()
    return _finish(cfg, conf, out, command, tok_rec, dtype, stats, packers, writers)


def _stop_pool(pool) -> None:
    """Pool.terminate(), whose per-worker SIGTERM the workers ignore: SIGKILL them instead."""
    for worker in pool._pool:       # multiprocessing's list of the pool's processes
        worker.terminate = worker.kill
    pool.terminate()


def _bounded_imap(pool, fn, jobs, depth: int):
    """pool.imap in order, with at most `depth` jobs outstanding: Pool.imap queues every job at
    once, and results would pile up in memory whenever packing is slower than tokenizing."""
    jobs = iter(jobs)
    q = deque(pool.apply_async(fn, (j,)) for j in itertools.islice(jobs, depth))
    while q:
        r = q.popleft().get()
        for j in itertools.islice(jobs, 1):
            q.append(pool.apply_async(fn, (j,)))
        yield r


def _save_state(out, conf, command, tok_rec, next_task, stats, packers, writers, n) -> None:
    name = f".prep_pending-{n:06d}.npz"
    arrays = {}
    for s in SPLITS:
        wtok, wst = writers[s].unwritten()
        arrays.update({f"{s}_ptok": packers[s].tokens, f"{s}_pst": packers[s].starts,
                       f"{s}_wtok": wtok, f"{s}_wst": wst})
    tmp = out / (name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, out / name)
    write_json_atomic(out / STATE, {"config": conf, "command": command, "tokenizer": tok_rec,
                                    "next_task": next_task, "stats": stats, "pending": name,
                                    "pending_n": n, "shards": {s: writers[s].shards for s in SPLITS}})
    for old in out.glob(".prep_pending-*.npz"):
        if old.name != name:
            old.unlink()


def _finish(cfg, conf, out, command, tok_rec, dtype, stats, packers, writers) -> Dict[str, Any]:
    if stats["documents"] == 0:
        raise ValueError(f"empty corpus: no documents could be read ({len(stats['bad_files'])} bad files, "
                         f"{stats['bad_records']} bad records, {stats['empty_documents']} empty documents)")
    if not writers["train"].shards:
        raise ValueError(f"corpus too small: {sum(len(p.tokens) for p in packers.values())} tokens make "
                         f"no sample of --seq-len {cfg.seq_len} + 1 tokens")
    stats["dropped_tokens"] = int(sum(len(p.tokens) for p in packers.values()))
    splits = {}
    for s in SPLITS:
        sh = writers[s].shards
        if sh or s == "train":
            splits[s] = {"shards": sh, "samples": sum(x["samples"] for x in sh),
                         "tokens": sum(x["tokens"] for x in sh), "documents": sum(x["documents"] for x in sh)}
    manifest = {"format": FORMAT, "command": command, "config": conf, "seq_len": cfg.seq_len,
                "dtype": dtype.name, "tokenizer": tok_rec, "splits": splits, "stats": stats}
    write_json_atomic(out / MANIFEST, manifest)
    for p in list(out.glob(".prep_pending-*.npz")) + [out / STATE]:
        if p.exists():
            p.unlink()
    return read_manifest(out)


def verify(path: str | Path) -> List[str]:
    """Check every shard of a prep folder against its manifest; return the problems found.

    Checks size, sha256, tar structure and sample count of each shard, and the tokenizer hash.
    """
    from llm_lru.data_prep.shards import read_samples

    m = read_manifest(path)
    base = Path(m["_dir"])
    problems = []
    tfile = base / m["tokenizer"]["file"]
    if not tfile.is_file() or sha256_file(tfile) != m["tokenizer"]["sha256"]:
        problems.append(f"{tfile}: missing or sha256 differs from the manifest")
    for split, rec in m["splits"].items():
        for sh in rec["shards"]:
            p = base / sh["name"]
            if not p.is_file():
                problems.append(f"{p}: missing")
                continue
            if sha256_file(p) != sh["sha256"]:
                problems.append(f"{p}: sha256 differs from the manifest")
                continue
            try:
                n = sum(1 for _ in read_samples(str(p), m["seq_len"], dtype=m["dtype"]))
                if n != sh["samples"]:
                    problems.append(f"{p}: {n} samples, manifest says {sh['samples']}")
            except ValueError as e:
                problems.append(str(e))
    return problems


def command_line(argv: Sequence[str]) -> str:
    return "llm-lru prep " + shlex.join(list(argv))
