"""Synthetic recall and state-tracking tasks, registered with the data loader's task registry
(llm_lru.data_prep.synthetic) so that the normal trainer trains on them (data.source=synthetic,
data.task=NAME, data.task_args={...}). Importing this module registers them.

Every task returns tokens (seq_len + 1,) and a loss mask (seq_len,): input position t predicts
tokens[t + 1], and only the answers are scored.

- `mqar` (Zoology, Arora et al. 2023): n key-value pairs, keys from [1, V/2), values from
  [V/2, V), then every key queried once at power-law distributed slots of the rest; 0 fills.
- `s3`, `s5` (permutation composition, the word problem of S_n): episodes g_1 .. g_k `=` p_k with
  p_k = g_k o ... o g_1, one answer per episode; episodes are separate documents, so the
  state resets between them. The answer is never fed back before a fresh episode starts; an
  interleaved g_t p_t stream would let the model read p_{t-1} and make the task one composition.
- `selective_copy` (Gu & Dao 2023): n data tokens at random positions among blanks, a
  separator, then the n tokens in order.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any, Dict, List, Tuple

import numpy as np

from llm_lru.data_prep.synthetic import register_task

MQAR_FILL = 0


def mqar(rng: np.random.Generator, seq_len: int, vocab_size: int = 8192, num_kv_pairs: int = 8,
         power_a: float = 0.01, num_queries: int = 0) -> Dict[str, Any]:
    """Multi-query associative recall, Zoology layout (see module doc).

    tokens: k_1 v_1 ... k_n v_n | 0 ... k_{pi(1)} v_{pi(1)} 0 ... ; a query slot is an even
    offset in the query section; slot s is drawn with probability proportional to s^(a-1)
    (small gaps likely, a power law). loss_mask is True at each queried key.
    num_queries 0 (Zoology): every key queried once. Fewer: a random subset. More: keys drawn
    with replacement, so no answer can be had by elimination (the last unqueried value).
    """
    n = num_kv_pairs
    nq = num_queries or n
    L = seq_len + 1
    half = vocab_size // 2
    if n < 1 or half - 1 < n or vocab_size - half < n:
        raise ValueError(f"data.task_args.num_kv_pairs: {n} pairs need vocab_size >= {2 * n + 2}, got {vocab_size}")
    space = (L - 2 * n) // 2
    if space < nq:
        raise ValueError(f"data.task_args.num_kv_pairs: {n} pairs and {nq} queries do not fit seq_len {seq_len} "
                         f"(need seq_len >= {2 * n + 2 * nq - 1})")
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=n, replace=False)
    tokens = np.full(L, MQAR_FILL, np.int64)
    tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    slots = np.sort(rng.choice(space, size=nq, replace=False, p=p / p.sum()))
    order = rng.permutation(n)[:nq] if nq <= n else rng.integers(0, n, size=nq)
    qpos = 2 * n + 2 * slots
    tokens[qpos], tokens[qpos + 1] = keys[order], values[order]
    mask = np.zeros(seq_len, bool)
    mask[qpos] = True
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": None}


@lru_cache(maxsize=None)
def permutation_table(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """All permutations of n items (n!, n) and their composition table: comp[a, b] = index of
    a o b (apply b first, then a)."""
    perms = np.array(list(itertools.permutations(range(n))), np.int64)
    index = {tuple(p): i for i, p in enumerate(perms)}
    comp = np.empty((len(perms), len(perms)), np.int64)
    for a, pa in enumerate(perms):
        for b, pb in enumerate(perms):
            comp[a, b] = index[tuple(pa[pb])]
    return perms, comp


def compose_prefix(elems: np.ndarray, n: int) -> np.ndarray:
    """Prefix products p_t = g_t o ... o g_1 of permutation indices (k,) -> (k,)."""
    _, comp = permutation_table(n)
    out = np.empty(len(elems), np.int64)
    acc = 0  # index 0 is the identity (itertools yields it first)
    for t, g in enumerate(elems):
        acc = comp[g, acc]
        out[t] = acc
    return out


def word_problem(rng: np.random.Generator, seq_len: int, n: int = 3, min_len: int = 1,
                 max_len: int = 16) -> Dict[str, Any]:
    """Composition of permutations of S_n, episodes packed into seq_len (see module doc).

    Ids: group elements 0 .. n!-1 as inputs, `=` is n!, answers are n! + 1 + index, pad
    2 n! + 1. Needs vocab_size >= 2 n! + 2. Episode lengths k are uniform in [min_len, max_len].
    """
    order = len(permutation_table(n)[0])
    eq, ans0, pad = order, order + 1, 2 * order + 1
    if not 1 <= min_len <= max_len or max_len + 2 > seq_len + 1:
        raise ValueError(f"data.task_args.max_len: need 1 <= min_len <= max_len <= seq_len - 1, got "
                         f"{min_len}, {max_len} for seq_len {seq_len}")
    L = seq_len + 1
    tokens = np.full(L, pad, np.int64)
    mask = np.zeros(seq_len, bool)
    starts = np.zeros(seq_len, bool)
    pos = 0
    while True:
        k = int(rng.integers(min_len, max_len + 1))
        if pos + k + 2 > L:
            break
        g = rng.integers(0, order, size=k)
        starts[pos] = True
        tokens[pos:pos + k] = g
        tokens[pos + k] = eq
        tokens[pos + k + 1] = ans0 + compose_prefix(g, n)[-1]
        mask[pos + k] = True
        pos += k + 2
    if pos < seq_len:
        starts[pos] = True  # the pad tail is its own document
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": starts}


def s3(rng: np.random.Generator, seq_len: int, min_len: int = 1, max_len: int = 16) -> Dict[str, Any]:
    """The S3 word problem (vocab >= 14)."""
    return word_problem(rng, seq_len, 3, min_len, max_len)


def s5(rng: np.random.Generator, seq_len: int, min_len: int = 1, max_len: int = 16) -> Dict[str, Any]:
    """The S5 word problem (vocab >= 242)."""
    return word_problem(rng, seq_len, 5, min_len, max_len)


def selective_copy(rng: np.random.Generator, seq_len: int, vocab_size: int = 16, n: int = 8) -> Dict[str, Any]:
    """n data tokens (2 .. V-1) at random positions among blanks (0), separator 1, then the n
    tokens in order; the input region fills what the answer leaves: seq_len + 1 - (n + 1)."""
    L = seq_len + 1
    region = L - n - 1
    if n < 1 or region < n:
        raise ValueError(f"data.task_args.n: {n} tokens to copy do not fit seq_len {seq_len}")
    if vocab_size < 3:
        raise ValueError(f"data.task_args.vocab_size: selective_copy needs >= 3, got {vocab_size}")
    data = rng.integers(2, vocab_size, size=n)
    tokens = np.zeros(L, np.int64)
    where = np.sort(rng.choice(region, size=n, replace=False))
    tokens[where] = data
    tokens[region] = 1
    tokens[region + 1:] = data
    mask = np.zeros(seq_len, bool)
    mask[region:region + n] = True
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": None}


TASKS = {"mqar": mqar, "s3": s3, "s5": s5, "selective_copy": selective_copy}
for _name, _fn in TASKS.items():
    register_task(_name, _fn)


def task_batch(task: str, task_args: Dict[str, Any], seq_len: int, n: int, seed: int,
               vocab_size: int = 0) -> Dict[str, np.ndarray]:
    """n samples of a registered task with their own seed stream (split id 2: neither the
    loader's train (0) nor val (1) samples): tokens (n, L+1), mask (n, L), starts (n, L)."""
    from llm_lru.data_prep.synthetic import make_sample

    rows: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        rows.append(make_sample(task, rng, seq_len, task_args, vocab_size))
    tokens, mask, starts = (np.stack(x) for x in zip(*rows))
    return {"tokens": tokens, "mask": mask, "starts": starts}
