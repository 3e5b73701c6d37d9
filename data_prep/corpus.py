"""Corpora -> an ordered list of work units ("tasks") -> documents.

A document is one text: a whole .txt/.md/.py file, one line of a .jsonl (its `text` field), or
one row of a .parquet (its `text` column); `.gz` works for the line- and file-based kinds.
Inputs are files, folders (searched recursively) and globs; the file list is sorted, so the same
inputs give the same documents in the same order. Big plain .jsonl files are cut into byte
ranges and .parquet files into row groups, so that workers share one big file.

A file that cannot be read or decoded is counted and reported (`bad`), never fatal.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

TEXT_EXTS = (".txt", ".md", ".py")
JSONL_EXTS = (".jsonl",)
PARQUET_EXTS = (".parquet",)
CORPORA = ("python-stdlib",)
RANGE_BYTES = 4 << 20           # split plain .jsonl files into ranges of this size
TASK_BYTES = 1 << 20            # group small files into tasks of about this size (the unit of
                                # parallelism and of resume)


@dataclass
class Piece:
    """A file or part of one: byte range [start, end) for .jsonl, row group for .parquet."""

    path: str
    kind: str                   # text | jsonl | parquet
    start: int = 0
    end: int = -1               # -1: to the end of the file
    size: int = 0               # bytes this piece stands for (for progress and --max-bytes)
    key: str = ""               # path relative to the inputs' common folder: the split's hash key


@dataclass
class Task:
    pieces: List[Piece] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


def _kind(path: str) -> Optional[str]:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(TEXT_EXTS):
        return "text"
    if name.endswith(JSONL_EXTS):
        return "jsonl"
    if name.endswith(PARQUET_EXTS) and not path.endswith(".gz"):
        return "parquet"
    return None


def stdlib_files() -> List[str]:
    """The running interpreter's standard-library .py files (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def find_files(inputs: Sequence[str]) -> List[str]:
    """Expand files, folders and globs into a sorted list of supported files.

    An input that matches nothing is a ValueError naming it (a typo should not give an empty
    corpus silently); unsupported files inside folders are ignored.
    """
    files = set()
    for inp in inputs:
        matches = sorted(glob.glob(inp, recursive=True)) if glob.has_magic(inp) else [inp]
        found = False
        for m in matches:
            if os.path.isdir(m):
                for dirpath, _, filenames in os.walk(m):
                    for f in filenames:
                        p = os.path.join(dirpath, f)
                        if _kind(p):
                            files.add(os.path.abspath(p))
                            found = True
            elif os.path.exists(m):
                if not _kind(m):
                    raise ValueError(f"--input {m}: unsupported file type (use .txt .md .py .jsonl .parquet, or .gz)")
                files.add(os.path.abspath(m))
                found = True
        if not found:
            raise ValueError(f"--input {inp}: matches no supported file")
    return sorted(files)


def _parquet_groups(path: str) -> List[Tuple[int, int]]:
    import pyarrow.parquet as pq
    md = pq.ParquetFile(path).metadata
    return [(i, md.row_group(i).total_byte_size) for i in range(md.num_row_groups)]


def make_tasks(files: Sequence[str], max_bytes: int = 0) -> Tuple[List[Task], List[Dict[str, str]]]:
    """Cut files into ordered tasks; stop once `max_bytes` (0: no cap) of input is covered.

    Returns (tasks, bad) where bad lists files that could not even be inspected.
    """
    pieces: List[Piece] = []
    bad: List[Dict[str, str]] = []
    total = 0
    # Relative paths keep the train/val split independent of where the corpus lives, and
    # distinguish same-named files (the stdlib has hundreds of __init__.py).
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0]) if files else ""
    for path in files:
        if max_bytes and total >= max_bytes:
            break
        kind = _kind(path)
        try:
            size = os.path.getsize(path)
            if kind == "jsonl" and not path.endswith(".gz") and size > RANGE_BYTES:
                new = [Piece(path, kind, s, min(s + RANGE_BYTES, size), min(RANGE_BYTES, size - s))
                       for s in range(0, size, RANGE_BYTES)]
            elif kind == "parquet":
                new = [Piece(path, kind, g, g + 1, b) for g, b in _parquet_groups(path)]
            else:
                new = [Piece(path, kind, 0, -1, size)]
        except Exception as e:
            bad.append({"path": path, "error": f"{type(e).__name__}: {e}"})
            continue
        for p in new:
            p.key = os.path.relpath(path, root)
            if max_bytes and total >= max_bytes:
                break
            if max_bytes and p.kind == "jsonl" and not path.endswith(".gz") and total + p.size > max_bytes:
                # A byte range can be cut exactly; whole files and row groups cannot.
                p.end = p.start + (max_bytes - total)
                p.size = p.end - p.start
            pieces.append(p)
            total += p.size
    tasks: List[Task] = []
    for p in pieces:
        if not tasks or tasks[-1].size + p.size > TASK_BYTES or p.size > TASK_BYTES // 2:
            tasks.append(Task())
        tasks[-1].pieces.append(p)
    return tasks, bad


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, "r", encoding="utf-8")


def _jsonl_lines(piece: Piece) -> Iterator[bytes]:
    """Lines whose first byte lies in [start, end): every line belongs to exactly one range."""
    if piece.path.endswith(".gz"):
        with gzip.open(piece.path, "rb") as f:
            yield from f
        return
    with open(piece.path, "rb") as f:
        end = piece.end if piece.end >= 0 else float("inf")
        if piece.start > 0:
            f.seek(piece.start - 1)
            f.readline()        # finish the line that straddles start (it belongs to the range before)
        while f.tell() < end:
            line = f.readline()
            if not line:
                break
            yield line


def read_piece(piece: Piece, text_field: str = "text") -> Tuple[List[str], Dict[str, int], List[Dict[str, str]]]:
    """Documents of one piece, plus counts {bytes, bad_records} and bad-file records."""
    stats = {"bytes": 0, "bad_records": 0}
    docs: List[str] = []
    try:
        if piece.kind == "text":
            with _open_text(piece.path) as f:
                text = f.read()
            docs.append(text)
            stats["bytes"] += piece.size
        elif piece.kind == "jsonl":
            for line in _jsonl_lines(piece):
                stats["bytes"] += len(line)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                    if not isinstance(text, str):
                        raise TypeError(f"field '{text_field}' is not a string")
                    docs.append(text)
                except Exception:
                    stats["bad_records"] += 1
        else:
            import pyarrow.parquet as pq
            table = pq.ParquetFile(piece.path).read_row_group(piece.start, columns=[text_field])
            for text in table.column(text_field).to_pylist():
                if isinstance(text, str):
                    docs.append(text)
                else:
                    stats["bad_records"] += 1
            stats["bytes"] += piece.size
    except Exception as e:
        # Unreadable, undecodable, not gzip, no such column: count the whole piece as bad.
        return [], stats, [{"path": piece.path, "error": f"{type(e).__name__}: {str(e)[:200]}"}]
    return docs, stats, []


def is_val(seed: int, piece: Piece, index: int, fraction: float) -> bool:
    """Train/validation split by document: a stable hash of (seed, file, range, index)."""
    if fraction <= 0:
        return False
    key = f"{seed}\0{piece.key}\0{piece.start}\0{index}".encode()
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return h / 2.0 ** 64 < fraction
