"""What `llm-lru eval` reads: a run dir, a trainer checkpoint, or an exported (HF-format) folder.

    target = load_target(path, tokenizer=None)   # -> EvalTarget(model, tokenizer, cfg, ...)

Checkpoints go through the export issue's resolver (llm_lru.export.source: run layout, ZeRO
consolidation, key matching); an export folder (config.json with model_type llm_lru) through its
llm_lru.export.load.load_hybrid. Either way the suites drive a HybridLM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from llm_lru.config import RunConfig


@dataclass
class EvalTarget:
    """A model ready for eval: HybridLM in eval mode, its tokenizer (or None), the run config
    (None for an export, which carries only the model config) and where it came from."""
    model: Any
    tokenizer: Any = None
    cfg: Optional[RunConfig] = None
    source: str = ""
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def train_len(self) -> int:
        """The training sequence length (0 when unknown, e.g. an export)."""
        if self.cfg is not None:
            return int(self.cfg.train.seq_len)
        return int(self.info.get("train_seq_len", 0))


def resolve_tokenizer(spec: Optional[str]):
    """`bytes`, `bpe:N` is refused (needs training text), a tokenizer.json / prep folder path."""
    if not spec:
        return None
    from llm_lru.data_prep.tokenizer import from_path, load_tokenizer, make_tokenizer

    if spec == "bytes":
        return make_tokenizer("bytes")
    p = Path(spec)
    if p.is_dir() and (p / "manifest.json").is_file():
        return load_tokenizer(p)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return from_path(p / "tokenizer.json")
    if p.is_file():
        return from_path(p)
    raise ValueError(f"--tokenizer {spec}: not 'bytes', a prep folder, a folder with tokenizer.json or a tokenizer file")


def is_export_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "llm_lru"
    except ValueError:
        return False


def load_export(path: Path, tokenizer: Optional[str] = None) -> EvalTarget:
    """An exported folder, through the export issue's loader (transformers checks the weights;
    the weights land in this package's HybridLM)."""
    from llm_lru.export.load import load_hybrid

    model = load_hybrid(path, torch.float32)
    tok = resolve_tokenizer(tokenizer) if tokenizer else None
    if tok is None and (path / "tokenizer.json").is_file():
        tok = resolve_tokenizer(str(path / "tokenizer.json"))
    # The exporter records the training run (seq_len among it) in llm_lru_export.json.
    meta_file = path / "llm_lru_export.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    info = {"kind": "export", "train_seq_len": int(meta.get("training", {}).get("seq_len", 0) or 0)}
    return EvalTarget(model, tok, None, str(path), info)


def load_checkpoint(path: Path, tokenizer: Optional[str] = None) -> EvalTarget:
    """A run dir / trainer checkpoint / DeepSpeed folder: consolidate fp32 weights into a HybridLM."""
    from llm_lru.export.source import consolidate, match_keys, resolve_source
    from llm_lru.models import HybridLM

    src = resolve_source(path)
    model = HybridLM(src.config.model)
    sd = match_keys(consolidate(src), model.state_dict().keys(), str(src.ds_dir))
    # Tied embeddings: the head and embedding share one tensor; loading both is harmless.
    model.load_state_dict(sd)
    model.eval()
    tok = resolve_tokenizer(tokenizer) if tokenizer else None
    if tok is None:
        from llm_lru.export.exporter import find_tokenizer

        tok = find_tokenizer(src)
    info = {"kind": "checkpoint", "checkpoint": str(src.checkpoint or src.ds_dir), "step": src.meta.get("step")}
    return EvalTarget(model, tok, src.config, str(path), info)


def load_target(path: str | Path, tokenizer: Optional[str] = None) -> EvalTarget:
    """Load RUN_DIR | CHECKPOINT | EXPORT_DIR for evaluation (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such run dir, checkpoint or export folder")
    if is_export_dir(p):
        return load_export(p, tokenizer)
    return load_checkpoint(p, tokenizer)
