"""manifest.json of a prep folder: what the shards are, what made them, how to check them.

    {
      "format": "llm_lru.shards/1",
      "command": "llm-lru prep ...",          # as typed
      "config": {...},                         # what determines the bytes (workers excluded)
      "seq_len": L,                            # each sample holds L + 1 tokens
      "dtype": "uint16" | "uint32",            # token dtype inside tokens.npy
      "tokenizer": {"file": "tokenizer.json", "kind", "sha256", "vocab_size",
                    "eos_id", "bos_id", "pad_id", "eos_token", "pad_token"},
      "splits": {"train": {"shards": [{"name", "samples", "tokens", "documents", "bytes",
                                       "sha256"}, ...], "samples", "tokens", "documents"},
                 "val": {...}},               # val only with --val-fraction > 0
      "stats": {"files", "bytes", "documents", "empty_documents", "bad_files": [{path, error}],
                "bad_records", "dropped_tokens"}
    }

Each shard sample (key = 9-digit index within its split) holds `tokens.npy` (L + 1 tokens) and
`starts.npy` (int32 positions in 0..L where a document's first token sits).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Union

FORMAT = "llm_lru.shards/1"
MANIFEST = "manifest.json"


def read_manifest(path: Union[str, Path]) -> Dict[str, Any]:
    """Load DIR/manifest.json (or the file itself); adds `_dir`, the folder, to the dict."""
    p = Path(path)
    file = p / MANIFEST if p.is_dir() or not p.suffix else p
    if not file.is_file():
        raise ValueError(f"{file}: no manifest (not a prep output folder, or prep did not finish)")
    try:
        m = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from None
    if m.get("format") != FORMAT:
        raise ValueError(f"{file}: format '{m.get('format')}' is not {FORMAT}")
    m["_dir"] = str(file.parent)
    return m


def write_json_atomic(path: Union[str, Path], obj: Dict[str, Any]) -> None:
    """Write JSON through a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: v for k, v in obj.items() if not k.startswith("_")}, indent=1))
    os.replace(tmp, path)
