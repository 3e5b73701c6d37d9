"""`niah`: RULER-style synthetic retrieval (Hsieh et al. 2024), built with the model's tokenizer.

Tasks (eval.niah_tasks):
- single:     one needle "One of the special magic numbers for KEY is: VALUE." in the haystack;
- multikey:   the same, among needles for 3 other keys (distractors);
- multivalue: 4 needles with the same key and different values; all values asked for;
- multiquery: 4 needles with different keys; all of them asked for;
- vt:         variable tracking: VAR X1 = 12345. VAR X2 = X1. ... (4 hops) in the haystack;
              name every variable holding the value;
- cwe:        common-word extraction: a numbered list of words where 10 words repeat often
              and the rest rarely; name the 10 common ones (the list is the haystack).
Score (RULER string_match_all): the fraction of the expected strings found in the greedy answer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from .common import answer, line_plot, need_tokenizer, progress, table
from .haystack import assemble, make_haystack, pseudo_words

NEEDLE = " One of the special magic numbers for {key} is: {value}."
Q_ONE = " What is the special magic number for {key} mentioned in the provided text? The special magic number for {key} mentioned in the provided text is"
Q_VALUES = " What are all the special magic numbers for {key} mentioned in the provided text? The special magic numbers for {key} mentioned in the provided text are"
Q_KEYS = " What are all the special magic numbers for {keys} mentioned in the provided text? The special magic numbers for {keys} mentioned in the provided text are"
PREFIX = " Some special magic numbers are hidden within the following text. Make sure to memorize them. I will quiz you about the numbers afterwards."
VT_PREFIX = " Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_Q = (" Question: Find all variables that are assigned the value {value} in the text above. Answer: According to the "
        "chain(s) of variable assignment in the text above, {n} variables are assigned the value {value}, they are:")
CWE_PREFIX = " Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often."
CWE_Q = " Question: What are the {n} most common words in the above list? Answer: The top {n} words that appear most often in the list are:"
TASKS = ("single", "multikey", "multivalue", "multiquery", "vt", "cwe")


def _value(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))  # 7 digits, as RULER


def _var(rng) -> str:
    return "".join(chr(65 + int(c)) for c in rng.integers(0, 26, size=5))


def build(task: str, tok, hay, length: int, rng) -> Tuple[List[int], List[str]]:
    """(prompt ids of `length` tokens or None, expected answer strings) for one sample."""
    words = pseudo_words(64, int(rng.integers(1 << 30)))
    bos = [tok.bos_id]
    enc = tok.encode
    filler = hay.tokens(length, int(rng.integers(len(hay.ids))))
    if task in ("single", "multikey", "multivalue", "multiquery"):
        n = {"single": 1, "multikey": 4, "multivalue": 4, "multiquery": 4}[task]
        keys = words[:n] if task != "multivalue" else [words[0]] * n
        values = [_value(rng) for _ in range(n)]
        needles = [enc(NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
        if task in ("single", "multikey"):
            q, refs = Q_ONE.format(key=keys[0]), [values[0]]
        elif task == "multivalue":
            q, refs = Q_VALUES.format(key=keys[0]), values
        else:
            q, refs = Q_KEYS.format(keys=", ".join(keys)), values
        depths = list(rng.uniform(0, 1, size=n))
        return assemble(length, bos + enc(PREFIX), filler, needles, depths, enc(q)), refs
    if task == "vt":
        hops, value = 4, str(int(rng.integers(10000, 100000)))
        names = []
        while len(names) < hops + 1:
            v = _var(rng)
            if v not in names:
                names.append(v)
        stmts = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
        depths = sorted(rng.uniform(0, 1, size=len(stmts)))  # in order: each reads an earlier one
        return (assemble(length, bos + enc(VT_PREFIX), filler, [enc(s) for s in stmts], depths,
                         enc(VT_Q.format(value=value, n=len(names)))), names)
    if task == "cwe":
        return _cwe(tok, length, rng)
    raise ValueError(f"eval.niah_tasks: unknown task '{task}' (one of {', '.join(TASKS)})")


def _cwe(tok, length: int, rng, n_common: int = 10, f_common: int = 30, f_rare: int = 3):
    """The word list sized to `length` tokens: common words f_common times (fewer if the length
    is short, down to 2 with rare words then seen once), rare words to fill the rest."""
    enc = tok.encode
    head, q = [tok.bos_id] + enc(CWE_PREFIX), enc(CWE_Q.format(n=n_common))
    vocab = pseudo_words(4096 + n_common, int(rng.integers(1 << 30)), syllables=(2, 4))
    common, rare = vocab[:n_common], vocab[n_common:]
    per_word = max(1, len(enc(" 100. " + common[0])))
    budget = max(0, length - len(head) - len(q)) // per_word  # words that fit, roughly
    fc = min(f_common, max(2, budget // (2 * n_common)))
    fr = min(f_rare, max(1, fc - 1))
    n_rare = max(0, (budget - fc * n_common) // fr)
    items = common * fc + [w for w in rare[:n_rare] for _ in range(fr)]
    items = [items[i] for i in rng.permutation(len(items))]
    body: List[int] = []
    for i, w in enumerate(items):
        piece = enc(f" {i + 1}. {w}")
        if len(head) + len(body) + len(piece) + len(q) > length:
            break
        body += piece
    if len(head) + len(body) + len(q) > length:
        return None, common
    pad = length - len(head) - len(body) - len(q)
    return head + body + _pad(tok, pad) + q, common


def _pad(tok, n: int) -> List[int]:
    # A few spaces close the gap to the exact length (a space is one token in byte-level BPEs).
    sp = tok.encode(" ")
    return (sp * n)[:n] if sp else []


def score(text: str, refs: List[str]) -> float:
    """RULER string_match_all: the fraction of refs that occur in the answer."""
    return sum(r.lower() in text.lower() for r in refs) / len(refs)


def run(target, ecfg, out: Path) -> Dict[str, Any]:
    """Mean score per task and length (ecfg.niah_*), capped by ecfg.max_length."""
    tok = need_tokenizer(target, "niah")
    for t in ecfg.niah_tasks:
        if t not in TASKS:
            raise ValueError(f"eval.niah_tasks: unknown task '{t}' (one of {', '.join(TASKS)})")
    lengths = [L for L in ecfg.niah_lengths if not ecfg.max_length or L <= ecfg.max_length]
    hay = make_haystack(ecfg.haystack, tok, target.cfg, max(lengths, default=1), ecfg.seed)
    rng = np.random.default_rng([ecfg.seed, 202])
    bar = progress(len(ecfg.niah_tasks) * len(lengths) * ecfg.niah_trials, "niah",
                   ecfg.progress and target.is_main)
    rows, series, metrics = [], {}, {}
    for task in ecfg.niah_tasks:
        for L in lengths:
            scores = []
            for _ in range(ecfg.niah_trials):
                ids, refs = build(task, tok, hay, L, rng)
                bar.update(1)
                if ids is None:
                    continue
                max_new = len(tok.encode(" " + ", ".join(refs))) + 8
                got = tok.decode(answer(target.model, ids, ecfg.chunk_size, max_new, [tok.eos_id], target.mesh))
                scores.append(score(got, refs))
            acc = float(np.mean(scores)) if scores else None
            rows.append([task, L, len(scores), acc])
            series.setdefault(task, []).append((L, acc))
            metrics[f"{task}@{L}"] = acc
    bar.close()
    for task in ecfg.niah_tasks:
        vals = [a for _, a in series.get(task, []) if a is not None]
        metrics[task] = float(np.mean(vals)) if vals else None
    plot = "niah.png"
    if target.is_main:  # under SP, rank 0 alone writes
        line_plot(out / plot, series, "RULER-style NIAH accuracy by length", "length (tokens)", "score",
                  logx=True, vline=target.train_len or None, vlabel="train length")
    return {"suite": "niah", "metrics": metrics,
            "tables": [table("niah score by task and length", ["task", "length", "samples", "score"], rows)],
            "plots": [plot], "settings": {"tasks": list(ecfg.niah_tasks), "lengths": lengths,
                                          "trials": ecfg.niah_trials, "haystack": hay.name,
                                          "train_len": target.train_len}}
