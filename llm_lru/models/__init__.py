"""Hybrid recurrent / attention language models: layers only (no process-group code: parallel/ wraps
them; no autograd functions: the ops they call are llm_lru.kernels)."""
from .attention import Attention, apply_rope
from .hybrid import Block, HybridLM, LMHead, ModelState, SwiGLU, ffn_width, make_mixer
from .recurrent import BDLRU, BLUR, GLRU, HLRU, LRU, StateReadout

__all__ = ["HybridLM", "ModelState", "Block", "make_mixer", "SwiGLU", "ffn_width", "LMHead", "Attention", "apply_rope",
           "LRU", "GLRU", "BDLRU", "HLRU", "BLUR", "StateReadout"]
