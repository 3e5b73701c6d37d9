"""SP attention (all-gathered K/V, or a halo for sliding windows) against attention on the whole
sequence: values and the gradients of q, k and v, with grouped KV heads and document masks;
causal (full and sliding windows of every halo size) and bidirectional.

One world of 4 gloo processes runs sp = 2 and 4 (sp = 3 in the slow test). The inner attend is a plain masked-softmax
written here from the attend contract (the model's own local_attention is checked in
test_model.py), so this test needs nothing from llm_lru.models.
"""
import math

import pytest
import torch

from llm_lru.parallel.attention import SPAttention
from tests.distributed import run_world
from tests.parallel.cases import check_results, close, sp_groups


def naive_attend(q, k, v, doc_start=None, window=0, causal=True):
    """The attend contract by hand: queries are the last Tq of Tk key positions; query i sees
    key j iff j <= i (causal), |i - j| < window (window > 0) and no document starts in (j, i]."""
    B, H, Tq, hd = q.shape
    Tk = k.shape[2]
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i = torch.arange(Tk - Tq, Tk)[:, None]
    j = torch.arange(Tk)[None, :]
    ok = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        ok = ok & (j <= i)
    if window:
        ok = ok & ((i - j).abs() < window)
    ok = ok.expand(B, Tq, Tk)
    if doc_start is not None:
        doc = doc_start.long().cumsum(1)                       # (B, Tk)
        ok = ok & (doc[:, Tk - Tq:, None] == doc[:, None, :])
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    s = s.masked_fill(~ok[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v


def _attention_world(rank, world, sizes):
    errors, n = [], 0
    B, H, Hkv, hd = 2, 4, 2, 4
    for k_sp, (group, r) in sp_groups(world, sizes).items():
        if group is None:
            continue
        t_local = {2: 6, 3: 5, 4: 4}[k_sp]
        T = k_sp * t_local
        sl = slice(r * t_local, (r + 1) * t_local)
        gen = torch.Generator().manual_seed(k_sp)
        q, k, v = torch.randn(B, H, T, hd, generator=gen), torch.randn(B, Hkv, T, hd, generator=gen), \
            torch.randn(B, Hkv, T, hd, generator=gen)
        docs = torch.rand(B, T, generator=gen) < 0.2
        docs[0, ::t_local] = True  # documents starting exactly on rank boundaries
        # windows: full, only itself, a 1-token halo, a full previous slice, more than one slice
        cases = [(w, True) for w in (0, 1, 2, t_local + 1, t_local + 3, T)] + [(0, False), (3, False)]
        for window, causal in cases:
            for doc_start in (None, docs):
                x = [t.clone().requires_grad_() for t in (q, k, v)]
                ref = naive_attend(*x, doc_start=doc_start, window=window, causal=causal)
                w = torch.randn(ref.shape, generator=gen)
                (ref * w).sum().backward()
                y = [t[:, :, sl].clone().requires_grad_() for t in (q, k, v)]
                out = SPAttention(naive_attend, group)(*y, doc_start=None if doc_start is None else doc_start[:, sl],
                                                       window=window, causal=causal)
                (out * w[:, :, sl]).sum().backward()
                tag = f"sp={k_sp} window={window} causal={causal} docs={doc_start is not None}"
                close(out, ref[:, :, sl], f"{tag}: out", errors)
                for name, a, b in zip("qkv", y, x):
                    close(a.grad, b.grad[:, :, sl], f"{tag}: d{name}", errors)
                n += 1
    return errors, n


def test_sp_attention_matches_whole_sequence():
    check_results(run_world(_attention_world, 4, (2, 4)))


@pytest.mark.slow
def test_sp_attention_matches_whole_sequence_sp3():
    check_results(run_world(_attention_world, 3, (3,)))
