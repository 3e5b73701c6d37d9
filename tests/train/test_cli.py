"""`llm-lru train`: config errors are named before any process group starts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from llm_lru.config import ConfigError
from llm_lru.train import cli

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.mark.parametrize("args, key", [
    (["train.seq_len=255", "parallel.sp=2"], "train.seq_len"),
    (["train.no_such_key=1"], "train.no_such_key"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["train.global_batch_size=many"], "train.global_batch_size"),
    (["data.path=''", "data.source=random"], "model.vocab_size"),  # vocab 0 needs a tokenizer
    (["data.path=/nonexistent/shards"], "model.vocab_size"),
])
def test_config_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cli.parse([TINY, *args])
    assert not dist.is_initialized()


def test_world_size_checked_before_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # 8 sequences do not split over dp = 3
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        cli.parse([TINY, "data.source=random", "model.vocab_size=64"])
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"parallel\.sp"):
        cli.parse([TINY, "data.source=random", "model.vocab_size=64", "parallel.sp=2"])


def test_resume_flag_sets_checkpoint_resume():
    cfg = cli.parse([TINY, "data.source=random", "model.vocab_size=64", "--resume", "none"])
    assert cfg.checkpoint.resume == "none"


def test_command_line_exit_code_and_message():
    """The real entry point: exit status 2 and the key on stderr, without starting DeepSpeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "llm_lru", "train", TINY, "model.d_model=-1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "model.d_model" in p.stderr
    assert "Setting accelerator" not in p.stderr  # DeepSpeed was never imported
