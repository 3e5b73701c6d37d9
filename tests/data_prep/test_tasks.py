"""Synthetic task generators: answers where they should be, no leakage, loader integration."""
import itertools

import numpy as np
import pytest

from llm_lru.config import from_dict
from llm_lru.data_prep import build_loader
from llm_lru.data_prep import tasks
from llm_lru.data_prep.synthetic import TASKS, make_sample, task_batch


def _rng(i):
    return np.random.default_rng([7, i])


@pytest.mark.parametrize("n,seq_len,V", [(4, 64, 64), (8, 40, 32), (16, 256, 8192)])
def test_mqar_answers_and_no_leakage(n, seq_len, V):
    for i in range(20):
        out = tasks.mqar(_rng(i), seq_len, vocab_size=V, num_kv_pairs=n)
        tok, mask = out["tokens"], out["loss_mask"]
        assert tok.shape == (seq_len + 1,) and mask.shape == (seq_len,)
        keys, vals = tok[0:2 * n:2], tok[1:2 * n:2]
        assert len(set(keys)) == n and len(set(vals)) == n
        assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= vals) & (vals < V)).all()
        pair = dict(zip(keys.tolist(), vals.tolist()))
        qpos = np.flatnonzero(mask)
        assert len(qpos) == n and (qpos >= 2 * n).all()
        assert sorted(tok[qpos].tolist()) == sorted(keys.tolist())  # every key queried once
        for q in qpos:
            ans = int(tok[q + 1])
            assert ans == pair[int(tok[q])]
            # the answer appears before the query only as the paired value in the kv section
            seen = np.flatnonzero(tok[:q + 1] == ans)
            assert seen.tolist() == [2 * keys.tolist().index(int(tok[q])) + 1]
        # outside the kv pairs and the queries there is only the fill token
        rest = np.ones(seq_len + 1, bool)
        rest[:2 * n] = False
        rest[qpos] = rest[qpos + 1] = False
        assert (tok[rest] == tasks.MQAR_FILL).all()


@pytest.mark.parametrize("nq", [2, 9])
def test_mqar_query_counts(nq):
    for i in range(20):
        out = tasks.mqar(_rng(i), 32, vocab_size=32, num_kv_pairs=4, num_queries=nq)
        tok, qpos = out["tokens"], np.flatnonzero(out["loss_mask"])
        assert len(qpos) == nq
        pair = dict(zip(tok[0:8:2].tolist(), tok[1:8:2].tolist()))
        for q in qpos:
            assert tok[q + 1] == pair[int(tok[q])]
            # every earlier sight of the answer follows its own key (the pair, or an earlier query)
            for j in np.flatnonzero(tok[:q + 1] == tok[q + 1]):
                assert tok[j - 1] == tok[q]
        if nq < 4:
            assert len(set(tok[qpos].tolist())) == nq


def test_mqar_gaps_follow_a_power_law():
    # slot s drawn ~ s^(a-1): short gaps far more often than under a uniform draw
    firsts = [int(np.flatnonzero(tasks.mqar(_rng(i), 512, 256, 4)["loss_mask"])[0]) for i in range(200)]
    space = (513 - 8) // 2
    uniform_first_mean = 8 + 2 * space / 5  # mean of the min of 4 uniform slots, roughly
    assert np.mean(firsts) < 0.6 * uniform_first_mean


def test_mqar_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_kv_pairs"):
        tasks.mqar(_rng(0), 16, vocab_size=64, num_kv_pairs=8)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        tasks.mqar(_rng(0), 64, vocab_size=8, num_kv_pairs=8)


def _compose_reference(gs, n):
    """p_t = g_t o p_{t-1} with permutations as arrays: (a o b)[i] = a[b[i]]."""
    perms = list(itertools.permutations(range(n)))
    p = np.arange(n)
    for g in gs:
        p = np.array(perms[g])[p]
    return perms.index(tuple(p))


@pytest.mark.parametrize("n,fn", [(3, tasks.s3), (5, tasks.s5)])
def test_word_problem_answers(n, fn):
    order = len(list(itertools.permutations(range(n))))
    eq = order
    for i in range(10):
        out = fn(_rng(i), 96, min_len=1, max_len=12)
        tok, mask, starts = out["tokens"], out["loss_mask"], out["doc_starts"]
        qs = np.flatnonzero(mask)
        assert len(qs) >= 1 and (tok[qs] == eq).all()
        begin = np.flatnonzero(starts)
        for q in qs:
            s = begin[begin <= q].max()  # this episode's first token
            gs = tok[s:q]
            assert (gs < order).all() and len(gs) >= 1
            assert tok[q + 1] == order + 1 + _compose_reference(gs.tolist(), n)
            # answers are never inputs of their own episode (no feeding back of products)
            assert not ((tok[s:q + 1] > order)).any()
        assert tok.max() <= 2 * order + 1


def test_s3_is_not_commutative_here():
    # a reference check that the order of composition matters for S3 (so the test above can fail)
    perms, comp = tasks.permutation_table(3)
    assert (comp != comp.T).any()


def test_selective_copy():
    for i in range(10):
        out = tasks.selective_copy(_rng(i), 40, vocab_size=10, n=5)
        tok, mask = out["tokens"], out["loss_mask"]
        region = 41 - 5 - 1
        data = tok[:region][tok[:region] != 0]
        assert len(data) == 5 and tok[region] == 1
        assert tok[region + 1:].tolist() == data.tolist()
        assert np.flatnonzero(mask).tolist() == list(range(region, region + 5))


def test_tasks_are_registered_and_load():
    for name in ("mqar", "s3", "s5", "selective_copy"):
        assert TASKS[name] is tasks.TASKS[name]
    cfg = from_dict({"model": {"vocab_size": 64}, "train": {"seq_len": 32, "global_batch_size": 4},
                     "data": {"source": "synthetic", "task": "mqar", "task_args": {"num_kv_pairs": 4}}})
    b = next(iter(build_loader(cfg)))
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == labels.shape == (4, 32)
    scored = labels != -100
    assert (scored.sum(1) == 4).all()
    assert (labels[scored] >= 32).all()  # only values are scored
    # vocab_size is filled in from the model config
    tok, _, _ = make_sample("mqar", _rng(0), 32, {"num_kv_pairs": 4}, vocab_size=64)
    assert tok.max() < 64


def test_task_batch_is_seeded_apart():
    a = task_batch("s3", {}, 32, 3, seed=1)
    b = task_batch("s3", {}, 32, 3, seed=1)
    c = task_batch("s3", {}, 32, 3, seed=2)
    assert (a["tokens"] == b["tokens"]).all() and not (a["tokens"] == c["tokens"]).all()


# ---- the paper's word problems and the MAD suite -------------------------------------------

def _group_reference(group, n):
    """Elements as tuples (S_n, A_n in itertools order; Z_n as ints) and their composition."""
    if group == "Z":
        return list(range(n)), lambda a, b: (a + b) % n

    def parity(p):  # by cycles: a k-cycle is k - 1 transpositions
        seen, swaps = set(), 0
        for i in range(n):
            j, k = i, 0
            while j not in seen:
                seen.add(j)
                j, k = p[j], k + 1
            swaps += max(k - 1, 0)
        return swaps % 2

    elems = [p for p in itertools.permutations(range(n)) if group == "S" or parity(p) == 0]
    return elems, lambda a, b: tuple(a[b[i]] for i in range(n))


@pytest.mark.parametrize("group,n", [("S", 3), ("A", 4), ("A", 5), ("S", 5), ("Z", 5)])
def test_word_problem_answer_at_every_position(group, n):
    elems, op = _group_reference(group, n)
    G = len(elems)
    for i in range(3):
        out = tasks.word_problem(_rng(i), 64, n=n, group=group)
        tok, mask, tgt = out["tokens"], out["loss_mask"], out["targets"]
        assert mask.all() and out["doc_starts"] is None
        assert (tok[:-1] < G).all()  # inputs are group elements only: no answer is ever an input
        p = elems[0]  # the identity
        for t in range(64):
            p = op(elems[tok[t]], p)
            assert tgt[t] == G + 1 + elems.index(p)


@pytest.mark.parametrize("group,n", [("A", 5), ("Z", 4)])
def test_word_problem_episodes_of_other_groups(group, n):
    elems, op = _group_reference(group, n)
    G = len(elems)
    out = tasks.word_problem(_rng(0), 96, n=n, group=group, layout="episodes", max_len=10)
    tok, starts = out["tokens"], np.flatnonzero(out["doc_starts"])
    for q in np.flatnonzero(out["loss_mask"]):
        s = starts[starts <= q].max()
        assert tok[q] == G and (tok[s:q] < G).all()
        p = elems[0]
        for g in tok[s:q]:
            p = op(elems[g], p)
        assert tok[q + 1] == G + 1 + elems.index(p)


def test_word_problem_needs_targets_and_checks_arguments():
    with pytest.raises(ValueError, match="word_problem.*with_targets"):
        make_sample("word_problem", _rng(0), 32, {})
    with pytest.raises(ValueError, match="group"):
        tasks.word_problem(_rng(0), 32, group="Q")
    with pytest.raises(ValueError, match="layout"):
        tasks.word_problem(_rng(0), 32, layout="both")


def _check_recall(tok, mask, keys, values, multi_query=True):
    """Walk the pairs with a dict: the map is consistent, and exactly the repeated keys are scored
    with their first value (which the input shows before, and never at the scored position)."""
    kv, want = {}, np.zeros_like(mask)
    for i in range(0, 2 * ((len(tok) - (0 if multi_query else 3)) // 2), 2):
        k, v = int(tok[i]), int(tok[i + 1])
        if k not in keys:
            assert k >= len(keys) + len(values) and v >= len(keys) + len(values)  # a noise pair
            continue
        assert v in values and kv.setdefault(k, v) == v
        want[i] = multi_query and i > 0 and k in kv and tok[:i].tolist().count(k) > 0
    if multi_query:
        assert (mask == want).all()
    else:
        q = np.flatnonzero(mask)
        assert len(q) == 1 and tok[q[0] - 1] == max(values) + 1 and tok[q[0] + 1] == kv[int(tok[q[0]])]
    for q in np.flatnonzero(mask):
        assert tok[q] in keys and tok[q + 1] == kv[int(tok[q])]
    return kv


def test_in_context_recall_and_noisy_recall():
    for i in range(10):
        out = tasks.in_context_recall(_rng(i), 256)  # MAD: vocab 16, multi-query: keys 0..7, values 8..15
        assert out["loss_mask"].sum() > 50
        _check_recall(out["tokens"], out["loss_mask"], set(range(8)), set(range(8, 16)))
        out = tasks.in_context_recall(_rng(i), 255, multi_query=False)  # keys 0..6, values 7..14, copy 15
        _check_recall(out["tokens"], out["loss_mask"], set(range(7)), set(range(7, 14)) | {14}, multi_query=False)
        out = tasks.noisy_recall(_rng(i), 256)  # vocab 32, 16 noise ids after keys 0..7 and values 8..15
        tok = out["tokens"]
        assert ((tok >= 16) & (tok < 32)).any()
        _check_recall(tok, out["loss_mask"], set(range(8)), set(range(8, 16)))


def test_fuzzy_recall():
    K = 7  # vocab 16: keys 0..6, values 7..14, pad 15
    for i in range(10):
        out = tasks.fuzzy_recall(_rng(i), 256)
        tok, mask = out["tokens"], out["loss_mask"]
        want, kv, t = np.zeros_like(mask), {}, 0
        while t < len(tok) and tok[t] != 15:  # motifs: a run of key ids, then a run of value ids
            k0 = t
            while tok[t] < K:
                t += 1
            v0 = t
            while t < len(tok) and K <= tok[t] < 15:
                t += 1
            k, v = tuple(tok[k0:v0]), tuple(tok[v0:t])
            if k in kv:  # a key motif seen before: the positions that predict its value's tokens
                want[v0 - 1: t - 1] = True
            assert 1 <= len(k) <= 3 and 1 <= len(v) <= 3 and kv.setdefault(k, v) == v
        assert (tok[t:] == 15).all() and mask.any()
        assert (mask == want).all()


def test_compression():
    for i in range(5):
        out = tasks.compression(_rng(i), 256)  # vocab 16: data 0..14, compression token 15
        tok, mask = out["tokens"], out["loss_mask"]
        n = 128
        assert tok[n] == 15 and (tok[:n] < 15).all()
        assert np.flatnonzero(mask).tolist() == list(range(n, 2 * n))
        assert tok[n + 1: 2 * n + 1].tolist() == tok[:n].tolist()  # the scored targets, shown before the token only


def test_memorization_map_is_fixed_and_never_in_context():
    seen = {}
    for i in range(20):
        out = tasks.memorization(_rng(i), 256)  # vocab 256: keys 0..127, values 128..255
        tok, mask = out["tokens"], out["loss_mask"]
        assert np.flatnonzero(mask).tolist() == list(range(0, 256, 2))
        keys = tok[0:256:2].tolist()
        assert len(set(keys)) == len(keys) and max(keys) < 128  # no key twice: nothing to recall in context
        for q in np.flatnonzero(mask):
            k, v = int(tok[q]), int(tok[q + 1])
            assert 128 <= v < 256 and seen.setdefault(k, v) == v  # the same value in every sample
            assert v not in tok[:q + 1]  # the answer is not in the context before it is asked
    assert len(set(seen.values())) == len(seen)  # a bijection
    other = tasks.memorization(_rng(0), 256, kv_map_seed=7)["tokens"]
    assert other[1] != tasks.memorization_map(256, 12345)[other[0]]


@pytest.mark.parametrize("name", ["word_problem", "in_context_recall", "noisy_recall", "fuzzy_recall",
                                  "selective_copy", "compression", "memorization"])
def test_every_task_runs_with_defaults_at_256(name):
    tok, mask, starts, tgt = make_sample(name, _rng(0), 256, {}, with_targets=True)
    assert tok.shape == (257,) and mask.shape == starts.shape == tgt.shape == (256,) and mask.any()
    assert TASKS[name] is tasks.TASKS[name]


def test_mad_task_trains_through_the_loader():
    cfg = from_dict({"model": {"vocab_size": 16}, "train": {"seq_len": 64, "global_batch_size": 2},
                     "data": {"source": "synthetic", "task": "in_context_recall"}})
    b = next(iter(build_loader(cfg)))
    scored = b["labels"] != -100
    assert scored.any() and (b["labels"][scored] >= 8).all()  # values only
