"""transformers model of an exported llm_lru hybrid LM, with a recurrent-state generation cache.

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    out = model.generate(ids, max_new_tokens=64)

The network is `HybridLM` (llm_lru_hybrid.py, a copy of the training code). Its generation cache
is a transformers `Cache` with one layer per block: a `RecurrentStateLayer` (one fixed-size state:
its memory does not grow with the text) or an `AttentionLayer` (keys/values; sliding-window layers
keep only their window). Loading checks every weight file against the sha256 recorded in
llm_lru_export.json, refuses missing, unexpected or mis-shaped tensors, and warns when the
installed transformers is outside the range the export was verified with.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file, logging

from .configuration_llm_lru import LLMLRUConfig
from .llm_lru_hybrid import HybridLM, ModelState

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the model output's `past_key_values` to `cache` (and what generate() passes).
_OUTPUT_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

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


def read_metadata(where: str, **hub) -> Optional[dict]:
    """The export's llm_lru_export.json (a folder or a Hub repo), or None when it has none."""
    path = _resolve(where, METADATA, hub)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def verify_weights(where: str, **hub) -> None:
    """Raise ValueError naming the weight file that is missing or differs from the export's record."""
    meta = read_metadata(where, **hub)
    if meta is None:
        logger.warning(f"{where}: no {METADATA}, the weight files cannot be checked against the export")
        return
    for name, rec in meta.get("weights", {}).items():
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


def version_tuple(version: str) -> tuple:
    """(major, minor, patch) of a version string: '5.25.0.dev0' -> (5, 25, 0)."""
    parts = [re.match(r"\d*", p).group() for p in version.split(".")[:3]]
    return tuple(int(p or 0) for p in parts + ["0"] * (3 - len(parts)))


def check_transformers_version(where: str, meta: Optional[dict], installed: str = transformers.__version__) -> None:
    """Warn (UserWarning) when `installed` is outside the transformers range the export records
    (llm_lru_export.json "transformers": exported_with, supported_min, supported_below)."""
    rec = (meta or {}).get("transformers")
    if not rec:
        return
    lo, below = rec["supported_min"], rec["supported_below"]
    if not version_tuple(lo) <= version_tuple(installed) < version_tuple(below):
        warnings.warn(f"{where}: exported with transformers {rec['exported_with']} and verified with "
                      f">={lo},<{below}, but transformers {installed} is installed: generation may be wrong "
                      f"(pip install 'transformers>={lo},<{below}')", UserWarning, stacklevel=3)


class _StateLayer(CacheLayerMixin):
    """One block's entry in the cache: what the block carries between calls (its part of the
    model's ModelState, in the tensors named by `held`) and the number of tokens read. The model
    writes whole states (`write`); it never calls `update` with keys and values. Not croppable: a
    recurrent state cannot be rolled back, so neither can the cache (assisted decoding needs it)."""

    is_croppable = False
    is_sliding = False
    supports_early_init = False  # nothing to pre-allocate: the first forward sets the batch size
    held: tuple = ()

    def __init__(self):
        super().__init__()
        self.seen = 0
        for name in self.held:
            setattr(self, name, None)

    def _store(self, n_tokens: int, **tensors: torch.Tensor) -> None:
        for name in self.held:
            setattr(self, name, tensors[name])
        self.device = tensors[self.held[0]].device
        self.seen += n_tokens
        self.is_initialized = True

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            for name in self.held:
                setattr(self, name, fn(getattr(self, name)))

    def nbytes(self) -> int:
        """Bytes held."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.held)

    def lazy_initialization(self, key_states, value_states) -> None:
        raise NotImplementedError(f"{type(self).__name__}: the model writes whole states, not keys/values")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}: the model writes whole states, not keys/values")

    def get_seq_length(self) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(f"{type(self).__name__}: an llm_lru cache cannot be rolled back "
                                      "(recurrent states keep no history)")

    def reset(self) -> None:
        self.seen, self.is_initialized = 0, False
        for name in self.held:
            setattr(self, name, None)


class RecurrentStateLayer(_StateLayer):
    """A recurrent block's cache: its `state` (B, N, m), or (B, N) for diagonal layers, whatever
    the number of tokens read."""

    held = ("state",)

    def read(self) -> Optional[torch.Tensor]:
        """The state for the model, None before the first write."""
        return self.state

    def write(self, state: torch.Tensor, n_tokens: int) -> None:
        """Store the state after `n_tokens` more tokens."""
        self._store(n_tokens, state=state)

    def get_mask_sizes(self, query_length: int) -> tuple:
        return query_length, self.seen  # attends over nothing cached

    def get_max_length(self) -> int:
        return -1  # no sequence dimension


class AttentionLayer(_StateLayer):
    """An attention block's cache: `keys` and `values` (B, Hkv, Tc, hd) and the document `starts`
    (B, Tc) of the cached positions (from left padding). window > 0: sliding-window, Tc <= window."""

    held = ("keys", "values", "starts")

    def __init__(self, window: int = 0):
        super().__init__()
        self.window = window
        self.is_sliding = window > 0

    def read(self) -> Optional[dict]:
        """The model's KV state dict(k, v, starts), None before the first write."""
        return None if self.keys is None else {"k": self.keys, "v": self.values, "starts": self.starts}

    def write(self, state: dict, n_tokens: int) -> None:
        """Store the model's KV state dict after `n_tokens` more tokens."""
        self._store(n_tokens, keys=state["k"], values=state["v"], starts=state["starts"])

    def get_mask_sizes(self, query_length: int) -> tuple:
        cached = 0 if self.keys is None else self.keys.shape[2]
        return cached + query_length, self.seen - cached

    def get_max_length(self) -> int:
        return self.window or -1


def cache_layers(config: LLMLRUConfig) -> List[_StateLayer]:
    """Empty cache layers for the blocks of a model with this config, in block order."""
    return [AttentionLayer(config.window if kind == "swa" else 0) if kind in ("attn", "swa") else RecurrentStateLayer()
            for kind in config.mixer_kinds()]


class LLMLRUCache(Cache):
    """transformers Cache of an llm_lru hybrid model, one layer per block (`cache_layers`); what
    forward makes when it is given none. (generate() passes its own DynamicCache, which forward
    fills with the same layers.)

    Recurrent layers hold one state each whatever the number of tokens read: O(1) memory per new
    token. Attention layers hold K/V (sliding-window ones at most `window` positions).
    `get_seq_length()` is the number of tokens read. Empty until the first forward.
    """

    def __init__(self, config: LLMLRUConfig):
        super().__init__(layers=cache_layers(config))

    def nbytes(self) -> Dict[str, int]:
        """Bytes held by recurrent states and by attention K/V caches."""
        return {"recurrent": sum(l.nbytes() for l in self.layers if isinstance(l, RecurrentStateLayer)),
                "attention": sum(l.nbytes() for l in self.layers if isinstance(l, AttentionLayer))}


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
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify_weights_sha256: bool = True, **kwargs):
        """transformers' from_pretrained, plus: weight files must match llm_lru_export.json, the
        checkpoint must hold exactly the model's tensors (else ValueError naming them), and a
        transformers version outside the range the export records warns."""
        where = str(pretrained_model_name_or_path)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        check_transformers_version(where, read_metadata(where, **hub))
        if verify_weights_sha256:
            verify_weights(where, **hub)
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

    def cache_layers_of(self, cache: Cache) -> List[_StateLayer]:
        """The layers of `cache`, one per block. A cache that holds nothing yet (the DynamicCache
        generate() makes, or DynamicCache(config=model.config)) gets this model's layer types;
        a cache another model filled is refused (ValueError naming `cache`)."""
        if not isinstance(cache, Cache):
            raise TypeError(f"cache: expected a transformers Cache, got {type(cache).__name__}")
        want = cache_layers(self.config)
        if [type(l) for l in cache.layers] == [type(l) for l in want]:
            return cache.layers
        if any(getattr(l, "is_initialized", False) for l in cache.layers):
            raise ValueError(f"cache: a {type(cache).__name__} filled by another model "
                             f"({', '.join(sorted({type(l).__name__ for l in cache.layers}))}); an llm_lru model "
                             f"needs {', '.join(type(l).__name__ for l in want)}")
        cache.layers[:] = want
        return cache.layers

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.LongTensor] = None, logits_to_keep: int = 0, return_dict: Optional[bool] = None,
                past_key_values: Optional[Cache] = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids: (B, T). With a cache (given, or use_cache), the input continues the cached text
        and is read in chunks of config.prefill_chunk_size; logits (B, T or logits_to_keep, V) fp32.
        `past_key_values` is the cache's name before transformers 5.24 (generate() passes it there)."""
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("cache, past_key_values: pass the cache once (past_key_values is its old name)")
            cache = past_key_values
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        starts = doc_starts(attention_mask, T)
        keep_from = T - logits_to_keep if logits_to_keep else 0
        if cache is None and not use_cache:
            logits = self.model(input_ids, starts)[:, keep_from:]
        else:
            cache = LLMLRUCache(self.config) if cache is None else cache
            layers = self.cache_layers_of(cache)
            if layers[0].is_initialized:
                state = ModelState([l.read() for l in layers], cache.get_seq_length())
            else:
                state = self.initial_state(B)
            chunk, outs = self.config.prefill_chunk_size or T, []
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                lg, state = self.model(input_ids[:, s:e], None if starts is None else starts[:, s:e],
                                       state=state, return_state=True)
                if e > keep_from:  # drop logits nobody asked for as soon as they exist
                    outs.append(lg[:, max(keep_from - s, 0):])
            for layer, layer_state in zip(layers, state.layers):
                layer.write(layer_state, T)
            logits = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        loss = None
        if labels is not None:
            if keep_from:
                raise ValueError("labels: the loss needs every position's logits (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE: cache})

    def initial_state(self, batch_size: int) -> ModelState:
        """The model's state before any token: zero recurrent states, empty K/V (in the model's dtype)."""
        dtype = self.model.embed.weight.dtype
        state = self.model.init_state(batch_size, self.model.embed.weight.device)
        layers = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in s.items()} if isinstance(s, dict) else s
                  for s in state.layers]
        return ModelState(layers, 0)
