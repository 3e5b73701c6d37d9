"""Tiny corpora written by the tests, and preps of them shared by the data_prep tests."""
import gzip
import json
import os
import random
from pathlib import Path

import pytest

from llm_lru.data_prep.prep import PrepConfig, run_prep

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho sigma tau".split()


def random_text(rng: random.Random, n_words: int) -> str:
    # Non-ASCII characters on purpose: the byte tokenizer must round-trip UTF-8.
    return " ".join(rng.choice(WORDS + ["héllo", "wörld", "日本"]) for _ in range(n_words)) + "\n"


def write_corpus(root: Path, seed: int = 0, n_files: int = 12):
    """Files of every supported kind; returns the documents in prep's order (sorted paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(n_files):
        ext = [".txt", ".md", ".py"][i % 3]
        text = random_text(rng, rng.randint(5, 120))
        (root / f"f{i:02d}{ext}").write_text(text, encoding="utf-8")
        docs[os.path.abspath(root / f"f{i:02d}{ext}")] = [text]
    lines = [random_text(rng, rng.randint(3, 40)) for _ in range(6)]
    (root / "g.jsonl").write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(lines)))
    docs[os.path.abspath(root / "g.jsonl")] = lines
    gz = [random_text(rng, 20) for _ in range(3)]
    with gzip.open(root / "h.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in gz))
    docs[os.path.abspath(root / "h.jsonl.gz")] = gz
    pq_docs = [random_text(rng, 30) for _ in range(4)]
    pq.write_table(pa.table({"text": pq_docs}), root / "p.parquet")
    docs[os.path.abspath(root / "p.parquet")] = pq_docs
    return [d for path in sorted(docs) for d in docs[path]]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(root / "c")
    return root / "c", docs


@pytest.fixture(scope="session")
def small_prep(corpus_dir, tmp_path_factory):
    """bytes tokenizer, seq_len 32, 10 samples per shard (uneven last shard)."""
    out = tmp_path_factory.mktemp("prep") / "small"
    cfg = PrepConfig(inputs=[str(corpus_dir[0])], tokenizer="bytes", seq_len=32, shard_size=10)
    run_prep(cfg, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def stdlib_prep(tmp_path_factory):
    """~1 MB of the python-stdlib corpus, seq_len 128, 10% validation, 2 workers."""
    out = tmp_path_factory.mktemp("prep") / "stdlib"
    cfg = PrepConfig(corpus="python-stdlib", tokenizer="bytes", seq_len=128, shard_size=500,
                     val_fraction=0.1, max_bytes=1 << 20)
    run_prep(cfg, out, workers=2, progress=False)
    return out
