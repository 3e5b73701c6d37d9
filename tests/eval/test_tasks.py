"""Synthetic task generators: answers where they should be, no leakage, loader integration."""
import itertools

import numpy as np
import pytest

from llm_lru.config import from_dict
from llm_lru.data_prep import build_loader
from llm_lru.data_prep.synthetic import TASKS, make_sample
from llm_lru.eval import tasks


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
    a = tasks.task_batch("s3", {}, 32, 3, seed=1)
    b = tasks.task_batch("s3", {}, 32, 3, seed=1)
    c = tasks.task_batch("s3", {}, 32, 3, seed=2)
    assert (a["tokens"] == b["tokens"]).all() and not (a["tokens"] == c["tokens"]).all()
