"""The attention op: `local_attention` (op.py: the route by device and the CPU tiled route), its CUDA
route (flex.py), and the dense reference (reference.py)."""
from .flex import BlockMaskMemo, flex_attention_route, flex_mask_mod
from .op import TILE, local_attention, tile_plan, tiled_attention
from .reference import attention_mask, dense_attention, doc_ids

__all__ = ["local_attention", "tiled_attention", "tile_plan", "TILE", "flex_attention_route", "flex_mask_mod",
           "BlockMaskMemo", "dense_attention", "attention_mask", "doc_ids"]
