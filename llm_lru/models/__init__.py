"""Hybrid recurrent / attention language models (no process-group code: parallel/ wraps them)."""
from .attention import Attention, local_attention
from .hybrid import Block, HybridLM, ModelState, make_mixer
from .loss import LMHead, linear_cross_entropy, linear_cross_entropy_reference
from .recurrent import BDLRU, BLUR, GLRU, HLRU, LRU

__all__ = ["HybridLM", "ModelState", "Block", "make_mixer", "Attention", "local_attention",
           "LMHead", "linear_cross_entropy", "linear_cross_entropy_reference",
           "LRU", "GLRU", "BDLRU", "HLRU", "BLUR"]
