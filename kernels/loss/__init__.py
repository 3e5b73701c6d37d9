"""The chunked linear + cross-entropy (op.py; fla's fused kernel on CUDA where installed) and the plain
full-logits reference (reference.py)."""
from .op import DEFAULT_CHUNK_TOKENS, ChunkedLinearCrossEntropy, fla_loss_class, linear_cross_entropy, loss_route
from .reference import linear_cross_entropy_reference

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "ChunkedLinearCrossEntropy", "DEFAULT_CHUNK_TOKENS",
           "fla_loss_class", "loss_route"]
