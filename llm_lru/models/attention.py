"""Softmax attention mixers (causal, sliding window) and the attention function they call.

The mixer computes q, k, v and RoPE; `self.attend` does the attending, and with a KV cache
(chunked prefill, step mode) `self.extend_cache` joins the cached keys with this call's.
Sequence parallelism replaces both (llm_lru.parallel) to gather K and V across ranks; the mixer
does not change.

`local_attention` never builds a Tq x Tk mask or score matrix. Document ids, causality, the window
and the queries' offset into the keys decide which (query block, key block) tiles can hold a
visible pair; only those are computed:
- CPU: `tiled_attention`, SDPA's flash kernel per tile (no mask on fully visible spans, a
  tile-sized mask on the others), tiles joined by their log-sum-exp, with its own backward that
  re-runs the flash backward per tile against the joined (out, logsumexp).
- CUDA: flex_attention with a BlockMask (compiled), built once per step for all layers
  (`BlockMaskMemo`).
`dense_attention` (one boolean mask, SDPA) is the reference they are tested against.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import apply_rope

# Query rows and key columns per tile on the CPU route. A masked tile holds a B x TILE x TILE mask;
# a query block's fully visible keys go to the flash kernel in one unmasked call, whatever their number.
TILE = 128
# Above this many query x key entries per batch row, the reference builds its mask one query block at a time.
_MASK_BLOCK = 1 << 22

# One query block of the CPU route: (first query, end query, [(first key, end key, needs a mask)]).
Plan = List[Tuple[int, int, List[Tuple[int, int, bool]]]]


def doc_ids(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) document starts -> (B, T) id of each position's document: the position of its start
    (-1 for a document that began before the first position). Same id <=> same document."""
    pos = torch.arange(doc_start.shape[1], device=doc_start.device)
    return torch.cummax(torch.where(doc_start, pos, -1), dim=1).values


def attention_mask(Tq: int, Tk: int, doc_start: Optional[torch.Tensor], window: int, causal: bool,
                   device: torch.device, q_start: Optional[int] = None) -> torch.Tensor:
    """Boolean mask (B or 1, 1, Tq, Tk), True = may attend. Query i sits at key position
    q_start + i (default Tk - Tq: the queries are the last Tq keys)."""
    q_start = Tk - Tq if q_start is None else q_start
    qpos = torch.arange(q_start, q_start + Tq, device=device)
    diff = qpos[:, None] - torch.arange(Tk, device=device)[None, :]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        allowed &= diff >= 0
    if window:
        allowed &= diff.abs() < window
    mask = allowed[None, None]
    if doc_start is not None:
        ids = doc_ids(doc_start)
        mask = mask & (ids[:, qpos, None] == ids[:, None, :])[:, None]
    return mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                    window: int = 0, causal: bool = True) -> torch.Tensor:
    """The reference: SDPA with the dense `attention_mask` (built one query block at a time).
    O(Tq x Tk) memory; the tests hold `local_attention` to it. Arguments as `local_attention`."""
    B, H, Tq, hd = q.shape
    Tk = k.shape[2]
    gqa = k.shape[1] != H
    if doc_start is None and not window and causal and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    step = max(1, _MASK_BLOCK // max(Tk, 1))
    outs = []
    for s in range(0, Tq, step):
        e = min(Tq, s + step)
        mask = attention_mask(e - s, Tk, doc_start, window, causal, q.device, q_start=Tk - Tq + s)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=mask, enable_gqa=gqa))
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


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


def extend_cache(state: dict, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor):
    """The keys a call with a KV cache attends over: the cached ones, then this call's.

    state: dict(k, v (B, Hkv, Tc, hd), starts (B, Tc)); k, v: (B, Hkv, T, hd); starts: (B, T) bool.
    Returns (k, v, starts) of length Tc + T, in time order.
    """
    return torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2), torch.cat([state["starts"], starts], 1)


class Attention(nn.Module):
    """Multi-head attention with RoPE and grouped KV heads; `window` > 0 makes it sliding-window.

    State (step mode / chunked prefill): dict(k, v, starts) of the cached keys, values and their
    document starts; sliding-window layers keep only the last `window` keys.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, window: int = 0,
                 rope_theta: float = 10000.0, causal: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.window, self.rope_theta, self.causal = window, rope_theta, causal
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.attend = local_attention
        self.extend_cache = extend_cache

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> dict:
        empty = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "starts": torch.zeros(batch, 0, dtype=torch.bool, device=device)}

    def forward(self, x: torch.Tensor, doc_start: Optional[torch.Tensor] = None, state: Optional[dict] = None,
                pos_offset: int = 0):
        """x: (B, T, D) -> (y (B, T, D), new state or None)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        pos = torch.arange(pos_offset, pos_offset + T, device=x.device)
        q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        new_state = None
        if state is not None:
            starts = doc_start if doc_start is not None else torch.zeros(B, T, dtype=torch.bool, device=x.device)
            k, v, starts = self.extend_cache(state, k, v, starts)
            doc_start = starts if bool(starts.any()) else None
            keep = self.window if self.window else k.shape[2]
            new_state = {"k": k[:, :, -keep:], "v": v[:, :, -keep:], "starts": starts[:, -keep:]}
        y = self.attend(q, k, v, doc_start, self.window, self.causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), new_state
