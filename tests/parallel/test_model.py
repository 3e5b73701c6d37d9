"""Model-level sequence parallelism: parallelize() on real mixers and on the tiny hybrid LM.

One world of 4 gloo processes per test. Each rank also runs the single-process model on the
whole batch (same seed, same data) as the reference.
- Every mixer kind (attn, swa, lru, glru, bdlru, hlru, blur, bidirectional attn) at sp = 2 with
  block sizes m = 1, 2, 4 for bdlru / hlru (and some at sp = 3, 4; all of them in the slow test):
  the slice's output, the input's gradient and every parameter's gradient (summed over the SP
  group) equal the unsplit mixer's.
- The tiny hybrid LM at sp = 2 and at dp = 2 x sp = 2 with sp_dp_loss and a DeepSpeed-style
  gradient average over the world: loss and every parameter gradient equal one process on the
  same global batch; also with the ring carry and activation checkpointing (every combination
  in the slow test).
"""
import copy

import pytest
import torch
import torch.distributed as dist

from llm_lru.config import ModelConfig, ParallelConfig
from llm_lru.models import HybridLM, make_mixer
from llm_lru.parallel import Mesh, build_mesh, parallelize, sp_dp_loss, sp_seams
from tests.distributed import run_world
from tests.parallel.cases import check_results, close, sp_groups

D = 8


def _mixer_cases():
    """(kind, ModelConfig) for every mixer kind (m = 1, 2, 4 for the block kinds)."""
    base = dict(d_model=D, d_state=D, n_heads=2, n_kv_heads=1, window=3, vocab_size=16)
    cases = [(k, ModelConfig(**base)) for k in ("attn", "swa", "lru", "glru")]
    for m in (1, 2, 4):
        cases += [(k, ModelConfig(**base, block_size=m)) for k in ("bdlru", "hlru")]
        # H-LRU's readouts: 'state' (default; its lags at a slice's start come from the carry) and 'last'
        cases.append(("hlru", ModelConfig(**base, block_size=m, hlru_readout="last")))
    cases += [(k, ModelConfig(**base, block_size=2, selective=False)) for k in ("bdlru", "hlru")]
    cases += [(k, ModelConfig(**base, causal=False)) for k in ("blur", "attn")]
    return cases


def _sp_mesh(group, r, k):
    return Mesh(world_size=k, rank=r, dp=1, sp=k, backend="gloo", sp_group=group, world_group=group,
                sp_ranks=dist.get_process_group_ranks(group))


def _mixers_world(rank, world, full):
    errors, n = [], 0
    for k, (group, r) in sp_groups(world).items():
        if group is None:
            continue
        mesh = _sp_mesh(group, r, k)
        t_local = {2: 4, 3: 3, 4: 2}[k]
        B, T = 2, k * t_local
        sl = slice(r * t_local, (r + 1) * t_local)
        for ci, (kind, cfg) in enumerate(_mixer_cases()):
            if not full and k != 2 and (kind, cfg.block_size, cfg.hlru_readout) not in (
                    ("bdlru", 2, "state"), ("hlru", 4, "state"), ("swa", 4, "state")):
                continue  # default: every kind at sp = 2, a few at sp = 3 and 4
            torch.manual_seed(ci)  # the same parameters and data on every rank
            ref = make_mixer(cfg, kind)
            x = torch.randn(B, T, D)
            docs = torch.rand(B, T) < 0.2
            docs[0, ::t_local] = True  # documents starting exactly on rank boundaries
            w = torch.randn(B, T, D)
            xr = x.clone().requires_grad_()
            (ref(xr, docs)[0] * w).sum().backward()
            sp = parallelize(copy.deepcopy(ref), mesh)
            sp.zero_grad()
            if not sp_seams(sp):
                errors.append(f"{kind}: parallelize wrapped nothing")
            xs = x[:, sl].clone().requires_grad_()
            y = sp(xs, docs[:, sl], None, mesh.pos_offset(t_local))[0]
            (y * w[:, sl]).sum().backward()
            tag = (f"sp={k} {kind} m={cfg.block_size} causal={cfg.causal} readout={cfg.hlru_readout} "
                   f"selective={cfg.selective}")
            close(y, ref(x, docs)[0][:, sl], f"{tag}: y", errors)
            close(xs.grad, xr.grad[:, sl], f"{tag}: dx", errors)
            for (name, p), q in zip(sp.named_parameters(), ref.parameters()):
                g = p.grad.clone()
                dist.all_reduce(g, group=group)
                close(g, q.grad, f"{tag}: d {name}", errors)
            n += 1
    return errors, n


def test_every_mixer_kind_matches_unsplit():
    check_results(run_world(_mixers_world, 4, False))


@pytest.mark.slow
def test_every_mixer_kind_matches_unsplit_at_every_sp():
    check_results(run_world(_mixers_world, 4, True))


TINY = dict(vocab_size=32, d_model=16, n_layers=6, pattern="BHGLAS", block_size=2, n_heads=2,
            n_kv_heads=1, window=5)


def _batch(B, T, t_local, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (B, T), generator=g)
    labels = torch.randint(0, 32, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = -100       # ignored tokens
    labels[1, :t_local] = -100                                 # a whole slice ignored
    docs = torch.rand(B, T, generator=g) < 0.1
    docs[:, 0] = True
    docs[0, ::t_local] = True                                  # starts on rank boundaries
    return ids, labels, docs


def _reference(B, T, t_local):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**TINY))
    ids, labels, docs = _batch(B, T, t_local)
    logits = model(ids, docs)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    return model, loss.detach(), (ids, labels, docs)


def _lm_case(mesh, rows, t_local, B, carry, checkpoint, tag, errors, final_state=True):
    """Run the SP x DP step for one mesh and compare with the single-process reference."""
    T = mesh.sp * t_local
    ref, ref_loss, (ids, labels, docs) = _reference(B, T, t_local)
    model = copy.deepcopy(ref)
    model.zero_grad()
    model = parallelize(model, mesh, ParallelConfig(carry=carry), activation_checkpointing=checkpoint,
                        final_state=final_state)
    cut = lambda x: mesh.local_slice(x[rows])  # noqa: E731  (this rank's rows, then its slice)
    logits = model(cut(ids), cut(docs), pos_offset=mesh.pos_offset(t_local))
    loss, value = sp_dp_loss(logits, cut(labels), mesh)
    loss.backward()
    close(value, ref_loss, f"{tag}: loss", errors)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=mesh.world_group)  # what DeepSpeed does: average over the world
        close(g / mesh.world_size, q.grad, f"{tag}: d {name}", errors)


def _lm_world(rank, world, full):
    errors, n = [], 0
    t_local = 4
    # sp = 2 alone: groups [0, 1] and [2, 3] each hold the whole batch
    group, r = sp_groups(world, (2,))[2]
    mesh = _sp_mesh(group, r, 2)
    cases = [("allgather", False), ("ring", True)] + ([("ring", False), ("allgather", True)] if full else [])
    for carry, ckpt in cases:
        if ckpt and not full and rank >= 2:
            continue  # checkpointing imports torch._dynamo (seconds per process): one group is enough
        _lm_case(mesh, slice(0, 2), t_local, 2, carry, ckpt, f"sp=2 carry={carry} checkpoint={ckpt}", errors,
                 final_state=not ckpt)
        n += 1
    # dp = 2 x sp = 2 over the whole world: DP rank d holds rows [2d, 2d + 2)
    mesh = build_mesh(sp=2)
    if (mesh.dp, mesh.sp, mesh.sp_ranks, mesh.dp_rank, mesh.sp_rank) != (2, 2, [rank - rank % 2, rank - rank % 2 + 1],
                                                                         rank // 2, rank % 2):
        errors.append(f"mesh layout: {mesh} sp_ranks={mesh.sp_ranks}")
    rows = slice(2 * mesh.dp_rank, 2 * mesh.dp_rank + 2)
    for carry in ("allgather", "ring") if full else ("allgather",):
        _lm_case(mesh, rows, t_local, 4, carry, False, f"dp=2 x sp=2 carry={carry}", errors, final_state=False)
        n += 1
    return errors, n


def test_tiny_hybrid_lm_sp_and_dp_x_sp_match_one_process():
    check_results(run_world(_lm_world, 4, False))


@pytest.mark.slow
def test_tiny_hybrid_lm_every_carry_and_checkpointing():
    check_results(run_world(_lm_world, 4, True))
