"""The hybrid language model: embedding, a stack of pre-norm residual blocks (a mixer and a SwiGLU
MLP) whose mixers follow a pattern of recurrent and attention kinds, a final norm and a (tied) head.

    logits = model(input_ids, doc_start)                      # packed sequences
    loss = model.loss(input_ids, labels, doc_start)            # training: no (B, T, V) logits
    logits, state = model(ids, state=state, return_state=True) # chunked prefill
    logits, state = model.step(tokens, state)                  # one token at a time
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_lru.config import ModelConfig, layer_kinds, validate_model
from llm_lru.kernels import DEFAULT_CHUNK_TOKENS, linear_cross_entropy

from .attention import Attention
from .baselines import LSTM, DeltaNet
from .recurrent import BDLRU, BLUR, GLRU, HLRU, LRU


@dataclass
class ModelState:
    """What the model carries between chunks: one entry per layer (a recurrent state tensor, or a
    KV-cache dict for attention) and the number of tokens already read (the next RoPE position)."""
    layers: List[Any] = field(default_factory=list)
    pos: int = 0


def make_mixer(cfg: ModelConfig, kind: str) -> nn.Module:
    d, d_state = cfg.d_model, cfg.d_state or cfg.d_model
    if kind in ("attn", "swa"):
        return Attention(d, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.window if kind == "swa" else 0,
                         cfg.rope_theta, cfg.causal)
    if kind == "lru":
        return LRU(d, d_state, cfg.lru_r_min, cfg.lru_r_max, cfg.lru_max_phase)
    if kind == "glru":
        return GLRU(d, d_state)
    if kind == "bdlru":
        return BDLRU(d, d_state, cfg.block_size, cfg.gate_norm, cfg.gate_init, cfg.selective)
    if kind == "hlru":
        return HLRU(d, d_state, cfg.block_size, cfg.gate_norm, cfg.gate_init, cfg.selective, cfg.hlru_readout)
    if kind == "blur":
        return BLUR(d, d_state, cfg.lru_r_min, cfg.lru_r_max, cfg.lru_max_phase)
    if kind == "lstm":
        return LSTM(d, d_state)
    if kind == "deltanet":
        return DeltaNet(d, d_state, cfg.n_heads)
    raise ValueError(f"model.pattern: unknown mixer kind '{kind}'")


class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x) * W3 x). x: (B, T, D)."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def ffn_width(d_model: int, ffn_dim: int = 0) -> int:
    """Explicit width, or 8/3 * d_model rounded up to a multiple of 64 (LLaMA convention)."""
    return ffn_dim or 64 * ((8 * d_model // 3 + 63) // 64)


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = make_mixer(cfg, kind)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, ffn_width(cfg.d_model, cfg.ffn_dim))

    def forward(self, x, doc_start=None, state=None, pos_offset: int = 0):
        y, new_state = self.mixer(self.norm1(x), doc_start, state, pos_offset)
        x = x + y
        return x + self.mlp(self.norm2(x)), new_state


class LMHead(nn.Linear):
    """The output projection D -> V (no bias): logits, or with labels the loss above.

    The state-dict key stays `weight`, so checkpoints and exports are unchanged by the loss.
    """

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None, reduction: str = "mean",
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
        """x: (B, T, D) -> logits (B, T, V) fp32; with labels (B, T): the scalar loss (see
        linear_cross_entropy, ignore index -100)."""
        if labels is None:
            return F.linear(x, self.weight).float()
        return linear_cross_entropy(x, self.weight, labels, reduction, chunk_tokens)


class HybridLM(nn.Module):
    """Causal (or, with blur and causal=False, bidirectional) LM over a hybrid stack."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size: must be set before building the model (0 means 'from the data's tokenizer')")
        self.cfg = cfg
        self.kinds = layer_kinds(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, k) for k in self.kinds)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = LMHead(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.normal_(0.0, std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
        # Residual outputs scaled down with depth (GPT-2), then each mixer's own initialisation.
        for block in self.layers:
            for name, p in block.named_parameters():
                if name.endswith(("o_proj.weight", "out_proj.weight", "mlp.w2.weight")):
                    p.normal_(0.0, std / math.sqrt(2 * len(self.layers)))
            for mod in block.modules():
                if hasattr(mod, "init_special"):
                    mod.init_special()

    def init_state(self, batch: int, device: Optional[torch.device] = None) -> ModelState:
        """Zero recurrent states and empty KV caches for `batch` sequences."""
        device = device or self.embed.weight.device
        dtype = self.embed.weight.dtype
        states = []
        for block in self.layers:
            if not hasattr(block.mixer, "init_state"):
                raise ValueError(f"model.pattern: {block.kind} layers have no left-to-right state")
            # KV caches in the weights' dtype; recurrent states accumulate in fp32 or better.
            states.append(block.mixer.init_state(batch, device=device, dtype=dtype))
        return ModelState(states, 0)

    def forward(self, input_ids: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                state: Optional[ModelState] = None, pos_offset: int = 0, return_state: bool = False,
                labels: Optional[torch.Tensor] = None, loss_reduction: str = "mean",
                loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        """input_ids: (B, T) int64; doc_start: (B, T) bool or None; returns logits (B, T, V) fp32
        (and the state after the input when return_state).

        With labels (B, T) int64 (labels[:, t] the target of position t, -100 where nothing is
        counted) it returns the cross-entropy instead of the logits: the mean over counted tokens,
        or their sum with loss_reduction='sum'; computed loss_chunk_tokens tokens at a time, so no
        (B, T, V) logits exist (llm_lru.kernels.loss). This is the training path: the head's weight is
        used inside the head module's forward, where DeepSpeed ZeRO-3 has gathered it.
        """
        B, T = input_ids.shape
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels: shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if return_state and state is None:
            state = self.init_state(B, input_ids.device)
        pos = pos_offset + (state.pos if state is not None else 0)
        x = self.embed(input_ids)
        new_states = []
        for i, block in enumerate(self.layers):
            layer_state = state.layers[i] if state is not None else None
            x, s = block(x, doc_start, layer_state, pos)
            new_states.append(s)
        if labels is None:
            out = self.head(self.norm(x))
        else:
            out = self.head(self.norm(x), labels, loss_reduction, loss_chunk_tokens)
        if return_state:
            return out, ModelState(new_states, state.pos + T)
        return out

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
             pos_offset: int = 0, reduction: str = "mean", chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
        """Cross-entropy of the next-token predictions: input_ids, labels (B, T) int64 (labels[:, t]
        is the target of position t, already shifted; -100 is not counted); doc_start (B, T) bool.

        reduction 'mean' (over counted tokens; 0 when there are none) or 'sum'. Goes through
        forward (see there), so a DeepSpeed engine's `engine(ids, labels=...)` computes the same.
        """
        return self(input_ids, doc_start, pos_offset=pos_offset, labels=labels, loss_reduction=reduction,
                    loss_chunk_tokens=chunk_tokens)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: ModelState):
        """One token per sequence: tokens (B,) -> logits (B, V), next state."""
        logits, state = self.forward(tokens[:, None], state=state, return_state=True)
        return logits[:, 0], state

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n
