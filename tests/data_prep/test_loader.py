"""The loader: exactly-once epochs over ranks x workers, SP slices, exact resume, bad shards,
random and synthetic sources. References: the shards read directly, the sp=1 batch, the
uninterrupted stream."""
import itertools
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_lru.config import from_dict
from llm_lru.data_prep import build_loader, read_manifest, register_task
from llm_lru.data_prep.prep import PrepConfig, run_prep
from llm_lru.data_prep.shards import read_samples
from tests.distributed import run_world


def cfg_for(path, seq_len=32, gbs=8, workers=2, **data):
    return from_dict({"data": {"source": "shards", "path": str(path), "num_workers": workers,
                               "shuffle_buffer": 8, **data},
                      "train": {"seq_len": seq_len, "global_batch_size": gbs, "seed": 7}})


def reference_rows(path, split="train"):
    m = read_manifest(path)
    rows = [tuple(t.tolist()) for sh in m["splits"][split]["shards"]
            for t, _ in read_samples(str(Path(path) / sh["name"]), m["seq_len"], dtype=m["dtype"])]
    assert len(set(rows)) == len(rows), "test corpus must have distinct samples"
    return rows


def rows_of(batch):
    """Full L+1 token rows back from a batch (inputs plus the last label)."""
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


@pytest.fixture(scope="module")
def one_shard(corpus_dir, tmp_path_factory):
    """All samples in a single shard: fewer shards than ranks x workers."""
    out = tmp_path_factory.mktemp("prep") / "one"
    run_prep(PrepConfig(inputs=[str(corpus_dir[0])], seq_len=32, shard_size=100000), out, progress=False)
    return out


def check_epochs(path, per_rank_rows, dp, B, epochs):
    """per_rank_rows[rank][step] = the rows of that batch."""
    ref = set(reference_rows(path))
    steps = len(per_rank_rows[0]) // epochs
    orders = []
    for e in range(epochs):
        seen = [r for batches in per_rank_rows for b in batches[e * steps:(e + 1) * steps] for r in b]
        dup = [r for r, c in Counter(seen).items() if c > 1]
        assert not dup, f"epoch {e}: {len(dup)} samples seen twice"
        assert set(seen) <= ref
        assert len(seen) == steps * dp * B and len(ref) - len(seen) < dp * B   # only the remainder is left out
        orders.append(seen)
    return orders


@pytest.mark.parametrize("which", ["small_prep", "one_shard"])
def test_each_sample_once_per_epoch_2_ranks_2_workers(which, request):
    path = request.getfixturevalue(which)
    cfg = cfg_for(path, gbs=8, workers=2)
    loaders = [build_loader(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    steps = loaders[0].steps_per_epoch
    assert steps == loaders[1].steps_per_epoch and steps >= 2
    batches = [take(ld, 2 * steps) for ld in loaders]
    o0, o1 = check_epochs(path, [[rows_of(b) for b in bs] for bs in batches], dp=2, B=4, epochs=2)
    assert o0 != o1                                      # reshuffled per epoch
    assert all(b["input_ids"].shape == (4, 32) for bs in batches for b in bs)


def _rank_epoch(rank, world, path):
    # Under a real process group webdataset's default node splitter would raise; ours must not.
    import torch.distributed as dist
    assert dist.is_initialized() and dist.get_world_size() == 2
    ld = build_loader(cfg_for(path, workers=2), dp_rank=rank, dp_size=world)
    return [rows_of(b) for b in take(ld, ld.steps_per_epoch)]   # plain lists: no tensors over the queue


@pytest.mark.slow   # ~30-50 s of process start-up on this 2-core machine
def test_real_process_group_two_ranks(one_shard):
    per_rank = run_world(_rank_epoch, 2, str(one_shard))
    check_epochs(one_shard, per_rank, dp=2, B=4, epochs=1)


def test_webdataset_default_pitfalls_are_avoided(one_shard, monkeypatch):
    """With several ranks in the environment and one shard for 2 ranks x 2 workers, webdataset's
    defaults raise (node splitter) or starve a worker and fail its empty check; ours reads every
    sample once. The controls show the test reproduces both conditions."""
    import webdataset as wds
    url = str(one_shard / "shard-000000.tar")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError):                      # control: default nodesplitter
        next(iter(wds.WebDataset([url], shardshuffle=False)))
    # control: 1 shard over 2 ranks x 2 workers; webdataset reads the worker from WORKER/NUM_WORKERS
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORKER", "1")
    monkeypatch.setenv("NUM_WORKERS", "2")
    default = wds.WebDataset([url], shardshuffle=False, nodesplitter=wds.split_by_node)
    with pytest.raises(ValueError, match="No samples"):
        next(iter(default))
    monkeypatch.delenv("WORKER")
    monkeypatch.delenv("NUM_WORKERS")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = cfg_for(one_shard, workers=2)
    loaders = [build_loader(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    rows = [[rows_of(b) for b in take(ld, ld.steps_per_epoch)] for ld in loaders]
    check_epochs(one_shard, rows, dp=2, B=4, epochs=1)


def test_sp_ranks_get_contiguous_slices_of_the_same_samples(small_prep):
    cfg = cfg_for(small_prep, workers=0)
    full = take(build_loader(cfg, dp_rank=1, dp_size=2), 5)
    for sp in (2, 4):
        parts = [take(build_loader(cfg, dp_rank=1, dp_size=2, sp_rank=r, sp_size=sp), 5) for r in range(sp)]
        for i in range(5):
            for k in ("input_ids", "labels", "doc_start"):
                assert parts[0][i][k].shape == (4, 32 // sp)
                assert torch.equal(torch.cat([p[i][k] for p in parts], dim=1), full[i][k])
    with pytest.raises(ValueError, match="train.seq_len"):
        build_loader(cfg, sp_rank=0, sp_size=3)


@pytest.mark.parametrize("stop", ["mid_epoch", "next_epoch"])
def test_resume_gives_the_identical_remaining_stream(small_prep, stop):
    cfg = cfg_for(small_prep, workers=2)
    ref_loader = build_loader(cfg, dp_rank=1, dp_size=2)
    steps = ref_loader.steps_per_epoch
    k = steps // 2 + 1 if stop == "mid_epoch" else steps + 2
    ref = take(ref_loader, k + steps)                    # crosses an epoch boundary after k
    first = build_loader(cfg, dp_rank=1, dp_size=2)
    got = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))   # what a checkpoint stores
    assert state["step"] == k and state["epoch"] == k // steps
    resumed = build_loader(cfg, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    got += take(resumed, steps)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_at_another_worker_count_or_dp_size_and_guard(small_prep):
    a = take(build_loader(cfg_for(small_prep, workers=0)), 6)
    b = take(build_loader(cfg_for(small_prep, workers=1)), 6)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    ld = build_loader(cfg_for(small_prep, workers=1))
    take(ld, 3)
    other = build_loader(cfg_for(small_prep, workers=2))     # the plan does not depend on W
    other.load_state_dict(ld.state_dict())
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(take(other, 3), a[3:]))
    # dp 1 -> 2: the two ranks' next batches are the rows the one rank would have read next.
    halves = []
    for r in range(2):
        two = build_loader(cfg_for(small_prep, workers=0), dp_rank=r, dp_size=2)
        two.load_state_dict(ld.state_dict())
        halves.append(take(two, 1)[0]["input_ids"])
    assert torch.equal(torch.cat(halves), a[3]["input_ids"])
    with pytest.raises(ValueError, match="global_batch"):
        build_loader(cfg_for(small_prep, gbs=2)).load_state_dict(ld.state_dict())


def test_doc_start_marks_first_tokens(small_prep):
    m = read_manifest(small_prep)
    eos = m["tokenizer"]["eos_id"]
    batches = take(build_loader(cfg_for(small_prep, workers=0), dp_size=1), 10)
    ref = {tuple(t.tolist()): s for sh in m["splits"]["train"]["shards"]
           for t, s in read_samples(str(small_prep / sh["name"]), 32, dtype=m["dtype"])}
    n_true = 0
    for b in batches:
        ids, ds = b["input_ids"], b["doc_start"]
        # Documents are joined as doc EOS doc ...: a document starts right after each EOS.
        assert torch.equal(ds[:, 1:], ids[:, :-1] == eos)
        for row, d in zip(rows_of(b), ds):
            assert bool(d[0]) == (0 in ref[row].tolist())
        assert (b["labels"] != -100).all()
        n_true += int(ds.sum())
    assert n_true > 0


def test_corrupted_shard_is_named_or_skipped(small_prep, tmp_path, caplog):
    path = tmp_path / "copy"
    shutil.copytree(small_prep, path)
    bad = path / "shard-000003.tar"
    data = bytearray(bad.read_bytes())
    data[600] ^= 0xFF
    bad.write_bytes(bytes(data))
    for workers in (0, 2):
        ld = build_loader(cfg_for(path, workers=workers), dp_size=1)
        with pytest.raises(Exception, match="shard-000003.tar"):
            take(ld, ld.steps_per_epoch)
    ld = build_loader(cfg_for(path, workers=0, skip_bad_shards=True), dp_size=1)
    with caplog.at_level(logging.WARNING, logger="llm_lru.data"):
        batches = take(ld, ld.steps_per_epoch)
    assert "shard-000003.tar" in caplog.text
    ref = set(reference_rows(small_prep))
    bad_rows = set(tuple(t.tolist()) for t, _ in read_samples(str(small_prep / "shard-000003.tar"), 32))
    masked = sum(int((b["labels"] == -100).all(dim=1).sum()) for b in batches)
    good = [r for b in batches for r, lab in zip(rows_of(b), b["labels"]) if (lab != -100).any()]
    assert set(good) <= ref - bad_rows and len(set(good)) == len(good)
    assert len(bad_rows) - ld.dropped_per_epoch <= masked <= len(bad_rows) and masked > 0


def test_val_split_is_in_order_and_val_path(stdlib_prep, small_prep):
    cfg = cfg_for(stdlib_prep, seq_len=128, gbs=4, workers=0)
    ref = reference_rows(stdlib_prep, "val")
    got = [r for b in take(build_loader(cfg, split="val"), 5) for r in rows_of(b)]
    assert got == ref[:20]
    cfg2 = cfg_for(small_prep, workers=0, val_path=str(small_prep))
    got2 = [r for b in take(build_loader(cfg2, split="val"), 3) for r in rows_of(b)]
    assert got2 == reference_rows(small_prep)[:24]
    with pytest.raises(ValueError, match="no 'val' split"):
        build_loader(cfg_for(small_prep, workers=0), split="val")


def test_config_mismatches_name_the_key(small_prep):
    with pytest.raises(ValueError, match="train.seq_len"):
        build_loader(cfg_for(small_prep, seq_len=64))
    cfg = cfg_for(small_prep)
    cfg.model.vocab_size = 100
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_loader(cfg)
    with pytest.raises(ValueError, match="one step"):
        build_loader(cfg_for(small_prep, gbs=100000))


def test_random_source_is_deterministic_and_resumable():
    cfg = from_dict({"data": {"source": "random"}, "model": {"vocab_size": 50},
                     "train": {"seq_len": 16, "global_batch_size": 4}})
    a = take(build_loader(cfg, dp_rank=0, dp_size=2), 4)
    b = build_loader(cfg, dp_rank=0, dp_size=2)
    take(b, 2)
    c = build_loader(cfg, dp_rank=0, dp_size=2)
    c.load_state_dict(b.state_dict())
    rest = take(c, 2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a[2:], rest))
    other = take(build_loader(cfg, dp_rank=1, dp_size=2), 1)[0]
    assert not torch.equal(other["input_ids"], a[0]["input_ids"])
    assert a[0]["input_ids"].shape == (2, 16) and 0 <= int(a[0]["input_ids"].min()) and int(a[0]["input_ids"].max()) < 50
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_loader(from_dict({"data": {"source": "random"}}))


def test_synthetic_copy_task_and_registry():
    cfg = from_dict({"data": {"source": "synthetic", "task": "copy", "task_args": {"n": 5}},
                     "model": {"vocab_size": 12}, "train": {"seq_len": 16, "global_batch_size": 3}})
    b = take(build_loader(cfg), 2)[1]
    ids, lab = b["input_ids"], b["labels"]
    assert (lab[:, :5] == -100).all() and (lab[:, 10:] == -100).all()
    assert torch.equal(lab[:, 5:10], ids[:, :5]) and (ids[:, 5] == 1).all() and int(ids.max()) < 12
    # Same samples whatever the DP layout: global sample k is seeded by k.
    two = [take(build_loader(cfg, dp_rank=r, dp_size=3, batch_size=1), 2)[1] for r in range(3)]
    assert torch.equal(torch.cat([t["input_ids"] for t in two]), ids)

    def const(rng, seq_len, value=3):
        return {"tokens": np.full(seq_len + 1, value), "loss_mask": None, "doc_starts": [0, 4]}
    register_task("test-const", const)
    cfg2 = from_dict({"data": {"source": "synthetic", "task": "test-const", "task_args": {"value": 2}},
                      "train": {"seq_len": 8, "global_batch_size": 2}, "parallel": {"sp": 2}})
    parts = [take(build_loader(cfg2, sp_rank=r, sp_size=2), 1)[0] for r in range(2)]
    assert (parts[1]["input_ids"] == 2).all() and (parts[0]["labels"] == 2).all()
    assert parts[0]["doc_start"][0].tolist() == [True, False, False, False] and parts[1]["doc_start"][0].tolist() == [True, False, False, False]
    bad = from_dict({"data": {"source": "synthetic", "task": "nope"}, "train": {"seq_len": 8}})
    with pytest.raises(ValueError, match="data.task"):
        build_loader(bad)


def test_synthetic_task_targets_become_the_labels():
    """word_problem (layout every) scores an answer token at every position, not the next input:
    the loader's labels are the task's own targets, the same ones eval scores."""
    from llm_lru.data_prep.synthetic import make_sample

    cfg = from_dict({"data": {"source": "synthetic", "task": "word_problem", "task_args": {"group": "A", "n": 5}},
                     "model": {"vocab_size": 128}, "train": {"seq_len": 32, "global_batch_size": 2, "seed": 5}})
    b = take(build_loader(cfg), 1)[0]
    for row in range(2):
        tokens, mask, _, targets = make_sample("word_problem", np.random.default_rng([5, 0, row]), 32,
                                               {"group": "A", "n": 5}, 128, with_targets=True)
        assert b["input_ids"][row].tolist() == tokens[:-1].tolist()
        assert b["labels"][row].tolist() == np.where(mask, targets, -100).tolist()
        assert b["labels"][row].tolist() != tokens[1:].tolist()


def test_eval_tasks_resolve_in_a_fresh_process():
    # `llm-lru train data.task=mqar` starts with no eval module imported.
    import subprocess
    import sys
    code = ("import numpy as np\n"
            "from llm_lru.data_prep.synthetic import make_sample\n"
            "tokens, mask, starts = make_sample('mqar', np.random.default_rng(0), 64, {}, 64)\n"
            "print(len(tokens))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "65"


def test_has_val_split(stdlib_prep, small_prep, tmp_path):
    from llm_lru.data_prep.loader import has_val_split

    assert has_val_split(cfg_for(stdlib_prep))
    assert not has_val_split(cfg_for(small_prep))
    assert has_val_split(cfg_for(small_prep, val_path=str(small_prep)))
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"data\.val_path: .*nowhere"):
        has_val_split(cfg_for(small_prep, val_path=str(missing)))
    with pytest.raises(ValueError, match=r"data\.val_path: .*nowhere"):
        build_loader(cfg_for(small_prep, workers=0, val_path=str(missing)), split="val")
