"""CUDA route of `local_attention` (op.py): compiled flex_attention with a BlockMask of the same rules
as the reference's mask, built once per step for all layers (`BlockMaskMemo`, module-global: every
layer of a forward passes the same doc_start tensor). torch's flex_attention is imported on first use.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import doc_ids


_compiled = {}


class BlockMaskMemo:
    """The last BlockMask per shape and rule: every attention layer of a forward (and activation
    checkpointing's recompute) passes the same doc_start tensor, so the mask is built once per step,
    not once per layer. An entry holds that tensor, so its id cannot be reused by a new batch while
    the entry lives, and its _version, so an in-place edit rebuilds the mask."""

    def __init__(self, size: int = 8):
        self.size, self.entries = size, {}

    def get(self, key, doc_start: Optional[torch.Tensor]):
        hit = self.entries.get(key)
        if hit is None or hit[0] is not doc_start or (doc_start is not None and hit[1] != doc_start._version):
            return None
        return hit[2]

    def put(self, key, doc_start: Optional[torch.Tensor], block_mask) -> None:
        if key not in self.entries and len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (doc_start, None if doc_start is None else doc_start._version, block_mask)


_block_masks = BlockMaskMemo()


def flex_mask_mod(ids: Optional[torch.Tensor], q0, window, causal: bool, windowed: bool):
    """The rules of `attention_mask` as a flex_attention mask_mod: query i sits at key q0 + i.
    q0 and window may be 0-d tensors (so that new values do not recompile)."""
    def mask_mod(b, h, qi, kj):
        d = qi + q0 - kj
        ok = d >= 0 if causal else kj >= 0
        if windowed:
            ok = ok & (d < window) & (d > -window)
        if ids is not None:
            ok = ok & (ids[b, qi + q0] == ids[b, kj])
        return ok
    return mask_mod


def flex_attention_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                         window: int = 0, causal: bool = True, compiled: bool = True) -> torch.Tensor:
    """CUDA route of `local_attention` (same arguments and result): compiled flex_attention with a
    BlockMask of the same rules, so empty blocks are skipped forward and backward and no dense
    mask exists (the BlockMask is built compiled, block by block). Head sizes flex's kernels do
    not take (below 16, not a power of two) are zero-padded, which changes no score.
    compiled=False runs flex eagerly (forward only on CPU: how the CPU tests check the mask_mod)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if compiled and not _compiled:
        _compiled["flex"] = torch.compile(flex_attention)
        _compiled["mask"] = torch.compile(create_block_mask)
    flex, make_mask = (_compiled["flex"], _compiled["mask"]) if compiled else (flex_attention, create_block_mask)
    B, H, Tq, hd = q.shape
    Tk = k.shape[2]
    key = (Tq, Tk, int(window), bool(causal), B, q.device, compiled)
    block_mask = _block_masks.get(key, doc_start)
    if block_mask is None:
        ids = doc_ids(doc_start) if doc_start is not None else None
        scalar = lambda x: torch.tensor(x, device=q.device)  # noqa: E731
        mask_mod = flex_mask_mod(ids, scalar(Tk - Tq), scalar(window), causal, bool(window))
        block_mask = make_mask(mask_mod, B if ids is not None else None, None, Tq, Tk, device=q.device)
        _block_masks.put(key, doc_start, block_mask)
    size = max(16, 1 << (hd - 1).bit_length())
    if size != hd:
        q, k, v = (F.pad(x, (0, size - hd)) for x in (q, k, v))
    out = flex(q, k, v, block_mask=block_mask, scale=hd ** -0.5, enable_gqa=k.shape[1] != H)
    return out[..., :hd] if size != hd else out
