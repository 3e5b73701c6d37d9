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
    (None for an export, which carries only the model config) and where it came from.
    mesh: llm_lru.parallel.Mesh when the model is parallelized for SP eval (None: one process);
    see `parallelize_target`."""
    model: Any
    tokenizer: Any = None
    cfg: Optional[RunConfig] = None
    source: str = ""
    info: Dict[str, Any] = field(default_factory=dict)
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows progress (rank 0, or alone)."""
        return self.mesh is None or self.mesh.rank == 0

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


def parallelize_target(target: EvalTarget, mesh) -> EvalTarget:
    """Split the target's model over mesh's SP group (in place; every rank holds the whole
    weights): the suites then read each prefill chunk in slices, one per rank. On NCCL the model
    moves to this rank's GPU. A mesh of sp = 1 changes nothing."""
    from llm_lru.parallel.parallelize import parallelize

    if mesh.sp == 1:
        return target
    if mesh.backend == "nccl":
        target.model.to(torch.device("cuda", torch.cuda.current_device()))
    target.model = parallelize(target.model, mesh, final_state=True)
    target.mesh = mesh
    return target


def load_target(path: str | Path, tokenizer: Optional[str] = None) -> EvalTarget:
    """Load RUN_DIR | CHECKPOINT | EXPORT_DIR for evaluation (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such run dir, checkpoint or export folder")
    if is_export_dir(p):
        return load_export(p, tokenizer)
    return load_checkpoint(p, tokenizer)
