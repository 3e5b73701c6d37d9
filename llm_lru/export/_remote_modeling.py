"""transformers model of an exported llm_lru hybrid LM, with a recurrent-state generation cache.

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    out = model.generate(ids, max_new_tokens=64)

The network is `HybridLM` (llm_lru_hybrid.py, a copy of the training code). `generate()` keeps
an `LLMLRUCache`: one fixed-size state per recurrent layer (its memory does not grow with the
text) and the keys/values of attention layers (sliding-window layers keep only their window).
Loading checks every weight file against the sha256 recorded in llm_lru_export.json and refuses
missing, unexpected or mis-shaped tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file, logging

from .configuration_llm_lru import LLMLRUConfig
from .llm_lru_hybrid import HybridLM, ModelState

logger = logging.get_logger(__name__)

METADATA = "llm_lru_export.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def weight_files(folder: str) -> list:
    """Names of the weight files of a saved model: the index and its shards, or model.safetensors."""
    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [WEIGHTS_INDEX] + shards
    return [WEIGHTS]


def record_weights(folder: str) -> Dict[str, dict]:
    """Write the sha256 and size of every weight file into folder/llm_lru_export.json (other keys kept)."""
    path = os.path.join(folder, METADATA)
    meta = {}
    if os.path.isfile(path):
        with open(path) as f:
            meta = json.load(f)
    meta["weights"] = {name: {"sha256": sha256_file(os.path.join(folder, name)),
                              "bytes": os.path.getsize(os.path.join(folder, name))}
                       for name in weight_files(folder)}
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    return meta["weights"]


def _resolve(where: str, name: str, hub: dict) -> Optional[str]:
    if os.path.isdir(where):
        p = os.path.join(where, hub.get("subfolder") or "", name)
        return p if os.path.isfile(p) else None
    return cached_file(where, name, _raise_exceptions_for_missing_entries=False, **hub)


def verify_weights(where: str, **hub) -> None:
    """Raise ValueError naming the weight file that is missing or differs from the export's record."""
    meta_file = _resolve(where, METADATA, hub)
    if meta_file is None:
        logger.warning(f"{where}: no {METADATA}, the weight files cannot be checked against the export")
        return
    with open(meta_file) as f:
        recorded = json.load(f).get("weights", {})
    for name, rec in recorded.items():
        path = _resolve(where, name, hub)
        if path is None:
            raise ValueError(f"{where}: weight file {name} is missing (listed in {METADATA})")
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            raise ValueError(f"{where}: weight file {name} has {size} bytes, {rec['bytes']} recorded in "
                             f"{METADATA}: it was truncated or replaced after export")
        if sha256_file(path) != rec["sha256"]:
            raise ValueError(f"{where}: weight file {name} does not match the sha256 recorded in {METADATA}: "
                             "it was changed after export")


def map_state(state: ModelState, fn: Callable[[torch.Tensor], torch.Tensor]) -> ModelState:
    """Apply fn to every tensor of a ModelState (recurrent states and attention K/V dicts)."""
    layers = [{k: fn(v) for k, v in s.items()} if isinstance(s, dict) else (None if s is None else fn(s))
              for s in state.layers]
    return ModelState(layers, state.pos)


class LLMLRUCache:
    """Generation cache: the hybrid model's ModelState.

    Recurrent layers hold one state each, (B, N, m) or (B, N), whatever the number of tokens read:
    O(1) memory per new token. Attention layers hold K/V (B, Hkv, T, hd) (sliding-window ones at
    most `window` positions). `get_seq_length()` is the number of tokens read.
    """

    is_compileable = False
    is_croppable = False  # a recurrent state cannot be rolled back

    def __init__(self, state: ModelState):
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.pos

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = map_state(self.state, lambda t: t.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = map_state(self.state, lambda t: t[indices])

    def nbytes(self) -> Dict[str, int]:
        """Bytes held by recurrent states and by attention K/V caches."""
        rec = att = 0
        for s in self.state.layers:
            if isinstance(s, dict):
                att += sum(v.numel() * v.element_size() for v in s.values())
            elif s is not None:
                rec += s.numel() * s.element_size()
        return {"recurrent": rec, "attention": att}

    def __repr__(self) -> str:
        return f"LLMLRUCache(pos={self.state.pos}, bytes={self.nbytes()})"


def doc_starts(attention_mask: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """Left padding as document starts: True at each row's first unmasked position. (B, T) or None.

    The model resets recurrent states and cuts attention at a document start, so padded rows give
    the same result as unpadded ones.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    m = attention_mask.bool()
    prev = torch.cat([torch.zeros_like(m[:, :1]), m[:, :-1]], 1)
    return (m & ~prev)[:, -T:]


class LLMLRUPreTrainedModel(PreTrainedModel):
    config_class = LLMLRUConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        # HybridLM initialises its own parameters when built; exported weights replace them.
        pass


class LLMLRUForCausalLM(LLMLRUPreTrainedModel, GenerationMixin):
    """Causal LM head model over llm_lru's HybridLM (parameter names `model.<HybridLM name>`)."""

    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: LLMLRUConfig):
        super().__init__(config)
        self.model = HybridLM(config.model_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache: forward builds an LLMLRUCache on the first call.
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify_weights_sha256: bool = True, **kwargs):
        """transformers' from_pretrained, plus: weight files must match llm_lru_export.json, and the
        checkpoint must hold exactly the model's tensors (else ValueError naming them)."""
        where = str(pretrained_model_name_or_path)
        if verify_weights_sha256:
            verify_weights(where, **{k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None})
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = [f"{what} {', '.join(map(str, info[what]))}" for what in ("missing_keys", "unexpected_keys", "mismatched_keys")
                    if info.get(what)]
        if problems:
            raise ValueError(f"{where}: the weight files do not match the model: " + "; ".join(problems))
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, then the sha256 of each weight file into llm_lru_export.json."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            record_weights(str(save_directory))

    def init_cache(self, batch_size: int) -> LLMLRUCache:
        """Zero recurrent states and empty K/V caches (K/V in the model's dtype)."""
        dtype = self.model.embed.weight.dtype
        state = self.model.init_state(batch_size, self.model.embed.weight.device)
        layers = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in s.items()} if isinstance(s, dict) else s
                  for s in state.layers]
        return LLMLRUCache(ModelState(layers, state.pos))

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[LLMLRUCache] = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.LongTensor] = None, logits_to_keep: int = 0, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids: (B, T). With a cache (given, or use_cache), the input continues the cached text
        and is read in chunks of config.prefill_chunk_size; logits (B, T or logits_to_keep, V) fp32."""
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        starts = doc_starts(attention_mask, T)
        keep_from = T - logits_to_keep if logits_to_keep else 0
        cache = None
        if past_key_values is None and not use_cache:
            logits = self.model(input_ids, starts)[:, keep_from:]
        else:
            cache = past_key_values if past_key_values is not None else self.init_cache(B)
            chunk = self.config.prefill_chunk_size or T
            state, outs = cache.state, []
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                lg, state = self.model(input_ids[:, s:e], None if starts is None else starts[:, s:e],
                                       state=state, return_state=True)
                if e > keep_from:  # drop logits nobody asked for as soon as they exist
                    outs.append(lg[:, max(keep_from - s, 0):])
            cache.state = state
            logits = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        loss = None
        if labels is not None:
            if keep_from:
                raise ValueError("labels: the loss needs every position's logits (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
