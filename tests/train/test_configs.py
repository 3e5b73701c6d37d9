"""Every YAML config in configs/ loads, validates, fits its world, and is the size its name says."""
import re
from pathlib import Path

import pytest
import torch

from llm_lru.config import check_world, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "hybrid-125m", "hybrid-350m", "hybrid-1.3b", "hybrid-350m-128k"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path):
    cfg = load_config(path)
    text = path.read_text()
    assert re.search(r"(?im)^# .*hardware", text), f"{path.name}: say what hardware it expects"
    # A world of sp ranks (dp = 1) and one of 2 x sp must both split the batch.
    for dp in (1, 2):
        assert check_world(cfg, cfg.parallel.sp * dp) == dp
    from llm_lru.models import HybridLM

    cfg.model.vocab_size = cfg.model.vocab_size or 50304
    with torch.device("meta"):
        n = sum(p.numel() for p in HybridLM(cfg.model).parameters())
    m = re.search(r"(\d+(?:\.\d+)?)([mb])", path.stem)
    if m:  # hybrid-125m, hybrid-1.3b: within 15% of the advertised size (at a 50K vocabulary)
        target = float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9)
        assert abs(n - target) / target < 0.15, f"{path.name}: {n / 1e6:.0f}M parameters"


def test_long_context_config_is_128k_over_sp8():
    cfg = load_config(CONFIGS[0].parent / "hybrid-350m-128k.yaml")
    assert cfg.train.seq_len == 131072 and cfg.parallel.sp == 8
