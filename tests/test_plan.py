"""`llm-lru plan`: model states by ZeRO stage, the longest length that fits, the command line."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_lru import plan as P
from llm_lru.config import from_dict

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=512, d_model=32, n_layers=4, pattern="BSHA", n_heads=4, n_kv_heads=2, window=64)


def cfg(**over):
    base = {"model": MODEL, "data": {"source": "random"},
            "train": {"seq_len": 1024, "global_batch_size": 2, "precision": "fp32"}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return from_dict(base)


def test_model_states_follow_the_zero_stage():
    n, N = 4_000_000_000, 8            # large enough that DeepSpeed's buckets are smaller than the model
    fp32 = {s: dict(P.model_state_bytes(n, n // 10, s, N, bf16=False)) for s in range(4)}
    assert sum(fp32[0].values()) == 16 * n                          # weights, grads, AdamW: 4 + 4 + 8
    assert fp32[1]["parameters"] == fp32[1]["gradients"] == 4 * n   # stage 1 shards the optimizer only
    assert fp32[1]["optimizer states"] == pytest.approx(16 * n / N)  # AdamW + fp32 partition + its grad
    assert fp32[2]["gradients"] == pytest.approx(4 * n / N + 4 * P.DS_REDUCE_BUCKET)
    assert fp32[3]["parameters"] == pytest.approx(4 * n / N + 4 * 2 * n // 10)  # a gathered block + the prefetch
    assert sum(fp32[3].values()) < sum(fp32[2].values()) < sum(fp32[1].values()) < sum(fp32[0].values())
    bf16 = dict(P.model_state_bytes(n, n // 100, 1, N, bf16=True))
    assert bf16["parameters"] == 2 * n                                # bf16 weights, fp32 master


def test_longest_length_is_the_boundary():
    c = cfg()
    probe = {k: P.activation_probe(c.model, k, torch.float32) for k in ("bdlru", "swa", "hlru", "attn")}
    mem = 200 * P.MiB
    p = P.plan(c, gpus=1, gpu_mem=mem, reserve=0, probe=probe)
    assert p.max_seq_len > 0 and p.max_seq_len % 1024 == 0
    at = cfg(train={"seq_len": p.max_seq_len})
    over = cfg(train={"seq_len": p.max_seq_len + 1024})
    assert P.plan(at, 1, mem, reserve=0, probe=probe).fits
    assert not P.plan(over, 1, mem, reserve=0, probe=probe).fits


def test_activations_grow_linearly_with_tokens():
    """Doubling the tokens doubles everything but the model states and the capped loss chunk."""
    probe = {k: P.activation_probe(cfg().model, k, torch.float32) for k in ("bdlru", "swa", "hlru", "attn")}
    a = dict(P.plan(cfg(train={"seq_len": 8192}), 1, 1e12, reserve=0, probe=probe).rows)
    b = dict(P.plan(cfg(train={"seq_len": 16384}), 1, 1e12, reserve=0, probe=probe).rows)
    assert b["activations"] == pytest.approx(2 * a["activations"], rel=1e-6)
    assert b["parameters"] == a["parameters"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llm_lru", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_command_line():
    ok = run_cli("configs/tiny.yaml", "model.vocab_size=2048", "--gpus", "2", "--gpu-mem", "8GiB")
    assert ok.returncode == 0, ok.stderr
    assert "fits" in ok.stdout and "longest train.seq_len" in ok.stdout
    small = run_cli("configs/tiny.yaml", "model.vocab_size=2048", "--gpus", "2", "--gpu-mem", "64MiB")
    assert small.returncode == 1 and "DOES NOT FIT" in small.stdout
    bad = run_cli("configs/tiny.yaml", "model.no_such=1")
    assert bad.returncode == 2 and "model.no_such" in bad.stderr
    split = run_cli("configs/tiny.yaml", "model.vocab_size=2048", "--gpus", "3")
    assert split.returncode == 2 and "train.global_batch_size" in split.stderr


def test_activation_rows_match_a_whole_model_step():
    """Independent of the per-block probes' extrapolation: the bytes autograd saves for one whole
    HybridLM.loss at 4096 tokens (every layer, the final norm, the chunked loss's held gradients)
    equal the planner's activations plus the gradients its loss row says the loss holds."""
    from llm_lru.models import HybridLM

    c = cfg(train={"seq_len": 4096, "global_batch_size": 1})
    torch.manual_seed(0)
    model = HybridLM(c.model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, MODEL["vocab_size"], (1, 4096))
    saved, _ = P._saved_bytes(lambda: model.loss(ids, ids, P._doc_starts(4096)), params)
    rows = dict(P.plan(c, gpus=1, gpu_mem=1e12, reserve=0).rows)
    n, d, V = 4096, MODEL["d_model"], MODEL["vocab_size"]
    held_by_loss = n * d * 4 + V * d * 4          # hidden-state and head gradients (fp32 run)
    assert saved == pytest.approx(rows["activations"] + held_by_loss, rel=0.05)
