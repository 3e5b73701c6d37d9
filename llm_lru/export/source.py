"""What `llm-lru export` reads: a run dir, one of its checkpoints, or a bare DeepSpeed checkpoint.

    src = resolve_source(path)            # -> Source (DeepSpeed dir + tag, run config, meta)
    state_dict = consolidate(src)         # fp32 tensors, HybridLM parameter names

Run layout (llm_lru/train/checkpoint.py): RUN/checkpoints/latest -> step_N/{config.yaml,
meta.json, ds/ (DeepSpeed, tag in ds/latest), COMPLETE}. A run dir resolves to its newest
complete checkpoint. A bare DeepSpeed folder (with `latest`, or a tag folder itself) needs a
config.yaml beside it, in its parent, or given with --config.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from llm_lru.config import RunConfig, load_config

_STEP_RE = re.compile(r"^step_\d+$")


@dataclass
class Source:
    """A resolved checkpoint. ds_dir + tag is what DeepSpeed's zero_to_fp32 takes."""
    path: Path                      # what the user named
    ds_dir: Path
    tag: Optional[str]
    config: RunConfig
    checkpoint: Optional[Path] = None   # the trainer's step_N dir, if any
    run_dir: Optional[Path] = None
    meta: Dict[str, Any] = field(default_factory=dict)


def _is_tag_dir(p: Path) -> bool:
    return any(p.glob("*model_states.pt"))


def _find_config(candidates, config: Optional[str], what: Path) -> RunConfig:
    if config:
        return load_config(config)
    for c in candidates:
        if c is not None and (c / "config.yaml").is_file():
            return load_config(c / "config.yaml", saved=True)
    raise ValueError(f"{what}: no config.yaml beside the checkpoint or in its parent; pass --config RUN_CONFIG.yaml")


def resolve_source(path: str | Path, config: Optional[str] = None) -> Source:
    """Find the DeepSpeed checkpoint, its tag and the run config behind `path` (see module doc)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such run dir, checkpoint or DeepSpeed checkpoint folder")
    trainer_layout = (p / "checkpoints").is_dir() or (p / "COMPLETE").exists() or bool(_STEP_RE.match(p.name)) \
        or (p / "latest").is_file() and _STEP_RE.match((p / "latest").read_text().strip())
    if trainer_layout:
        from llm_lru.train.checkpoint import DS_SUBDIR, find_checkpoint

        ckpt = find_checkpoint(p)
        meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
        ds_dir = ckpt / meta.get("ds_dir", DS_SUBDIR)
        tag = meta.get("ds_tag")
        run_dir = ckpt.parent.parent
        cfg = _find_config([ckpt, run_dir], config, ckpt)
        return Source(p, ds_dir, tag, cfg, checkpoint=ckpt, run_dir=run_dir, meta=meta)
    if _is_tag_dir(p):  # the tag folder itself (holds mp_rank_00_model_states.pt)
        return Source(p, p.parent, p.name, _find_config([p, p.parent, p.parent.parent], config, p))
    if (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
        return Source(p, p, tag, _find_config([p, p.parent], config, p))
    tags = [d for d in p.iterdir() if d.is_dir() and _is_tag_dir(d)] if p.is_dir() else []
    if len(tags) == 1:
        return Source(p, p, tags[0].name, _find_config([p, p.parent], config, p))
    raise ValueError(f"{p}: not a run dir, a trainer checkpoint or a DeepSpeed checkpoint folder "
                     "(expected checkpoints/, COMPLETE, a `latest` file or *_model_states.pt)")


def consolidate(src: Source) -> Dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint of any ZeRO stage and world size.

    ZeRO 1-3: DeepSpeed's own zero_to_fp32 merges the optimizer's fp32 partitions. Without ZeRO
    (stage 0, no partitioned optimizer state) the full module is in mp_rank_00_model_states.pt.
    """
    tag = src.tag
    if tag is None and (src.ds_dir / "latest").is_file():
        tag = (src.ds_dir / "latest").read_text().strip()
    tag_dir = src.ds_dir / (tag or "")
    if not tag_dir.is_dir():
        raise ValueError(f"{tag_dir}: DeepSpeed checkpoint folder not found")
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(src.ds_dir), tag=tag)
    else:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ValueError(f"{tag_dir}: neither ZeRO optimizer partitions nor mp_rank_00_model_states.pt")
        # DeepSpeed's own (pickled) file format; trusted input, as any checkpoint being exported.
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def match_keys(sd: Dict[str, torch.Tensor], expected, where: str) -> Dict[str, torch.Tensor]:
    """Rename sd's keys to `expected` (dropping a wrapper prefix such as 'module.'), or raise a
    ValueError listing the missing and unexpected tensors."""
    expected = set(expected)
    if set(sd) != expected:
        for key in sd:  # a prefix that maps some key onto an expected name
            for name in expected:
                if key.endswith("." + name):
                    prefix = key[: -len(name)]
                    if all(k.startswith(prefix) for k in sd) and {k[len(prefix):] for k in sd} == expected:
                        return {k[len(prefix):]: v for k, v in sd.items()}
            break
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: checkpoint does not match the model of its config: "
                         f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                         f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    return sd
