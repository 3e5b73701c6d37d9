"""Load an export folder back as llm_lru's own HybridLM (for `llm-lru eval EXPORT_DIR` and tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from llm_lru.config import ModelConfig, validate_model
from llm_lru.models import HybridLM


def load_hybrid(folder: str | Path, dtype: torch.dtype = torch.float32) -> HybridLM:
    """HybridLM with an export's weights, in eval mode.

    Goes through transformers (the folder's own loader), so the weight files are checked
    against their recorded sha256 and must hold exactly the model's tensors.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype)
    cfg = ModelConfig(**{name: getattr(hf.config, name) for name in ModelConfig.__dataclass_fields__})
    validate_model(cfg)
    model = HybridLM(cfg).to(dtype)
    model.load_state_dict(hf.model.state_dict(), strict=True)
    return model.eval()
