"""Config errors name the key, before anything runs."""
import subprocess
import sys

import pytest

from llm_lru.config import ConfigError, check_world, from_dict, layer_kinds, load_config, save_config

RANDOM = ["data.source=random"]


def error_of(overrides=None, text=None, tmp_path=None):
    path = None
    if text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_unknown_key_is_named(tmp_path):
    assert "model.bogus" in error_of(["model.bogus=1"])
    assert "train.sequence_length" in error_of(text="train:\n  sequence_length: 4\n", tmp_path=tmp_path)
    assert "nonsense" in error_of(text="nonsense: 1\n", tmp_path=tmp_path)


def test_wrong_type_is_named(tmp_path):
    assert "train.seq_len" in error_of(["train.seq_len=abc"])
    assert "model.tie_embeddings" in error_of(text="model:\n  tie_embeddings: [1]\n", tmp_path=tmp_path)


@pytest.mark.parametrize("overrides,key", [
    (["model.pattern=BXA"], "model.pattern"),
    (["model.kinds={X: transformer}"], "model.kinds.X"),
    (["model.n_heads=3"], "model.n_heads"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.block_size=17"], "model.block_size"),
    (["model.block_size=3"], "model.block_size"),          # does not divide d_state 128
    (["model.pattern=L", "model.d_state=7"], "model.d_state"),
    (["model.pattern=R"], "model.pattern"),                 # blur in a causal stack
    (["model.gate_norm=softmax2"], "model.gate_norm"),
    (["train.seq_len=10", "parallel.sp=4"], "train.seq_len"),
    (["train.seq_len=1"], "train.seq_len"),
    (["train.loss_chunk_tokens=0"], "train.loss_chunk_tokens"),
    (["parallel.carry=tree"], "parallel.carry"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["train.min_lr=1.0"], "train.min_lr"),
    (["train.val_every=10", "train.val_batches=0"], "train.val_batches"),
    (["train.val_every=-1"], "train.val_every"),
    (["data.source=shards"], "data.path"),
    (["data.source=synthetic"], "data.task"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
])
def test_impossible_combinations_are_named(overrides, key):
    msg = error_of(RANDOM + overrides)
    assert msg.startswith(key), msg


def test_overrides_apply_and_pattern_repeats():
    run = load_config(None, RANDOM + ["model.n_layers=6", "model.pattern=BBA", "model.kinds={Z: glru}",
                                      "train.lr=0.01"])
    assert run.train.lr == 0.01
    assert layer_kinds(run.model) == ["bdlru", "bdlru", "attn"] * 2
    run = load_config(None, RANDOM + ["model.pattern=ZA", "model.kinds={Z: glru}", "model.n_layers=3"])
    assert layer_kinds(run.model) == ["glru", "attn", "glru"]


def test_world_checks():
    run = from_dict({"data": {"source": "random"}, "parallel": {"sp": 2}, "train": {"global_batch_size": 6}})
    assert check_world(run, 4) == 2
    with pytest.raises(ConfigError, match="parallel.sp"):
        check_world(run, 3)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        check_world(run, 8)


def test_saved_config_loads_back(tmp_path):
    run = load_config(None, RANDOM + ["model.d_model=64", "deepspeed.overrides={a: 1}"])
    save_config(run, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == run


def test_cli_reports_config_error_before_running(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n  colour: blue\n")
    r = subprocess.run([sys.executable, "-m", "llm_lru", "train", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "model.colour" in r.stderr


def test_cli_unknown_command():
    r = subprocess.run([sys.executable, "-m", "llm_lru", "fly"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command 'fly'" in r.stderr


def test_saved_config_without_a_new_key_reads_as_the_old_behaviour(tmp_path):
    """A checkpoint's config.yaml written before model.hlru_readout existed (read with saved=True,
    as export and resume do) means the 'last' readout of then; a user's YAML gets today's default."""
    from llm_lru.config import load_config

    (tmp_path / "c.yaml").write_text("data:\n  source: random\nmodel:\n  pattern: HA\n  vocab_size: 64\n")
    assert load_config(tmp_path / "c.yaml", saved=True).model.hlru_readout == "last"
    assert load_config(tmp_path / "c.yaml").model.hlru_readout == "state"
    (tmp_path / "d.yaml").write_text("data:\n  source: random\nmodel:\n  pattern: HA\n  vocab_size: 64\n  hlru_readout: state\n")
    assert load_config(tmp_path / "d.yaml", saved=True).model.hlru_readout == "state"
