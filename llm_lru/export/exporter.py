"""Checkpoint -> HF-format folder.

    export(SRC, OUT, dtype="fp32")  writes
      config.json, generation_config.json     transformers configs (auto_map -> the code below)
      model.safetensors                       or model-0000k-of-0000n.safetensors + index.json
      configuration_llm_lru.py, modeling_llm_lru.py, llm_lru_*.py   modeling code (remote_code.py)
      tokenizer.json, tokenizer_config.json   when the run's data manifest names a tokenizer
      llm_lru_export.json                     source checkpoint, step, tokens, weight sha256s,
                                              transformers version used and range supported
      README.md                               model card

The model is built from the folder's own code (transformers' remote-code loader), filled with
the consolidated weights and written by its save_pretrained, so the export is checked to load
before it is finished. No file in the folder is a pickle.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from llm_lru.models import HybridLM

from .card import find_report, model_card, training_summary
from .remote_code import source_revision, write_code
from .source import Source, consolidate, match_keys, resolve_source

FORMAT = "llm_lru.export/1"
METADATA = "llm_lru_export.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AUTO_MAP = {"AutoConfig": "configuration_llm_lru.LLMLRUConfig",
            "AutoModelForCausalLM": "modeling_llm_lru.LLMLRUForCausalLM"}
# transformers versions the folder's generation cache was verified with: [min, below). Recorded in
# the folder; loading under another version warns. Widen it only after tests/export pass there.
TRANSFORMERS_SUPPORTED = ("5.23.0", "5.25.0")


def hf_config_dict(model_cfg, specials: Dict[str, Optional[int]]) -> Dict[str, Any]:
    """config.json content (before transformers adds its own keys)."""
    return {"model_type": "llm_lru", "architectures": ["LLMLRUForCausalLM"], "auto_map": AUTO_MAP,
            **dataclasses.asdict(model_cfg), **{k: v for k, v in specials.items() if v is not None}}


def find_tokenizer(src: Source, tokenizer: Optional[str] = None):
    """The run's tokenizer (a LoadedTokenizer) from --tokenizer or the data manifest, else None."""
    from llm_lru.data_prep.tokenizer import from_path, load_tokenizer

    if tokenizer:
        return from_path(tokenizer)
    manifest = src.meta.get("manifest") or (str(Path(src.config.data.path) / "manifest.json") if src.config.data.path else "")
    if manifest and Path(manifest).is_file():
        return load_tokenizer(manifest)
    return None


def save_tokenizer(tok, out: Path) -> Dict[str, Optional[int]]:
    """tokenizer.json + tokenizer_config.json, written by transformers' PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    name = tok.hf.id_to_token
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=name(tok.eos_id), bos_token=name(tok.bos_id),
                                   pad_token=name(tok.pad_id))
    fast.save_pretrained(str(out))
    return {"eos_token_id": tok.eos_id, "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id}


def check_no_pickles(folder: Path) -> None:
    """Raise ValueError naming any file of the folder that is a pickle or a torch.save zip:
    .safetensors files must parse as safetensors, other files must not start like a pickle
    (protocol 2+ opcode) or a zip archive."""
    from safetensors import safe_open

    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".safetensors":
            try:
                with safe_open(str(p), "pt"):
                    pass
            except Exception as e:
                raise ValueError(f"{p}: not a safetensors file ({e})") from None
            continue
        head = p.read_bytes()[:4]
        if head[:1] == b"\x80" or head == b"PK\x03\x04":
            raise ValueError(f"{p}: export folders must not contain pickles or torch.save archives")


def write_folder(out: Path, model_cfg, sd: Dict[str, torch.Tensor], dtype: str = "fp32", tok=None,
                 max_shard_size: str | int = "2GB") -> Dict[str, Any]:
    """Write code, configs, tokenizer and weights of HybridLM(model_cfg) with state dict `sd`
    (HybridLM names) into the existing folder `out`; returns the export metadata so far."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if tok is not None and tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer: {tok.vocab_size} tokens but model.vocab_size={model_cfg.vocab_size}")
    specials = save_tokenizer(tok, out) if tok is not None else {}
    rev = source_revision()
    write_code(out, rev)
    (out / "config.json").write_text(json.dumps(hf_config_dict(model_cfg, specials), indent=1))
    # Build through the folder's own code: what users will load is what gets filled and saved.
    hf_cfg = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=True, dtype=torch.float32)
    model.model.load_state_dict(sd, strict=True)
    model.to(DTYPES[dtype])
    model.generation_config = GenerationConfig(**specials)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    meta = json.loads((out / METADATA).read_text())
    meta.update({"format": FORMAT, "llm_lru_revision": rev, "dtype": dtype, "num_params": model.model.num_params(),
                 "num_params_no_embedding": model.model.num_params(exclude_embedding=True),
                 "transformers": {"exported_with": transformers.__version__, "supported_min": TRANSFORMERS_SUPPORTED[0],
                                  "supported_below": TRANSFORMERS_SUPPORTED[1]}})
    (out / METADATA).write_text(json.dumps(meta, indent=1))
    return meta


def export(path: str | Path, out: str | Path, dtype: str = "fp32", config: Optional[str] = None,
           tokenizer: Optional[str] = None, max_shard_size: str | int = "2GB", overwrite: bool = False,
           report: Optional[str] = None) -> Path:
    """Export the checkpoint at `path` (run dir, checkpoint or DeepSpeed folder) to folder `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: must be one of {', '.join(DTYPES)}, got '{dtype}'")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    src = resolve_source(path, config)
    model_cfg = src.config.model
    if not model_cfg.causal:
        raise ValueError("model.causal: false (a bidirectional encoder) cannot be exported as a causal LM")
    sd = match_keys(consolidate(src), HybridLM(model_cfg).state_dict().keys(), str(src.checkpoint or src.ds_dir))
    tok = find_tokenizer(src, tokenizer)
    if tok is None:
        warnings.warn(f"{path}: no tokenizer found (data manifest or --tokenizer); exporting the model without one")
    out.mkdir(parents=True, exist_ok=True)
    meta = write_folder(out, model_cfg, sd, dtype, tok, max_shard_size)
    meta.update({"source": {"path": str(Path(path).resolve()), "checkpoint": str((src.checkpoint or src.ds_dir).resolve()),
                            "ds_tag": src.tag, **{k: src.meta[k] for k in ("zero_stage", "world_size", "precision")
                                                  if k in src.meta}},
                 "training": training_summary(src)})
    (out / METADATA).write_text(json.dumps(meta, indent=1))
    card = model_card(model_cfg, meta, find_report(src, report), has_tokenizer=tok is not None)
    (out / "README.md").write_text(card)
    check_no_pickles(out)
    return out
