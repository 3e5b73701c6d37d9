"""Deferred initial states (`chunked.deferred_state`): a chunked scan started before its h0 is known
must give what the same scan from that h0 gives, under the "ref" backend's float64 sequential
loops: states, last state, and the gradients of the inputs and of the deferred h0; and the slice
map it hands to `resolve` must be the reference (product, last state from zero). Every chunked op,
both directions, document starts, m in 1..4 and 8 (the batched-matmul path), T = 1 (one chunk),
T a multiple of the chunk and not (padding), a companion chunk shorter than m."""
import pytest
import torch

from llm_lru.kernels import BLOCK, COMPANION, DIAG, chunked, get_backend, set_backend
from llm_lru.kernels.gated import GatedBlockScan

from .test_carry import _inputs, _reference, _resets

F64 = torch.float64


def _ref_scan(op, trans, u, h0, reverse, reset):
    old = get_backend()
    set_backend("ref")
    try:
        return op(trans, u, h0, reverse, reset)
    finally:
        set_backend(old)


def _state(name, B, N, m, gen):
    shape = (B, N) if name == "diag" else (B, N, m)
    return torch.randn(*shape, dtype=F64, generator=gen)


CASES = [("block", m) for m in (1, 2, 3, 4, 8)] + [("diag", 1)] + [("companion", m) for m in (1, 2, 3, 4)]


@pytest.mark.parametrize("name,m", CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 3, 13, 16])
@pytest.mark.parametrize("with_reset", [False, True])
def test_deferred_state_matches_scan_from_it(name, m, reverse, T, with_reset):
    gen = torch.Generator().manual_seed(hash(("deferred", name, m, reverse, T, with_reset)) % 2**31)
    B, N = 4, 3
    op, trans, u = _inputs(name, B, T, N, m, gen)
    reset = _resets(B, T, gen) if with_reset else None
    h0 = _state(name, B, N, m, gen)
    assert op.defers_state(trans, u)

    trans_d, u_d = trans.clone().requires_grad_(), u.clone().requires_grad_()
    buf = torch.zeros_like(h0, requires_grad=True)
    got = {}

    def resolve(slice_map):
        got["P"], got["s"] = slice_map()
        return h0

    with chunked.deferred_state(buf, resolve) as deferral:
        h, last = op(trans_d, u_d, buf, reverse, reset)
        assert deferral.consumed
    torch.testing.assert_close(buf.detach(), h0)

    trans_r, u_r, h0_r = (x.clone().requires_grad_() for x in (trans, u, h0))
    h_ref, last_ref = _ref_scan(op, trans_r, u_r, h0_r, reverse, reset)
    torch.testing.assert_close((h, last), (h_ref, last_ref), rtol=1e-10, atol=1e-10)
    P_ref, s_ref = _reference(op, trans, u, reverse, reset)
    torch.testing.assert_close((got["P"], got["s"]), (P_ref, s_ref), rtol=1e-10, atol=1e-10)

    wh, wl = torch.randn(h.shape, dtype=F64, generator=gen), torch.randn(last.shape, dtype=F64, generator=gen)
    grads = torch.autograd.grad((h * wh).sum() + (last * wl).sum(), (trans_d, u_d, buf))
    grads_ref = torch.autograd.grad((h_ref * wh).sum() + (last_ref * wl).sum(), (trans_r, u_r, h0_r))
    for g, g_ref, what in zip(grads, grads_ref, ("trans", "u", "h0")):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=lambda e: f"grad {what}: {e}")


def test_other_tensors_and_paths_do_not_defer():
    """Only the registered tensor is deferred; the reference and the gated (un-prepared) ops say so."""
    gen = torch.Generator().manual_seed(5)
    op, A, u = _inputs("block", 2, 16, 2, 2, gen)
    other = torch.randn(2, 2, 2, dtype=F64, generator=gen)
    buf = torch.zeros_like(other)
    with chunked.deferred_state(buf, lambda slice_map: pytest.fail("resolved for another tensor")) as deferral:
        h, _ = op(A, u, other)
        assert not deferral.consumed
    torch.testing.assert_close(h, _ref_scan(op, A, u, other, False, None)[0], rtol=1e-10, atol=1e-10)
    assert not chunked._deferred  # the registration ends with the block
    assert not GatedBlockScan().defers_state(A, u)
    old = get_backend()
    set_backend("ref")
    try:
        assert not any(o.defers_state(A, u) for o in (BLOCK, DIAG, COMPANION))
    finally:
        set_backend(old)


@pytest.mark.parametrize("name,m", CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 3, 13])
@pytest.mark.parametrize("with_reset,with_last", [(False, True), (True, True), (True, False)])
def test_deferred_seed_matches_backward_from_it(name, m, reverse, T, with_reset, with_last):
    """Backward with the Deferral's seed set: the scan adds the seed's extra dL/dh_last after its
    carry-free pass, and h0_grad_of(extra) is dL/dh0 for the total seed, before the slice's
    gradients are written. with_last=False: autograd hands the scan no dL/dh_last of its own."""
    gen = torch.Generator().manual_seed(hash(("seed", name, m, reverse, T, with_reset, with_last)) % 2**31)
    B, N = 4, 3
    op, trans, u = _inputs(name, B, T, N, m, gen)
    reset = _resets(B, T, gen) if with_reset else None
    h0 = _state(name, B, N, m, gen)
    trans_d, u_d = trans.clone().requires_grad_(), u.clone().requires_grad_()
    buf = torch.zeros_like(h0, requires_grad=True)
    with chunked.deferred_state(buf, lambda slice_map: h0) as deferral:
        h, last = op(trans_d, u_d, buf, reverse, reset)
    extra = torch.randn(last.shape, dtype=F64, generator=gen)
    early = []

    def seed(h0_grad_of):
        early.append(h0_grad_of(extra))
        return extra

    deferral.seed = seed
    wh, wl = torch.randn(h.shape, dtype=F64, generator=gen), torch.randn(last.shape, dtype=F64, generator=gen)
    loss = (h * wh).sum() + ((last * wl).sum() if with_last else 0)
    grads = torch.autograd.grad(loss, (trans_d, u_d, buf))
    assert deferral.seed is None and len(early) == 1

    trans_r, u_r, h0_r = (x.clone().requires_grad_() for x in (trans, u, h0))
    h_ref, last_ref = _ref_scan(op, trans_r, u_r, h0_r, reverse, reset)
    loss_ref = (h_ref * wh).sum() + (last_ref * (wl * with_last + extra)).sum()
    grads_ref = torch.autograd.grad(loss_ref, (trans_r, u_r, h0_r))
    for g, g_ref, what in zip(grads, grads_ref, ("trans", "u", "h0")):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=lambda e: f"grad {what}: {e}")
    torch.testing.assert_close(early[0], grads_ref[2], rtol=1e-9, atol=1e-10, msg=lambda e: f"early dh0: {e}")
