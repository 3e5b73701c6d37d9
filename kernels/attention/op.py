"""Softmax attention over the keys at hand (DESIGN.md §4b), the op the attention mixers call:
`local_attention` never builds a Tq x Tk mask or score matrix. Document ids, causality, the window
and the queries' offset into the keys decide which (query block, key block) tiles can hold a
visible pair; only those are computed:
- CPU: `tiled_attention` (here), SDPA's flash kernel per tile (no mask on fully visible spans, a
  tile-sized mask on the others), tiles joined by their log-sum-exp, with its own backward that
  re-runs the flash backward per tile against the joined (out, logsumexp).
- CUDA: flex_attention with a BlockMask (compiled), built once per step for all layers (flex.py).
`dense_attention` (reference.py: one boolean mask, SDPA) is the reference they are tested against.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .flex import flex_attention_route
from .reference import dense_attention, doc_ids


# Query rows and key columns per tile on the CPU route. A masked tile holds a B x TILE x TILE mask;
# a query block's fully visible keys go to the flash kernel in one unmasked call, whatever their number.
TILE = 128


# One query block of the CPU route: (first query, end query, [(first key, end key, needs a mask)]).
Plan = List[Tuple[int, int, List[Tuple[int, int, bool]]]]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor], window: int) -> None:
    B, H, Tq, hd = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != hd or k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"attention: k and v must be (B, Hkv, Tk, hd) with Hkv dividing H, given q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Tq > k.shape[2]:
        raise ValueError(f"attention: the queries are the last Tq of the keys, so Tq <= Tk; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    if doc_start is not None and tuple(doc_start.shape) != (B, k.shape[2]):
        raise ValueError(f"attention: doc_start must be (B, Tk) = {(B, k.shape[2])}, got {tuple(doc_start.shape)}")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0 = unlimited), got {window}")


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                    window: int = 0, causal: bool = True) -> torch.Tensor:
    """Softmax attention over the keys at hand, without a Tq x Tk mask or score matrix.

    q: (B, H, Tq, hd); k, v: (B, Hkv, Tk, hd), RoPE applied, Hkv dividing H (grouped heads);
    queries are the last Tq keys (gathered keys under SP, a KV cache). doc_start: (B, Tk) bool or
    None; window: 0 = unlimited, else |i - j| < window. Returns (B, H, Tq, hd).
    Nothing masked: SDPA's flash path; else flex_attention on CUDA, `tiled_attention` on CPU (on
    any other device the dense reference).
    """
    _check(q, k, v, doc_start, window)
    Tq, Tk = q.shape[2], k.shape[2]
    if doc_start is None and (not window or window >= Tk) and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    if q.device.type == "cuda":
        return flex_attention_route(q, k, v, doc_start, window, causal)
    if q.device.type == "cpu":
        return tiled_attention(q, k, v, doc_start, window, causal)
    return dense_attention(q, k, v, doc_start, window, causal)


def tile_plan(Tq: int, Tk: int, ids: Optional[torch.Tensor], window: int, causal: bool, tile: int = TILE) -> Plan:
    """The tiles that can hold a visible pair, per query block.

    Query blocks end on multiples of `tile` in key positions (query i sits at key Tk - Tq + i), key
    blocks are [j*tile, (j+1)*tile). A tile is skipped when its position range (causality, window)
    or its document ranges (in every batch row) rule every pair out; it needs no mask when they
    rule none out. Consecutive unmasked key blocks form one span. ids: (B, Tk) from `doc_ids` or None.
    """
    q0 = Tk - Tq
    cuts = torch.arange(min(Tk, (q0 // tile + 1) * tile), Tk, tile)
    qlo = torch.cat([torch.tensor([q0]), cuts])
    qhi = torch.cat([cuts, torch.tensor([Tk])]) - 1              # inclusive, in key positions
    klo = torch.arange(0, Tk, tile)
    khi = (klo + tile).clamp(max=Tk) - 1
    dmin, dmax = qlo[:, None] - khi[None], qhi[:, None] - klo[None]  # (nq, nk) range of i - j in a tile
    some = torch.ones(dmin.shape, dtype=torch.bool)
    full = some.clone()
    lo = 0 if causal else (1 - window if window else None)          # allowed i - j: [lo, hi]
    hi = window - 1 if window else None
    if lo is not None:
        some &= dmax >= lo
        full &= dmin >= lo
    if hi is not None:
        some &= dmin <= hi
        full &= dmax <= hi
    if ids is not None:
        ids = ids.cpu()
        qa, qz, ka, kz = ids[:, qlo], ids[:, qhi], ids[:, klo], ids[:, khi]  # first / last document per block
        some &= ((qa[:, :, None] <= kz[:, None]) & (ka[:, None] <= qz[:, :, None])).any(0)
        full &= ((qa == qz)[:, :, None] & (ka == kz)[:, None] & (qa[:, :, None] == ka[:, None])).all(0)
    pairs = some.nonzero().tolist()
    masked = (~full[some]).tolist()
    plan: Plan = []
    for (i, j), m in zip(pairs, masked):
        if not plan or plan[-1][0] != int(qlo[i]) - q0:
            plan.append((int(qlo[i]) - q0, int(qhi[i]) + 1 - q0, []))
        segs = plan[-1][2]
        ks, ke = int(klo[j]), int(khi[j]) + 1
        if segs and not m and not segs[-1][2] and segs[-1][1] == ks:
            segs[-1] = (segs[-1][0], ke, False)
        else:
            segs.append((ks, ke, m))
    return plan


def _tile_mask(ids: Optional[torch.Tensor], q0: int, qs: int, qe: int, ks: int, ke: int, window: int, causal: bool,
               dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """One tile's additive mask (B or 1, 1, qe - qs, ke - ks) and which of its query rows see
    any key (B or 1, 1, qe - qs)."""
    d = torch.arange(q0 + qs, q0 + qe)[:, None] - torch.arange(ks, ke)[None]
    ok = torch.ones(d.shape, dtype=torch.bool)
    if causal:
        ok &= d >= 0
    if window:
        ok &= d.abs() < window
    ok = ok[None]
    if ids is not None:
        ok = ok & (ids[:, q0 + qs:q0 + qe, None] == ids[:, None, ks:ke])
    mask = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf"))
    return mask[:, None], ok.any(-1)[:, None]


class _TiledAttention(torch.autograd.Function):
    """Forward: per query block, the flash kernel over each span of its plan, joined by log-sum-exp.
    Backward: the flash backward per span, given the joined out and logsumexp (each span's share
    of the exact gradient), masks rebuilt tile by tile. Saves q, k, v, out, logsumexp only."""

    @staticmethod
    def forward(ctx, q, k, v, ids, window, causal, plan):
        Tq, Tk = q.shape[2], k.shape[2]
        q0 = Tk - Tq
        acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
        for qs, qe, segs in plan:
            qi = q[:, :, qs:qe]
            parts = []
            for ks, ke, masked in segs:
                mask, rows = _tile_mask(ids, q0, qs, qe, ks, ke, window, causal, q.dtype) if masked else (None, None)
                o, l = flash(qi, k[:, :, ks:ke], v[:, :, ks:ke], attn_mask=mask)
                if rows is not None:  # the kernel gives a row with no visible key lse 0, not -inf
                    l = l.masked_fill(~rows, float("-inf"))
                parts.append((o, l))
            if len(parts) == 1:
                o, l = parts[0]
            else:
                l = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
                o = sum(p[0].to(acc) * torch.exp(p[1] - l)[..., None] for p in parts)
            out[:, :, qs:qe] = o
            lse[:, :, qs:qe] = l
        ctx.save_for_backward(q, k, v, out, lse, ids)
        ctx.window, ctx.causal, ctx.plan = window, causal, plan
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, ids = ctx.saved_tensors
        q0 = k.shape[2] - q.shape[2]
        acc = lse.dtype
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        g = g.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for qs, qe, segs in ctx.plan:
            gi, qi, oi, li = g[:, :, qs:qe], q[:, :, qs:qe], out[:, :, qs:qe], lse[:, :, qs:qe]
            for ks, ke, masked in segs:
                mask = _tile_mask(ids, q0, qs, qe, ks, ke, ctx.window, ctx.causal, q.dtype)[0] if masked else None
                a, b, c = flash_backward(gi, qi, k[:, :, ks:ke], v[:, :, ks:ke], oi, li, 0.0, False, attn_mask=mask)
                dq[:, :, qs:qe] += a
                dk[:, :, ks:ke] += b
                dv[:, :, ks:ke] += c
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                    window: int = 0, causal: bool = True, tile: int = TILE) -> torch.Tensor:
    """CPU route of `local_attention` (same arguments and result): only the tiles of `tile_plan`
    are computed, each through SDPA's CPU flash kernel, so memory is linear in Tq + Tk and the
    work is that of the visible tiles (a window: O(T x max(window, tile)); packed documents:
    O(sum of doc_len^2) plus the tiles that straddle a boundary). Grouped heads stay grouped."""
    _check(q, k, v, doc_start, window)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    ids = doc_ids(doc_start) if doc_start is not None else None
    plan = tile_plan(q.shape[2], k.shape[2], ids, window, causal, tile)
    return _TiledAttention.apply(q, k, v, ids, window, causal, plan)
