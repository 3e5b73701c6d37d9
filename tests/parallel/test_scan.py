"""SP scans (all-gather and ring carries) against the unsplit op on the whole sequence.

One world of 4 gloo processes runs sp = 2 (two groups), 3 and 4. For every ScanOp layout (block
m = 1, 2, 4, diag, companion m = 2, 4) and both directions: the slice's outputs, the whole
sequence's final state and the gradients of trans, u and h0 equal the sp = 1 run in float32,
with and without a user h0, with and without document starts (random ones, and ones exactly on
rank boundaries, which in reverse scans cut the carry between ranks); under activation
checkpointing (the saved tensors dropped and recomputed, exchanges included); without the final
state (training mode, final_state=False); without autograd (inference); and on both routes of the
split scan: the chunked ops' native split and the generic TwoPassScan (the "ref" backend, the
route of kernels that read h0 first).
The total loss is the sum of the ranks' local losses (see llm_lru.parallel.scan).
The default test runs a covering subset of the combinations; the slow one runs all of them.
"""
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from llm_lru.kernels import get_backend, set_backend
from llm_lru.parallel.scan import SPScan
from tests.distributed import run_world
from tests.parallel.cases import SCAN_CASES, check_results, close, doc_starts, scan_inputs, sp_groups

# (carry, checkpointed, final_state)
CARRIES = [("allgather", False, True), ("ring", False, True), ("allgather", True, True), ("ring", True, True),
           ("allgather", False, False), ("ring", False, False)]


def _variants(full, seed):
    """(reset index, use_h0, (carry, checkpointed, final_state), native) to run for one op and
    direction: all of them, or a covering subset (each carry mode alternates between ops).
    native: the chunked op's own split scan, or the generic TwoPassScan (backend "ref")."""
    if full:
        return list(itertools.product((0, 1), (False, True), CARRIES, (True, False)))
    subset = [(0, True, CARRIES[0]), (1, False, CARRIES[1]), (1, True, CARRIES[0]), (1, True, CARRIES[1]),
              (1, True, CARRIES[2 + seed % 2]), (1, True, CARRIES[4 + seed % 2])]
    return [v + ((i + seed // 2) % 2 == 0,) for i, v in enumerate(subset)]  # every mode both ways, at every sp


def _scan_case(op, name, m, group, k, rank, t_local, seed, full, errors):
    """All chosen variants for one op on one SP group; returns the number of checks."""
    B, N, T = 3, 3, k * t_local
    sl = slice(rank * t_local, (rank + 1) * t_local)
    gen = torch.Generator().manual_seed(seed)  # the same data on every rank of the group
    trans, u, h0 = scan_inputs(name, m, B, T, N, gen)
    resets = [None, doc_starts(B, T, t_local, gen)]
    n = 0
    for reverse in (False, True):
        for ri, use_h0, (carry, checkpointed, final_state), native in _variants(full, seed):
            reset = resets[ri]
            # reference: the unsplit op, loss = <h, w_h> + <h_last, w_last>
            x = [t.clone().requires_grad_() for t in (trans, u, h0)]
            h_ref, last_ref = op(x[0], x[1], x[2] if use_h0 else None, reverse, reset)
            w_h = torch.randn(h_ref.shape, generator=gen)
            w_last = torch.randn(last_ref.shape, generator=gen) * final_state  # no final state: unused
            ((h_ref * w_h).sum() + (last_ref * w_last).sum()).backward()
            picker = (seed + ri) % k  # the one rank whose loss uses the final state
            tag = (f"sp={k} {name} m={m} reverse={reverse} reset={ri} h0={use_h0} carry={carry} "
                   f"checkpointed={checkpointed} final_state={final_state} native={native}")
            sp_op = SPScan(op, group, carry, final_state)
            local_reset = None if reset is None else reset[:, sl]
            y = [t.clone().requires_grad_() for t in (trans[:, sl], u[:, sl], h0)]
            old = get_backend()
            set_backend("torch" if native else "ref")
            try:
                args = (y[0], y[1], y[2] if use_h0 else None, reverse, local_reset)
                if checkpointed:
                    h, last = torch.utils.checkpoint.checkpoint(sp_op, *args, use_reentrant=False)
                else:
                    h, last = sp_op(*args)
                if final_state:
                    ((h * w_h[:, sl]).sum() + (rank == picker) * (last * w_last).sum()).backward()
                    close(last, last_ref, f"{tag}: h_last", errors)
                else:  # the slice's own final state, outside autograd
                    (h * w_h[:, sl]).sum().backward()
                    if last.requires_grad or last.shape != last_ref.shape:
                        errors.append(f"{tag}: h_last should be a state without gradient")
            finally:
                set_backend(old)
            close(h, h_ref[:, sl], f"{tag}: h", errors)
            close(y[0].grad, x[0].grad[:, sl], f"{tag}: d trans", errors)
            close(y[1].grad, x[1].grad[:, sl], f"{tag}: d u", errors)
            if use_h0:
                g = y[2].grad.clone()
                dist.all_reduce(g, group=group)  # h0's gradient lands on its owner only
                close(g, x[2].grad, f"{tag}: d h0", errors)
            if not checkpointed and ri == 1:  # inference: the same exchange without a graph
                with torch.no_grad():
                    h, last = sp_op(trans[:, sl], u[:, sl], h0 if use_h0 else None, reverse, local_reset)
                close(h, h_ref[:, sl], f"{tag} no_grad: h", errors)
                if final_state:
                    close(last, last_ref, f"{tag} no_grad: h_last", errors)
            n += 1
    return n


def _scan_world(rank, world, full):
    errors, n = [], 0
    for k, (group, r) in sp_groups(world).items():
        if group is None:
            continue
        t_local = {2: 5, 3: 4, 4: 3}[k]
        for ci, (name, op, m) in enumerate(SCAN_CASES):
            n += _scan_case(op, name, m, group, k, r, t_local, 10 * k + ci, full, errors)
    return errors, n


def test_sp_scan_matches_unsplit():
    check_results(run_world(_scan_world, 4, False))


@pytest.mark.slow
def test_sp_scan_matches_unsplit_every_combination():
    check_results(run_world(_scan_world, 4, True))


def test_unknown_carry_is_refused():
    with pytest.raises(ValueError, match="parallel.carry"):
        SPScan(SCAN_CASES[0][1], None, "tree")
