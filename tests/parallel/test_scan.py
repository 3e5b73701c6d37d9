"""SP scans (all-gather and ring carries) against the unsplit op on the whole sequence.

One world of 4 gloo processes runs sp = 2, 3 and 4. For every ScanOp layout (block m = 1, 2, 4,
diag, companion m = 2, 4), both directions, with and without a user h0, with and without
document starts (random ones, and ones exactly on rank boundaries): the slice's outputs, the
whole sequence's final state and the gradients of trans, u and h0 equal the sp = 1 run in
float32. The total loss is the sum of the ranks' local losses (see llm_lru.parallel.scan).
"""
import pytest
import torch
import torch.distributed as dist

from llm_lru.parallel.scan import SPScan
from tests.distributed import run_world
from tests.parallel.cases import SCAN_CASES, check_results, close, doc_starts, scan_inputs, sp_groups


def _scan_case(op, name, m, group, k, rank, t_local, seed, carries, errors):
    """All directions / resets / h0 for one op on one SP group; returns the number of checks."""
    B, N, T = 3, 3, k * t_local
    sl = slice(rank * t_local, (rank + 1) * t_local)
    gen = torch.Generator().manual_seed(seed)  # the same data on every rank of the group
    trans, u, h0 = scan_inputs(name, m, B, T, N, gen)
    n = 0
    for ri, reset in enumerate([None, doc_starts(B, T, t_local, gen)]):
        for reverse in (False, True):
            for use_h0 in (False, True):
                # reference: the unsplit op, loss = <h, w_h> + <h_last, w_last>
                x = [t.clone().requires_grad_() for t in (trans, u, h0)]
                h_ref, last_ref = op(x[0], x[1], x[2] if use_h0 else None, reverse, reset)
                w_h = torch.randn(h_ref.shape, generator=gen)
                w_last = torch.randn(last_ref.shape, generator=gen)
                ((h_ref * w_h).sum() + (last_ref * w_last).sum()).backward()
                picker = (seed + ri) % k  # the one rank whose loss uses the final state
                for carry in carries:
                    tag = f"sp={k} {name} m={m} reverse={reverse} reset={ri} h0={use_h0} carry={carry}"
                    y = [t.clone().requires_grad_() for t in (trans[:, sl], u[:, sl], h0)]
                    h, last = SPScan(op, group, carry)(y[0], y[1], y[2] if use_h0 else None, reverse,
                                                       None if reset is None else reset[:, sl])
                    ((h * w_h[:, sl]).sum() + (rank == picker) * (last * w_last).sum()).backward()
                    close(h, h_ref[:, sl], f"{tag}: h", errors)
                    close(last, last_ref, f"{tag}: h_last", errors)
                    close(y[0].grad, x[0].grad[:, sl], f"{tag}: d trans", errors)
                    close(y[1].grad, x[1].grad[:, sl], f"{tag}: d u", errors)
                    if use_h0:
                        g = y[2].grad.clone()
                        dist.all_reduce(g, group=group)  # h0's gradient lands on its owner only
                        close(g, x[2].grad, f"{tag}: d h0", errors)
                    n += 1
    return n


def _scan_world(rank, world, carries):
    errors, n = [], 0
    for k, (group, r) in sp_groups(world).items():
        if group is None:
            continue
        t_local = {2: 5, 3: 4, 4: 3}[k]
        for ci, (name, op, m) in enumerate(SCAN_CASES):
            n += _scan_case(op, name, m, group, k, r, t_local, 10 * k + ci, carries, errors)
    return errors, n


def test_sp_scan_matches_unsplit():
    check_results(run_world(_scan_world, 4, ("allgather", "ring")))


def _inference_world(rank, world):
    """No graph (torch.no_grad): the same exchange, the same outputs."""
    group, t_local, errors, n = dist.group.WORLD, 4, [], 0
    sl = slice(rank * t_local, (rank + 1) * t_local)
    for ci, (name, op, m) in enumerate(SCAN_CASES):
        gen = torch.Generator().manual_seed(ci)
        trans, u, h0 = scan_inputs(name, m, 2, world * t_local, 2, gen)
        reset = doc_starts(2, world * t_local, t_local, gen)
        for reverse in (False, True):
            h_ref, last_ref = op(trans, u, h0, reverse, reset)
            for carry in ("allgather", "ring"):
                with torch.no_grad():
                    h, last = SPScan(op, group, carry)(trans[:, sl], u[:, sl], h0, reverse, reset[:, sl])
                close(h, h_ref[:, sl], f"{name} m={m} {carry} reverse={reverse}: h", errors)
                close(last, last_ref, f"{name} m={m} {carry} reverse={reverse}: h_last", errors)
                n += 1
    return errors, n


def test_sp_scan_without_grad():
    check_results(run_world(_inference_world, 2))


def test_unknown_carry_is_refused():
    with pytest.raises(ValueError, match="parallel.carry"):
        SPScan(SCAN_CASES[0][1], None, "tree")
