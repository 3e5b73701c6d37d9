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
    probe = P.probe_all(c.model, torch.float32)
    mem = 200 * P.MiB
    p = P.plan(c, gpus=1, gpu_mem=mem, reserve=0, probe=probe)
    assert p.max_seq_len > 0 and p.max_seq_len % 1024 == 0
    at = cfg(train={"seq_len": p.max_seq_len})
    over = cfg(train={"seq_len": p.max_seq_len + 1024})
    assert P.plan(at, 1, mem, reserve=0, probe=probe).fits
    assert not P.plan(over, 1, mem, reserve=0, probe=probe).fits


def test_activations_grow_linearly_with_tokens():
    """Doubling the tokens doubles everything but the model states and the capped loss chunk."""
    probe = P.probe_all(cfg().model, torch.float32)
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
    cpu = run_cli("configs/tiny.yaml", "model.vocab_size=2048", "--cpu")
    assert cpu.returncode == 0 and "fp32" in cpu.stdout and "allocator slack (CPU)" in cpu.stdout
    split = run_cli("configs/tiny.yaml", "model.vocab_size=2048", "--gpus", "3")
    assert split.returncode == 2 and "train.global_batch_size" in split.stderr


def test_live_bytes_counts_the_tensors_ops_make():
    before = torch.ones(1000)                        # made outside: not counted
    with P.LiveBytes() as live:
        a = before * 2                               # 4000 bytes
        b = a + 1                                    # 8000 alive
        del a                                        # 4000
        c = b.sum()                                  # 4 bytes (a 0-d tensor)
        assert live.live == 4004
    assert live.peak == 8000                         # a and b at once
    del b, c


def _step_tokens(rows):
    """What a model step on its own makes: the planner's per-rank rows but the model states that
    exist before it (parameters, optimizer states) and the loader's batch (made by the caller)."""
    return sum(b for n, b in rows.items() if n not in ("parameters", "optimizer states", "loader batch"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_matches_a_whole_model_step(checkpointing):
    """Independent of the per-block probes' extrapolation and of how the plan assembles them: the
    most tensor memory one whole HybridLM.loss forward + backward holds at 4096 tokens (every
    layer, the final norm, the chunked loss, the checkpoint wrapper's recomputation, the
    gradients) equals the planner's rows for it."""
    from llm_lru.models import HybridLM
    from llm_lru.parallel import apply_activation_checkpointing

    c = cfg(train={"seq_len": 4096, "global_batch_size": 1, "activation_checkpointing": checkpointing})
    torch.manual_seed(0)
    model = HybridLM(c.model)
    if checkpointing:
        apply_activation_checkpointing(model)
    ids = torch.randint(0, MODEL["vocab_size"], (1, 4096))
    with P.LiveBytes() as live:
        model.loss(ids, ids, P._doc_starts(4096), reduction="sum").backward()
    rows = dict(P.plan(c, gpus=1, gpu_mem=1e12, reserve=0).rows)
    assert ("recompute live set" in rows) == ("saved block inputs" in rows) == checkpointing
    assert _step_tokens(rows) == pytest.approx(live.peak, rel=0.05)


def _sp_step(rank, world, T, checkpointing):
    from llm_lru.models import HybridLM
    from llm_lru.parallel import build_mesh, parallelize

    mesh = build_mesh(sp=world)
    c = cfg(parallel={"sp": world}, train={"seq_len": T, "global_batch_size": 1,
                                          "activation_checkpointing": checkpointing})
    torch.manual_seed(0)
    model = parallelize(HybridLM(c.model), mesh, activation_checkpointing=checkpointing, final_state=False)
    t = T // world
    mine = slice(rank * t, (rank + 1) * t)
    ids = torch.randint(0, MODEL["vocab_size"], (1, T))[:, mine]
    with P.LiveBytes() as live:
        model.loss(ids, ids, P._doc_starts(T)[:, mine], reduction="sum", pos_offset=mesh.pos_offset(t)).backward()
    return live.peak, _step_tokens(dict(P.plan(c, gpus=world, gpu_mem=1e12, reserve=0).rows))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_matches_an_sp_step(checkpointing):
    """sp = 2 on real processes: the gathered K/V of full attention (kept, concatenated, and their
    gradients in backward), the window's halo and the recurrent carries, with and without the
    recomputation, within 8% of each rank's measured peak."""
    from tests.distributed import run_world

    for peak, planned in run_world(_sp_step, 2, 8192, checkpointing):
        assert planned == pytest.approx(peak, rel=0.08)


def test_cpu_plan_names_the_allocator_slack():
    """On CPU the allocator's slack is a row of its own; the rows of the tensors are the GPU plan's.
    Small steps are in glibc's heap regime (the transient's share counts); (tokens, D) tensors of
    32 MiB and up are mapped and returned whole (the constant only)."""
    c = cfg(train={"seq_len": 16384, "global_batch_size": 1})     # backward peaks, not the loss chunk
    probe = P.probe_all(c.model, torch.float32)
    gpu = dict(P.plan(c, 1, 1e12, reserve=0, probe=probe).rows)
    cpu = dict(P.plan(c, 1, 1e12, reserve=0, probe=probe, device="cpu").rows)
    assert "allocator slack (CPU)" not in gpu
    assert cpu.pop("allocator slack (CPU)") == pytest.approx(P.CPU_SLACK + P.CPU_SLACK_FRACTION * gpu["backward workspace"])
    assert cpu == gpu
    big = cfg(train={"seq_len": 32 * P.MiB // (MODEL["d_model"] * 4), "global_batch_size": 1})
    assert dict(P.plan(big, 1, 1e12, reserve=0, probe=probe, device="cpu").rows)["allocator slack (CPU)"] == P.CPU_SLACK
