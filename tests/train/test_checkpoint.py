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


def _meta(root, **meta):
    d = root / ck.checkpoint_name(4)
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"sp": 1, "dp": 2, "global_batch_size": 8, **meta}))
    return d


def test_check_resume_allows_another_dp_and_names_what_it_refuses(tmp_path):
    c = _meta(tmp_path)
    assert ck.check_resume(c, sp=1, dp=2, global_batch=8) is False
    assert ck.check_resume(c, sp=1, dp=1, global_batch=8) is True
    with pytest.raises(ValueError, match="parallel.sp: .*sp=1, this run has sp=2"):
        ck.check_resume(c, sp=2, dp=1, global_batch=8)
    with pytest.raises(ValueError, match="train.global_batch_size: .*8, this run has 16"):
        ck.check_resume(c, sp=1, dp=2, global_batch=16)


def test_save_signals_record_the_first_and_restore(tmp_path):
    import os
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    s = ck.SaveSignals(["SIGUSR1", "SIGTERM"]).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)   # a second one (as during a save) is only noted
        assert s.received == "SIGUSR1"
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_status_file_is_replaced_atomically(tmp_path):
    assert ck.read_status(tmp_path)["status"] == "none"
    ck.write_status(tmp_path, "running", 3)
    ck.write_status(tmp_path, "preempted", 7)
    assert ck.read_status(tmp_path) == {"status": "preempted", "step": 7}
    assert [p.name for p in tmp_path.iterdir()] == [ck.STATUS]


def test_checkpoint_config_keys_are_validated():
    from llm_lru.config import ConfigError, from_dict

    base = {"data": {"source": "random"}, "model": {"vocab_size": 8}}
    with pytest.raises(ConfigError, match="checkpoint.save_signals"):
        from_dict({**base, "checkpoint": {"save_signals": ["SIGKILL"]}})
    with pytest.raises(ConfigError, match="checkpoint.every_minutes"):
        from_dict({**base, "checkpoint": {"every_minutes": -1}})
    assert from_dict(base).checkpoint.save_signals == ["SIGTERM", "SIGUSR1"]



def test_resume_refuses_another_model_naming_the_keys(tmp_path):
    """A resume may change init-only fields and attention's window / rope_theta, nothing else; a
    checkpoint config that predates model.hlru_readout counts as the old 'last' readout."""
    import dataclasses

    from llm_lru.config import ConfigError, RunConfig, save_config

    model = dataclasses.replace(RunConfig().model, pattern="HA", vocab_size=64)
    data = dataclasses.replace(RunConfig().data, source="random")
    save_config(RunConfig(model=model, data=data), tmp_path / "config.yaml")
    ck.check_resume_model(tmp_path, model)
    ck.check_resume_model(tmp_path, dataclasses.replace(model, window=1024, rope_theta=5e5, init_std=0.01))
    with pytest.raises(ConfigError, match=r"model.d_model: 128 in .*config.yaml, 96 in this run; "
                                          r"model.n_heads: 4 in .*, 2 in this run\. Set those keys"):
        ck.check_resume_model(tmp_path, dataclasses.replace(model, d_model=96, n_heads=2))

    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text("".join(l for l in text.splitlines(True) if "hlru_readout" not in l))
    with pytest.raises(ConfigError, match=r"model.hlru_readout: 'last' in .* \(its config predates the key\), "
                                          r"'state' in this run"):
        ck.check_resume_model(tmp_path, model)
    ck.check_resume_model(tmp_path, dataclasses.replace(model, hlru_readout="last"))
