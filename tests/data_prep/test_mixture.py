"""Weighted mixtures (data.sources): the realised mixture against the weights, per-source epochs,
exact resume (also at another dp and worker count), disjoint dp ranks, the config and its errors.
References: each source's shards read directly, the uninterrupted stream, the dp = 1 stream."""
import itertools
import math
from collections import Counter
from pathlib import Path

import pytest

from llm_lru.config import ConfigError, from_dict, load_config
from llm_lru.data_prep import build_loader
from llm_lru.data_prep.mixture import source_tokens
from llm_lru.data_prep.prep import PrepConfig, run_prep
from tests.data_prep.conftest import write_corpus
from tests.data_prep.test_loader import reference_rows, rows_of


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two byte-tokenized preps of different corpora (seq_len 32, ~150 train samples each, val splits)."""
    root = tmp_path_factory.mktemp("mix")
    for name, seed in (("web", 0), ("code", 1)):
        write_corpus(root / f"corpus_{name}", seed=seed)
        run_prep(PrepConfig(inputs=[str(root / f"corpus_{name}")], tokenizer="bytes", seq_len=32, shard_size=10,
                            val_fraction=0.2), root / name, workers=1, progress=False)
    rows = {name: reference_rows(root / name) for name in ("web", "code")}
    assert not set(rows["web"]) & set(rows["code"]), "the test sources must not share a sample"
    return root, rows


def mix_cfg(root, weights=(3.0, 1.0), gbs=8, workers=2, **data):
    return from_dict({"data": {"sources": [{"path": str(root / "web"), "weight": weights[0]},
                                           {"path": str(root / "code"), "weight": weights[1]}],
                               "num_workers": workers, "shuffle_buffer": 16, **data},
                      "train": {"seq_len": 32, "global_batch_size": gbs, "seed": 11}})


def stream(loader, n):
    return [r for b in itertools.islice(iter(loader), n) for r in rows_of(b)]


def which(rows, refs):
    web = set(refs["web"])
    return ["web" if r in web else "code" for r in rows]


def test_realised_mixture_within_binomial_tolerance_and_sources_restart_their_epochs(two_sources):
    root, refs = two_sources
    loader = build_loader(mix_cfg(root), dp_rank=0, dp_size=1)
    rows = stream(loader, 250)                        # 2000 samples: each source goes round many times
    labels = which(rows, refs)
    n, p = len(rows), 3 / 4
    assert abs(labels.count("web") / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    # The state counts exactly what was taken: tokens per source in metrics.jsonl come from it.
    state = loader.state_dict()
    assert {s["name"]: s["position"] for s in state["sources"]} == dict(Counter(labels))
    assert source_tokens(state) == {f"tokens/{k}": v * 32 for k, v in Counter(labels).items()}
    # Each source on its own: every one of its samples once per epoch of its own, then again.
    for name in ("web", "code"):
        mine = [r for r, lab in zip(rows, labels) if lab == name]
        size = len(refs[name])
        epochs = [mine[e * size:(e + 1) * size] for e in range(len(mine) // size)]
        assert len(epochs) >= 2
        assert all(sorted(ep) == sorted(refs[name]) for ep in epochs)
        assert epochs[0] != epochs[1]                 # reshuffled per epoch
    notes = loader.take_notes()
    assert any("data source 'code'" in t and "now in its epoch" in t for t in notes)
    assert loader.take_notes() == []


def test_resume_mid_mixture_gives_the_uninterrupted_sequence(two_sources):
    root, _ = two_sources
    ref = stream(build_loader(mix_cfg(root, workers=2)), 60)
    first = build_loader(mix_cfg(root, workers=2))
    head = stream(first, 37)
    state = first.state_dict()
    # Resumed with another worker count and at dp = 2 (micro batches of 4 per rank).
    again = build_loader(mix_cfg(root, workers=1))
    again.load_state_dict(state)
    assert head + stream(again, 23) == ref
    halves = []
    for r in range(2):
        ld = build_loader(mix_cfg(root, workers=2), dp_rank=r, dp_size=2)
        ld.load_state_dict(state)
        halves.append([rows_of(b) for b in itertools.islice(iter(ld), 23)])
    assert [row for a, b in zip(*halves) for row in a + b] == ref[len(head):]


def test_dp2_ranks_see_disjoint_samples_that_make_up_the_dp1_stream(two_sources):
    root, refs = two_sources
    ranks = [[rows_of(b) for b in itertools.islice(iter(build_loader(mix_cfg(root), dp_rank=r, dp_size=2)), 12)]
             for r in range(2)]
    seen = [set(r for b in batches for r in b) for batches in ranks]
    assert not seen[0] & seen[1]
    # 96 samples: fewer than either source holds, so no sample may come twice within a rank either
    assert sum(len(s) for s in seen) == 96
    one = stream(build_loader(mix_cfg(root)), 12)
    assert [row for a, b in zip(*ranks) for row in a + b] == one


def test_weights_may_change_on_resume_sources_continue(two_sources):
    root, refs = two_sources
    first = build_loader(mix_cfg(root, weights=(1.0, 1.0)))
    stream(first, 10)
    state = first.state_dict()
    later = build_loader(mix_cfg(root, weights=(1.0, 0.0001)))
    later.load_state_dict(state)
    rows = stream(later, 5)
    at = {s["name"]: s["position"] for s in state["sources"]}
    web = [r for r in rows if r in set(refs["web"])]
    assert len(web) >= 38                                        # nearly all from web now
    # web continues from its own position: its next samples are those an uninterrupted 1:1 run's
    # web would have taken next (the source order does not depend on the weights)
    plain = build_loader(mix_cfg(root, weights=(1.0, 0.0001)))
    all_web = [r for r in stream(plain, 12) if r in set(refs["web"])]
    assert web == all_web[at["web"]:at["web"] + len(web)]


def test_validation_mixes_each_sources_val_split(two_sources):
    root, refs = two_sources
    cfg = mix_cfg(root)
    from llm_lru.data_prep.sources import has_val_split

    assert has_val_split(cfg)
    val = build_loader(cfg, split="val")
    rows = stream(val, 10)
    vals = {name: set(reference_rows(root / name, split="val")) for name in ("web", "code")}
    assert set(rows) <= vals["web"] | vals["code"] and set(rows) & vals["web"] and set(rows) & vals["code"]
    val.load_state_dict({**val.state_dict(), "step": 0, "position": 0})   # the trainer's rewind
    assert stream(val, 10) == rows


def test_mismatched_sources_are_an_error_naming_both(two_sources, tmp_path):
    root, _ = two_sources
    run_prep(PrepConfig(inputs=[str(root / "corpus_web")], tokenizer="bpe:300", seq_len=32, shard_size=10),
             tmp_path / "bpe", workers=1, progress=False)
    run_prep(PrepConfig(inputs=[str(root / "corpus_web")], tokenizer="bytes", seq_len=16, shard_size=10),
             tmp_path / "short", workers=1, progress=False)
    for other, what in (("bpe", "different tokenizers"), ("short", "seq_len")):
        cfg = from_dict({"data": {"sources": [{"path": str(root / "web")}, {"path": str(tmp_path / other)}]},
                         "train": {"seq_len": 32, "global_batch_size": 8}})
        with pytest.raises(ValueError, match=what) as e:
            build_loader(cfg)
        assert f"'web' ({root / 'web'})" in str(e.value) and f"'{other}' ({tmp_path / other})" in str(e.value)


def test_resume_refuses_other_sources(two_sources):
    root, _ = two_sources
    first = build_loader(mix_cfg(root))
    stream(first, 2)
    cfg = from_dict({"data": {"sources": [{"path": str(root / "web")}]}, "train": {"seq_len": 32, "global_batch_size": 8}})
    with pytest.raises(ValueError, match="not the sources"):
        build_loader(cfg).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="mixture"):
        build_loader(from_dict({"data": {"path": str(root / "web")}, "train": {"seq_len": 32, "global_batch_size": 8}})
                     ).load_state_dict(first.state_dict())


def test_sources_from_a_config_file_and_their_errors(tmp_path):
    f = tmp_path / "mix.yaml"
    f.write_text("data:\n  sources:\n    - {path: data/web, weight: 0.7}\n"
                 "    - {path: data/code, weight: 0.3, name: code, val_path: data/code-val}\n")
    d = load_config(f).data
    assert [(s.path, s.weight, s.name, s.val_path) for s in d.sources] == [
        ("data/web", 0.7, "", ""), ("data/code", 0.3, "code", "data/code-val")]
    two = "data.sources=[{path: data/web, weight: 0.7}, {path: data/code, weight: %s, name: %s}]"
    for over, key in ((["data.path=x"], "data.sources"), ([two % (0, "code")], "data.sources[1].weight"),
                      ([two % (1, "web")], "two sources named 'web'"), (["data.sources.1.weight=0"], "overridden whole"),
                      (["data.sources=[{path: a, wieght: 1}]"], "unknown key 'wieght'")):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
            load_config(f, over)
