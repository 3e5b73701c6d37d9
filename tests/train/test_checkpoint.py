"""Checkpoint bookkeeping: completeness markers, truncation, latest pointer, pruning."""
import json
import warnings

import pytest

from llm_lru.train import checkpoint as ck


def _fake(root, step, complete=True, size=10):
    d = root / ck.checkpoint_name(step)
    (d / "ds" / "state").mkdir(parents=True)
    (d / "ds" / "state" / "model.pt").write_bytes(b"x" * size)
    (d / "meta.json").write_text(json.dumps({"step": step}))
    if complete:
        ck.mark_complete(d, step)
    return d


def test_latest_pointer_and_complete(tmp_path):
    a = _fake(tmp_path, 10)
    b = _fake(tmp_path, 20)
    assert (tmp_path / ck.LATEST).read_text().strip() == b.name
    assert ck.check_complete(a) is None and ck.latest_complete(tmp_path) == b
    assert not list(tmp_path.glob(".latest.tmp"))


def test_partial_and_truncated_are_skipped_with_a_warning(tmp_path):
    good = _fake(tmp_path, 10)
    _fake(tmp_path, 20, complete=False)                       # crashed before COMPLETE
    trunc = _fake(tmp_path, 30)
    (trunc / "ds" / "state" / "model.pt").write_bytes(b"x" * 3)  # truncated after the fact
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ck.latest_complete(tmp_path) == good
    msgs = " ".join(str(w.message) for w in caught)
    assert "step_00000030: truncated file ds/state/model.pt" in msgs
    assert "step_00000020: no COMPLETE marker" in msgs


def test_find_checkpoint_from_run_dir_or_checkpoint(tmp_path):
    root = tmp_path / ck.CKPT_DIR
    root.mkdir()
    c = _fake(root, 5)
    assert ck.find_checkpoint(tmp_path) == c
    assert ck.find_checkpoint(root) == c
    assert ck.find_checkpoint(c) == c
    bad = _fake(root, 6, complete=False)
    with pytest.raises(ValueError, match="step_00000006"):
        ck.find_checkpoint(bad)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ck.find_checkpoint(tmp_path / "elsewhere")


def test_prune_keeps_last_k_and_newer_partials(tmp_path):
    for s in (1, 2, 3, 4):
        _fake(tmp_path, s)
    _fake(tmp_path, 5, complete=False)  # possibly a save in progress: left alone
    ck.prune(tmp_path, keep=2)
    assert sorted(p.name for p in ck.list_checkpoints(tmp_path)) == ["step_00000003", "step_00000004", "step_00000005"]
