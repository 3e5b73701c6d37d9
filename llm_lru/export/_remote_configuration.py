"""transformers configuration of an exported llm_lru model.

The fields are llm_lru's ModelConfig fields under their own names (d_model, n_layers, pattern,
...), so the config.json of an export reads like the `model:` section of the training config.
"""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .llm_lru_config import LEGACY_MODEL_DEFAULTS, ModelConfig, layer_kinds, validate_model


class LLMLRUConfig(PretrainedConfig):
    """ModelConfig fields + generation settings. prefill_chunk_size: tokens per forward when a
    long prompt is read into the cache (bounds the attention mask and activations)."""

    model_type = "llm_lru"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    # Fields added after exports existed: absent from an older config.json means the behaviour
    # of then (save_pretrained writes only the values that differ from these defaults).
    LEGACY_DEFAULTS = LEGACY_MODEL_DEFAULTS

    def __init__(self, prefill_chunk_size: int = 2048, use_cache: bool = True, **kwargs):
        for f in dataclasses.fields(ModelConfig):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = self.LEGACY_DEFAULTS.get(f.name, default)
            setattr(self, f.name, kwargs.pop(f.name, default))
        self.prefill_chunk_size = prefill_chunk_size
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = self.tie_embeddings
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The llm_lru ModelConfig these fields describe (validated)."""
        cfg = ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})
        validate_model(cfg)
        return cfg

    def mixer_kinds(self):
        """Mixer kind of each layer (attn, swa, lru, glru, bdlru, hlru)."""
        return layer_kinds(self.model_config())
