"""Haystack text and prompt assembly for the long-context suites (passkey, niah).

Prompts are assembled from token lists, not by re-tokenising long strings: the filler/haystack
is tokenised once, cut to the exact token count a length needs, and needles are spliced in at
token offsets (their own tokenisation kept whole).

Haystack sources (eval.haystack):
- "data": held-out (validation split) tokens of the run's own data, documents joined;
- "fallback" (also what "auto" falls back to): seeded generated sentences over pseudo-words;
- a path to a text file.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_CONS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def pseudo_words(n: int, seed: int = 0, syllables=(2, 3)) -> List[str]:
    """n distinct pronounceable pseudo-words (consonant-vowel syllables), seeded."""
    rng = np.random.default_rng([seed, 17])
    out, seen = [], set()
    while len(out) < n:
        k = int(rng.integers(syllables[0], syllables[1] + 1))
        w = "".join(_CONS[rng.integers(len(_CONS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(k))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def fallback_text(n_chars: int, seed: int = 0) -> str:
    """Seeded sentences of 6-14 pseudo-words: a neutral haystack that any tokenizer can read."""
    rng = np.random.default_rng([seed, 23])
    words = pseudo_words(400, seed)
    parts, total = [], 0
    while total < n_chars:
        k = int(rng.integers(6, 15))
        s = " ".join(words[i] for i in rng.integers(0, len(words), size=k))
        s = " " + s[0].upper() + s[1:] + "."
        parts.append(s)
        total += len(s)
    return "".join(parts)


class Haystack:
    """A token stream to cut fillers from: tokens(n, offset) -> list of n ids (wrapping around)."""

    def __init__(self, ids: Sequence[int], name: str):
        if len(ids) == 0:
            raise ValueError(f"haystack '{name}' is empty")
        self.ids = np.asarray(ids, np.int64)
        self.name = name

    def tokens(self, n: int, offset: int = 0) -> List[int]:
        if n <= 0:
            return []
        reps = (offset % len(self.ids) + n) // len(self.ids) + 1
        return np.tile(self.ids, reps)[offset % len(self.ids): offset % len(self.ids) + n].tolist()


def text_haystack(tok, text: str, name: str) -> Haystack:
    return Haystack(tok.encode(text), name)


def data_haystack(cfg, n_tokens: int, eos_id: Optional[int]) -> Haystack:
    """Validation-split tokens of the run's data (documents joined, EOS dropped)."""
    from llm_lru.data_prep import build_loader

    loader = build_loader(cfg, split="val", batch_size=1)
    got: List[int] = []
    for i, batch in enumerate(loader):
        ids = batch["input_ids"][0].tolist()
        got.extend(t for t in ids if t != eos_id)
        if len(got) >= n_tokens or i + 1 >= max(1, loader.steps_per_epoch):
            break
    return Haystack(got, "data (validation split)")


def make_haystack(spec: str, tok, cfg, n_tokens: int, seed: int = 0) -> Haystack:
    """The haystack per eval.haystack (see the module doc); n_tokens is a size hint."""
    if spec in ("", "auto"):
        if cfg is not None and cfg.data.source == "shards" and cfg.data.path:
            try:
                return data_haystack(cfg, n_tokens, getattr(tok, "eos_id", None))
            except (ValueError, OSError):
                pass  # no readable validation data: the generated text serves
        spec = "fallback"
    if spec == "data":
        if cfg is None or cfg.data.source != "shards":
            raise ValueError("eval.haystack: 'data' needs a run whose data.source is shards")
        return data_haystack(cfg, n_tokens, getattr(tok, "eos_id", None))
    if spec == "fallback":
        # ~4 chars per token is generous for BPE; bytes tokenizers get 1 char per token.
        text = fallback_text(min(4 * n_tokens, 1 << 20) + 1000, seed)
        return text_haystack(tok, text, "fallback (generated)")
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"eval.haystack: '{spec}' is not auto, data, fallback or a text file")
    return text_haystack(tok, p.read_text(errors="replace"), str(p))


def assemble(length: int, prefix: List[int], filler: List[int], needles: List[List[int]],
             depths: List[float], question: List[int]) -> Optional[List[int]]:
    """prefix + filler with needles spliced in at fractional depths + question, exactly `length`
    ids (None if the fixed parts alone exceed it). Needles keep the order of their depths."""
    fixed = len(prefix) + sum(map(len, needles)) + len(question)
    n_fill = length - fixed
    if n_fill < 0:
        return None
    fill = filler[:n_fill]
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    out, cur = list(prefix), 0
    for i in order:
        cut = max(cur, min(n_fill, int(round(depths[i] * n_fill))))
        out += fill[cur:cut] + needles[i]
        cur = cut
    out += fill[cur:] + question
    return out
