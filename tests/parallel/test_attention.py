"""SP attention (all-gathered K/V, or a halo for sliding windows) against attention on the whole
sequence: values and the gradients of q, k and v, with grouped KV heads and document masks;
causal (full and sliding windows of every halo size) and bidirectional. Gathered causal cases run
with the zigzag balance and without it, at an even and an odd T per rank.

One world of 4 gloo processes runs sp = 2, 3 and 4 (more slice lengths in the slow test). The inner
attend is a plain masked-softmax written here from the attend contract (the model's own
local_attention is checked in test_model.py), so these checks need nothing from llm_lru.models;
the tiny hybrid LM (test_model.py's helpers) checks the balanced path inside a whole model.
Another test counts the causal (query, key) pairs each rank's inner attend is handed.
"""
import math

import pytest
import torch

from llm_lru.parallel.attention import SPAttention
from llm_lru.parallel.comm import all_gather
from tests.distributed import run_world
from tests.parallel.cases import check_results, close, sp_groups
from tests.parallel.test_model import _lm_case, _sp_mesh


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


def _attention_world(rank, world, t_locals):
    """t_locals: {sp: (T per rank, ...)}; the first length runs every case, the others the gathered
    (balance-sensitive) ones."""
    errors, n = [], 0
    B, H, Hkv, hd = 2, 4, 2, 4
    for k_sp, (group, r) in sp_groups(world, tuple(t_locals)).items():
        if group is None:
            continue
        for ti, t_local in enumerate(t_locals[k_sp]):
            T = k_sp * t_local
            sl = slice(r * t_local, (r + 1) * t_local)
            gen = torch.Generator().manual_seed(k_sp)
            q, k, v = torch.randn(B, H, T, hd, generator=gen), torch.randn(B, Hkv, T, hd, generator=gen), \
                torch.randn(B, Hkv, T, hd, generator=gen)
            docs = torch.rand(B, T, generator=gen) < 0.2
            docs[0, ::t_local] = True  # documents starting exactly on rank boundaries
            docs[1, max(1, t_local // 2)::t_local] = True  # ... and on the zigzag chunks' boundaries
            # windows: full, only itself, a 1-token halo, a full previous slice, more than one slice
            gathered = [(w, True) for w in (0, t_local + 3, T)]
            cases = gathered if ti else gathered + [(w, True) for w in (1, 2, t_local + 1)] + [(0, False), (3, False)]
            for window, causal in cases:
                for balance in ((True, False) if (window, causal) in gathered else (True,)):
                    for doc_start in (None, docs):
                        x = [t.clone().requires_grad_() for t in (q, k, v)]
                        ref = naive_attend(*x, doc_start=doc_start, window=window, causal=causal)
                        w = torch.randn(ref.shape, generator=gen)
                        (ref * w).sum().backward()
                        y = [t[:, :, sl].clone().requires_grad_() for t in (q, k, v)]
                        out = SPAttention(naive_attend, group, balance=balance)(
                            *y, doc_start=None if doc_start is None else doc_start[:, sl], window=window, causal=causal)
                        (out * w[:, :, sl]).sum().backward()
                        tag = (f"sp={k_sp} T/rank={t_local} window={window} causal={causal} balance={balance} "
                               f"docs={doc_start is not None}")
                        close(out, ref[:, :, sl], f"{tag}: out", errors)
                        for name, a, b in zip("qkv", y, x):
                            close(a.grad, b.grad[:, :, sl], f"{tag}: d{name}", errors)
                        n += 1
    return errors, n


def _attention_and_lm_world(rank, world, t_locals):
    """Both checks in one world (a world costs seconds of process start-up)."""
    (e1, n1), (e2, n2) = _attention_world(rank, world, t_locals), _lm_world(rank, world)
    return e1 + e2, n1 + n2


def test_sp_attention_matches_whole_sequence():
    check_results(run_world(_attention_and_lm_world, 4, {2: (6, 5), 3: (4, 3), 4: (4, 3)}))


@pytest.mark.slow
def test_sp_attention_matches_whole_sequence_more_lengths():
    check_results(run_world(_attention_world, 4, {2: (7, 2, 1), 3: (5, 2, 1), 4: (5, 2, 1)}))


def _causal_pairs(Tq: int, Tk: int) -> int:
    """Visible (query, key) pairs of full causal attention whose Tq queries are the last of Tk keys."""
    return Tq * (Tk - Tq) + Tq * (Tq + 1) // 2


def _pairs_world(rank, world, t_locals):
    """Per (T per rank, sp, balance): every rank's causal pairs handed to the inner attend (full
    attention, no documents), gathered over the group."""
    out = {}
    for k_sp, (group, r) in sp_groups(world).items():
        if group is None:
            continue
        for t_local in t_locals:
            for balance in (True, False):
                count = [0]

                def counting(q, k, v, doc_start=None, window=0, causal=True):
                    count[0] += _causal_pairs(q.shape[2], k.shape[2])
                    return naive_attend(q, k, v, doc_start, window, causal)

                x = [torch.randn(1, 2, t_local, 4) for _ in "qkv"]
                with torch.no_grad():
                    SPAttention(counting, group, balance=balance)(*x)
                got = torch.tensor([count[0]], dtype=torch.float64)
                out[(t_local, k_sp, balance)] = all_gather(got, group).view(-1).tolist()
    return out


def test_zigzag_balances_causal_pairs():
    """With balancing every rank's inner attend gets the same causal pairs (exactly for an even T
    per rank, within 10% for an odd one); contiguous slices give the last rank
    1 + 2 (K - 1) T / (T + 1) times the first rank's. Either way the ranks together cover every
    pair of the whole sequence once."""
    results = run_world(_pairs_world, 4, (32, 33))[0]
    for (t_local, k_sp, balance), pairs in results.items():
        assert sum(pairs) == _causal_pairs(k_sp * t_local, k_sp * t_local), (t_local, k_sp, balance, pairs)
        ratio = max(pairs) / min(pairs)
        if balance:
            assert ratio < (1.0 + 1e-9 if t_local % 2 == 0 else 1.1), (t_local, k_sp, pairs)
        else:
            assert ratio == pytest.approx(1 + 2 * (k_sp - 1) * t_local / (t_local + 1)), (t_local, k_sp, pairs)
    assert len(results) == 12


def _lm_world(rank, world):
    """The tiny hybrid LM, whose full attention and window of 5 (> T + 1) both take the balanced
    path, at sp = 3 (T = 3 per rank, odd) and sp = 4 (T = 2): loss and parameter gradients equal
    one process on the whole batch (run by test_sp_attention_matches_whole_sequence)."""
    errors, n = [], 0
    for k_sp, (group, r) in sp_groups(world, (3, 4)).items():
        if group is None:
            continue
        mesh = _sp_mesh(group, r, k_sp)
        t_local = {3: 3, 4: 2}[k_sp]
        _lm_case(mesh, slice(0, 2), t_local, 2, "allgather", False, f"sp={k_sp} T/rank={t_local}", errors)
        n += 1
    return errors, n

