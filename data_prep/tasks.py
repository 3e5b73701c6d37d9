"""The synthetic tasks' generators (training data for data.source=synthetic, data.task=NAME,
data.task_args={...}; the eval `task` suite scores a checkpoint on fresh samples of its task).
`TASKS` names every one of them; llm_lru.data_prep.synthetic samples them and checks their output.

Every task returns tokens (seq_len + 1,) and a loss mask (seq_len,): input position t predicts
tokens[t + 1], and only the answers are scored.

- `copy`: n random tokens, a separator, the same tokens again (the loader's interface example).

- `mqar` (Zoology, Arora et al. 2023): n key-value pairs, keys from [1, V/2), values from
  [V/2, V), then every key queried once at power-law distributed slots of the rest; 0 fills.
- `s3`, `s5` (permutation composition, the word problem of S_n): episodes g_1 .. g_k `=` p_k with
  p_k = g_k o ... o g_1, one answer per episode; episodes are separate documents, so the
  state resets between them. The answer is never fed back before a fresh episode starts; an
  interleaved g_t p_t stream would let the model read p_{t-1} and make the task one composition.
- `selective_copy` (Gu & Dao 2023): n data tokens at random positions among blanks, a
  separator, then the n tokens in order.
- `word_problem` (group S | A | Z, n): the composition of a sequence of group elements. Layout
  `every` (the paper's, arXiv 2602.12021): one sequence g_1 .. g_L and the prefix product as the
  label of every position (a labelling task: its targets are not the next tokens, see
  llm_lru.data_prep.synthetic); layout `episodes`: the s3/s5 layout above, one answer per episode.
- The MAD suite (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures"),
  vocabularies laid out as there (keys, then values, then noise, special tokens last):
  `in_context_recall` (key-value pairs with a per-sequence map; multi_query: every value of a key
  seen before is scored), `noisy_recall` (the same with noise pairs from their own vocabulary),
  `fuzzy_recall` (keys and values are motifs of 1..k tokens), `compression` (random tokens, a
  compression token, then the tokens again: a recurrent model must hold the whole sequence in its
  state at the compression token), `memorization` (key-value pairs of a map fixed across samples
  by its own seed: the model must learn it in its weights; each key at most once per sample, so
  nothing can be recalled in context).
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any, Dict, Tuple

import numpy as np

MQAR_FILL = 0


def copy_task(rng: np.random.Generator, seq_len: int, vocab_size: int = 16, n: int = 0) -> Dict[str, Any]:
    """Copy: `n` random tokens from 2..vocab_size-1, separator 1, the same tokens again, 0-padded.

    Only the copied half is scored. n=0 takes the largest n that fits: 2n + 1 <= seq_len + 1.
    """
    n = n or seq_len // 2
    if 2 * n + 1 > seq_len + 1 or n < 1:
        raise ValueError(f"data.task_args.n: copy of {n} tokens does not fit seq_len {seq_len}")
    if vocab_size < 3:
        raise ValueError(f"data.task_args.vocab_size: copy needs >= 3, got {vocab_size}")
    x = rng.integers(2, vocab_size, size=n)
    tokens = np.zeros(seq_len + 1, np.int64)
    tokens[:n], tokens[n], tokens[n + 1: 2 * n + 1] = x, 1, x
    mask = np.zeros(seq_len, bool)
    mask[n: 2 * n] = True          # input position t predicts tokens[t+1]: the copy is tokens[n+1 : 2n+1]
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": None}


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


GROUPS = ("S", "A", "Z")


@lru_cache(maxsize=None)
def group_table(group: str, n: int) -> np.ndarray:
    """Composition table comp[a, b] = index of a o b (b first) of S_n, A_n (the even permutations)
    or Z_n (addition mod n); index 0 is the identity."""
    if group not in GROUPS:
        raise ValueError(f"data.task_args.group: unknown group '{group}' (one of {', '.join(GROUPS)})")
    if not 2 <= n <= 6:
        raise ValueError(f"data.task_args.n: group degree must be in 2..6, got {n}")
    if group == "Z":
        idx = np.arange(n)
        return (idx[:, None] + idx[None, :]) % n
    perms, comp = permutation_table(n)
    if group == "S":
        return comp
    inversions = [sum(p[a] > p[b] for a in range(n) for b in range(a + 1, n)) for p in perms]
    even = [i for i, k in enumerate(inversions) if k % 2 == 0]
    where = {g: k for k, g in enumerate(even)}  # itertools lists the identity first: it stays index 0
    return np.array([[where[comp[a, b]] for b in even] for a in even], np.int64)


def _prefix(elems: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """p_t = g_t o ... o g_1 for group-element indices (k,) -> (k,)."""
    out = np.empty(len(elems), np.int64)
    acc = 0  # index 0 is the identity (itertools yields it first)
    for t, g in enumerate(elems):
        acc = comp[g, acc]
        out[t] = acc
    return out


def word_problem(rng: np.random.Generator, seq_len: int, n: int = 3, min_len: int = 1,
                 max_len: int = 16, group: str = "S", layout: str = "every") -> Dict[str, Any]:
    """The word problem of a group (S_n, A_n or Z_n) (see module doc).

    Ids: group elements 0 .. |G|-1 as inputs, `=` is |G|, answers are |G| + 1 + index, pad
    2 |G| + 1. Needs vocab_size >= 2 |G| + 2.
    layout `every`: inputs g_1 .. g_L uniform over G, target of position t the answer id of
    p_t = g_t o ... o g_1, every position scored; tokens[L] is the pad (nothing reads it).
    layout `episodes`: episodes g_1 .. g_k `=` p_k of lengths k uniform in [min_len, max_len],
    each its own document, only the answer scored.
    """
    comp = group_table(group, n)
    order = len(comp)
    eq, ans0, pad = order, order + 1, 2 * order + 1
    L = seq_len + 1
    if layout == "every":
        g = rng.integers(0, order, size=seq_len)
        tokens = np.append(g, pad).astype(np.int64)
        return {"tokens": tokens, "loss_mask": np.ones(seq_len, bool), "doc_starts": None,
                "targets": ans0 + _prefix(g, comp)}
    if layout != "episodes":
        raise ValueError(f"data.task_args.layout: unknown '{layout}' (every or episodes)")
    if not 1 <= min_len <= max_len or max_len + 2 > seq_len + 1:
        raise ValueError(f"data.task_args.max_len: need 1 <= min_len <= max_len <= seq_len - 1, got "
                         f"{min_len}, {max_len} for seq_len {seq_len}")
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
        tokens[pos + k + 1] = ans0 + _prefix(g, comp)[-1]
        mask[pos + k] = True
        pos += k + 2
    if pos < seq_len:
        starts[pos] = True  # the pad tail is its own document
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": starts}


def s3(rng: np.random.Generator, seq_len: int, min_len: int = 1, max_len: int = 16) -> Dict[str, Any]:
    """The S3 word problem in episodes (vocab >= 14)."""
    return word_problem(rng, seq_len, 3, min_len, max_len, "S", "episodes")


def s5(rng: np.random.Generator, seq_len: int, min_len: int = 1, max_len: int = 16) -> Dict[str, Any]:
    """The S5 word problem in episodes (vocab >= 242)."""
    return word_problem(rng, seq_len, 5, min_len, max_len, "S", "episodes")


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


def _kv_vocab(vocab_size: int, specials: int, noise_vocab_size: int, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """MAD's split: keys [0, K), values [K, 2K') of the ids left after noise and special tokens."""
    free = vocab_size - specials - noise_vocab_size
    if free < 2:
        raise ValueError(f"data.task_args.vocab_size: {what} needs vocab_size >= {specials + noise_vocab_size + 2}, "
                         f"got {vocab_size}")
    return np.arange(free // 2), np.arange(free // 2, free)


def in_context_recall(rng: np.random.Generator, seq_len: int, vocab_size: int = 16, multi_query: bool = True,
                      noise_vocab_size: int = 0, frac_noise: float = 0.0) -> Dict[str, Any]:
    """MAD in-context recall: pairs k v with v = map(k), a map drawn per sample (keys may repeat).

    multi_query: every value whose key appeared before is scored (at the key's position).
    Otherwise the sequence ends with the copy token (vocab_size - 1), a key seen before and its
    value, which alone is scored. frac_noise: each pair is two noise tokens instead (ids after the
    values) with that probability. An odd last slot holds one more key, unscored.
    """
    if not 0.0 <= frac_noise < 1.0:
        raise ValueError(f"data.task_args.frac_noise: must be in [0, 1), got {frac_noise}")
    if frac_noise > 0 and noise_vocab_size < 1:
        raise ValueError("data.task_args.noise_vocab_size: must be >= 1 when frac_noise > 0")
    keys, values = _kv_vocab(vocab_size, 0 if multi_query else 1, noise_vocab_size, "in_context_recall")
    noise0 = len(keys) + len(values)
    L = seq_len + 1
    tail = 0 if multi_query else 3
    n_pairs = (L - tail) // 2
    if n_pairs < 1 + (not multi_query):
        raise ValueError(f"train.seq_len: {seq_len} is too short for in_context_recall")
    kv: Dict[int, int] = {}
    tokens = np.empty(L, np.int64)
    mask = np.zeros(seq_len, bool)
    keep = int(rng.integers(n_pairs))  # at least one real pair
    for i in range(n_pairs):
        if frac_noise > 0 and i != keep and rng.random() < frac_noise:
            tokens[2 * i: 2 * i + 2] = noise0 + rng.integers(0, noise_vocab_size, size=2)
            continue
        k = int(rng.choice(keys))
        if k in kv:
            mask[2 * i] = multi_query
        else:
            kv[k] = int(rng.choice(values))
        tokens[2 * i], tokens[2 * i + 1] = k, kv[k]
    at = 2 * n_pairs
    if not multi_query:
        k = int(rng.choice(sorted(kv)))
        tokens[at: at + 3] = vocab_size - 1, k, kv[k]
        mask[at + 1] = True
        at += 3
    if at < L:  # odd length: one more key, its value beyond the sample
        tokens[at] = rng.choice(keys)
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": None}


def noisy_recall(rng: np.random.Generator, seq_len: int, vocab_size: int = 32, multi_query: bool = True,
                 noise_vocab_size: int = 16, frac_noise: float = 0.2) -> Dict[str, Any]:
    """MAD noisy in-context recall: in_context_recall with noise pairs (MAD's defaults)."""
    return in_context_recall(rng, seq_len, vocab_size, multi_query, noise_vocab_size, frac_noise)


def fuzzy_recall(rng: np.random.Generator, seq_len: int, vocab_size: int = 16, k_motif_size: int = 3,
                 v_motif_size: int = 3) -> Dict[str, Any]:
    """MAD fuzzy in-context recall (multi-query): keys are motifs of 1..k_motif_size key tokens,
    values motifs of 1..v_motif_size value tokens, map(key motif) drawn per sample; every token of
    the value of a key motif seen before is scored. Key and value tokens come from disjoint ids, so
    a motif's ends are visible. The pad (vocab_size - 1) fills what the last pair leaves.
    """
    keys, values = _kv_vocab(vocab_size, 1, 0, "fuzzy_recall")
    if k_motif_size < 1 or v_motif_size < 1:
        raise ValueError("data.task_args.k_motif_size: motif sizes must be >= 1")
    pad = vocab_size - 1
    L = seq_len + 1
    tokens = np.full(L, pad, np.int64)
    mask = np.zeros(seq_len, bool)
    kv: Dict[Tuple[int, ...], Tuple[int, ...]] = {}
    at = 0
    while True:
        k = tuple(int(x) for x in rng.choice(keys, size=int(rng.integers(1, k_motif_size + 1))))
        seen = k in kv
        if not seen:
            kv[k] = tuple(int(x) for x in rng.choice(values, size=int(rng.integers(1, v_motif_size + 1))))
        v = kv[k]
        if at + len(k) + len(v) > L:
            break
        tokens[at: at + len(k)] = k
        tokens[at + len(k): at + len(k) + len(v)] = v
        if seen:  # the positions that predict the value's tokens
            mask[at + len(k) - 1: at + len(k) + len(v) - 1] = True
        at += len(k) + len(v)
    if at == 0:
        raise ValueError(f"train.seq_len: {seq_len} is too short for fuzzy_recall")
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": None}


def compression(rng: np.random.Generator, seq_len: int, vocab_size: int = 16, n: int = 0) -> Dict[str, Any]:
    """MAD compression, read out as a language model: n random tokens from [0, V-1), the
    compression token V-1, then the n tokens again, scored. MAD decodes the sequence from the
    compression token's output alone; here the reconstruction is read token by token after it, so a
    recurrent model must hold all n tokens in its state at the compression token.
    n=0: the largest n that fits (2n + 1 <= seq_len + 1); the rest is the compression token.
    """
    n = n or seq_len // 2
    if n < 1 or 2 * n + 1 > seq_len + 1:
        raise ValueError(f"data.task_args.n: compression of {n} tokens does not fit seq_len {seq_len}")
    if vocab_size < 2:
        raise ValueError(f"data.task_args.vocab_size: compression needs >= 2, got {vocab_size}")
    x = rng.integers(0, vocab_size - 1, size=n)
    tokens = np.full(seq_len + 1, vocab_size - 1, np.int64)
    tokens[:n], tokens[n + 1: 2 * n + 1] = x, x
    mask = np.zeros(seq_len, bool)
    mask[n: 2 * n] = True
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": None}


@lru_cache(maxsize=16)
def memorization_map(vocab_size: int, seed: int) -> np.ndarray:
    """The fixed key -> value map of `memorization`: value ids of keys 0 .. V/2 - 1 (a bijection
    onto [V/2, 2 (V/2)) drawn from `seed` alone, the same for every sample)."""
    keys, values = _kv_vocab(vocab_size, 0, 0, "memorization")
    return np.random.default_rng(seed).permutation(values[: len(keys)])


def memorization(rng: np.random.Generator, seq_len: int, vocab_size: int = 256,
                 kv_map_seed: int = 12345) -> Dict[str, Any]:
    """MAD memorization: pairs k v with v = map(k) for a map fixed across samples
    (memorization_map); every value is scored. Each key appears at most once in the scored pairs,
    so no value can be read from the context: the map must be learned in the weights. An odd last
    slot holds one more key (any), unscored.
    """
    vmap = memorization_map(vocab_size, kv_map_seed)
    L = seq_len + 1
    n_pairs = L // 2
    if n_pairs > len(vmap):
        raise ValueError(f"data.task_args.vocab_size: memorization at seq_len {seq_len} needs {n_pairs} distinct "
                         f"keys (vocab_size >= {2 * n_pairs}), got {vocab_size}")
    keys = rng.permutation(len(vmap))[:n_pairs]
    tokens = np.empty(L, np.int64)
    tokens[0: 2 * n_pairs: 2], tokens[1: 2 * n_pairs: 2] = keys, vmap[keys]
    if L % 2:
        tokens[-1] = rng.integers(len(vmap))
    mask = np.zeros(seq_len, bool)
    mask[0: 2 * n_pairs: 2] = True
    return {"tokens": tokens, "loss_mask": mask, "doc_starts": None}


# Every generator by its data.task name. `register_task` (synthetic.py) adds a caller's own, by an
# explicit call: nothing here registers itself on import.
TASKS = {"copy": copy_task, "mqar": mqar, "s3": s3, "s5": s5, "selective_copy": selective_copy,
         "word_problem": word_problem, "in_context_recall": in_context_recall, "noisy_recall": noisy_recall,
         "fuzzy_recall": fuzzy_recall, "compression": compression, "memorization": memorization}
