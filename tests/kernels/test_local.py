"""The split-phase scan (`op.local` -> `part.finish`, `part.adjoint` -> `grad.finish`) against the
float64 sequential reference ("ref" backend: loops, materialised products, autograd through them):
the slice map (P, s) = (op.product, h_last from zero), the states from h0, the adjoint's
dL/dh0 map (a = dL/dh0 from dL/dh alone; a + P^T dL/dh_last), and every input's gradient.
Both routes: the chunked scans' native split ("torch") and the generic TwoPassScan (what the
reference backend uses; the Triton split: test_triton_local.py). Every op, both directions, document starts,
m in 1..4 and 8 (the batched-matmul path), T = 1 (one chunk), T a multiple of the chunk and not
(padding), companion orders above T; the native split also at forced chunk sizes."""
import pytest
import torch

from llm_lru.kernels import BLOCK, DIAG, TwoPassScan, get_backend, set_backend, transition_mask
from llm_lru.kernels.block import BlockLocal
from llm_lru.kernels.companion import CompanionLocal
from llm_lru.kernels.diag import DiagLocal

from .test_carry import _inputs, _resets

F64 = torch.float64


def _with_backend(name, fn):
    old = get_backend()
    set_backend(name)
    try:
        return fn()
    finally:
        set_backend(old)


def _state(op, B, N, m, gen):
    shape = (B, N) if op is DIAG else (B, N, m)
    return torch.randn(*shape, dtype=F64, generator=gen)


def _reference(op, trans, u, h0, reverse, reset, wh, wl):
    """Values, maps and gradients from the sequential reference under autograd."""
    def run():
        x = [t.clone().requires_grad_() for t in (trans, u, h0)]
        h, last = op(x[0], x[1], x[2], reverse, reset)
        a = torch.autograd.grad((h * wh).sum(), x[2], retain_graph=True)[0]
        grads = torch.autograd.grad((h * wh).sum() + (last * wl).sum(), x)
        with torch.no_grad():
            P, s = op.product(trans, reverse, reset), op(trans, u, None, reverse, reset)[1]
        return dict(h=h.detach(), last=last.detach(), P=P, s=s, a=a, grads=grads)
    return _with_backend("ref", run)


def _check_split(part, op, trans, u, h0, reverse, reset, gen, tol=1e-10):
    """Run one split scan through both halves and compare everything with the reference."""
    h0 = h0 if h0 is not None else torch.zeros_like(part.s)  # the reference from a zero h0
    ref = None
    h, last = part.finish(h0)
    wh = torch.randn(h.shape, dtype=F64, generator=gen)
    wl = torch.randn(last.shape, dtype=F64, generator=gen)
    ref = _reference(op, trans, u, h0, reverse, reset, wh, wl)
    close = lambda got, want, what: torch.testing.assert_close(  # noqa: E731
        got, want, rtol=tol, atol=tol, msg=lambda e: f"{what}: {e}")
    close(part.P, ref["P"], "P")
    close(part.s, ref["s"], "s")
    close(h, ref["h"], "h")
    close(last, ref["last"], "h_last")
    grad = part.adjoint(wh, part.saved())
    close(grad.a, ref["a"], "a (dL/dh0 with dL/dh_last = 0)")
    close(grad.h0_grad(wl), ref["grads"][2], "a + P^T dL/dh_last")
    g_trans, g_u, g_h0 = grad.finish(wl)
    close(g_trans, ref["grads"][0], "d trans")
    close(g_u, ref["grads"][1], "d u")
    close(g_h0, ref["grads"][2], "d h0")


CASES = [("block", m) for m in (1, 2, 3, 4, 8)] + [("diag", 1)] + [("companion", m) for m in (1, 2, 3, 4)]


@pytest.mark.parametrize("name,m", CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 3, 13, 16])
@pytest.mark.parametrize("with_reset", [False, True])
def test_native_split_matches_reference(name, m, reverse, T, with_reset):
    gen = torch.Generator().manual_seed(hash(("local", name, m, reverse, T, with_reset)) % 2**31)
    B, N = 4, 3
    op, trans, u = _inputs(name, B, T, N, m, gen)
    reset = _resets(B, T, gen) if with_reset else None
    part = _with_backend("torch", lambda: op.local(trans, u, reverse, reset))
    assert not isinstance(part, TwoPassScan)
    _check_split(part, op, trans, u, _state(op, B, N, m, gen), reverse, reset, gen)


@pytest.mark.parametrize("name,m", [("block", 2), ("diag", 1), ("companion", 3), ("bdlru", 2), ("hlru", 3)])
@pytest.mark.parametrize("reverse", [False, True])
def test_generic_split_matches_reference(name, m, reverse):
    """TwoPassScan: the route of the reference backend (and of gated ops outside Triton)."""
    gen = torch.Generator().manual_seed(hash(("two-pass", name, m, reverse)) % 2**31)
    B, T, N = 4, 7, 2
    op, trans, u = _inputs(name, B, T, N, m, gen)
    reset = _resets(B, T, gen)
    part = _with_backend("ref", lambda: op.local(trans, u, reverse, reset))
    assert isinstance(part, TwoPassScan)
    _with_backend("ref", lambda: _check_split(part, op, trans, u, _state(BLOCK, B, N, m, gen)
                                              if name != "diag" else _state(DIAG, B, N, m, gen),
                                              reverse, reset, gen))


@pytest.mark.parametrize("name,m", [("block", 2), ("diag", 1), ("companion", 4)])
@pytest.mark.parametrize("reverse", [False, True])
def test_split_without_h0_or_gradients(name, m, reverse):
    """finish(None) scans from zeros and gives no dL/dh0; missing dL/dh and dL/dh_last are zeros."""
    gen = torch.Generator().manual_seed(7 + reverse)
    B, T, N = 2, 9, 2
    op, trans, u = _inputs(name, B, T, N, m, gen)
    part = _with_backend("torch", lambda: op.local(trans, u, reverse, None))
    h, last = part.finish(None)
    ref = _with_backend("ref", lambda: op(trans, u, None, reverse, None))
    torch.testing.assert_close((h, last), ref, rtol=1e-10, atol=1e-10)
    grad = part.adjoint(None, part.saved())
    assert not grad.a.any()
    g_trans, g_u, g_h0 = grad.finish(None)
    assert g_h0 is None and not g_trans.any() and not g_u.any()


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("reverse", [False, True])
def test_native_split_at_any_chunk(chunk, reverse):
    """Padding of the last chunk, one step per chunk, chunks shorter than the companion order."""
    gen = torch.Generator().manual_seed(chunk * 2 + reverse)
    B, T, N, m = 4, 17, 2, 4
    reset = _resets(B, T, gen)
    for name, cls in (("block", BlockLocal), ("diag", DiagLocal),
                      ("companion", CompanionLocal)):
        op, trans, u = _inputs(name, B, T, N, m, gen)
        part = cls(trans, u, reverse, transition_mask(reset, reverse) if name == "companion" else reset,
                   chunk=chunk)
        _check_split(part, op, trans, u, _state(op, B, N, m, gen), reverse, reset, gen)


def test_split_in_float32_accumulates_in_float32():
    gen = torch.Generator().manual_seed(3)
    _, A, u = _inputs("block", 2, 16, 2, 3, gen)
    part = BLOCK.local(A.float(), u.to(torch.bfloat16), False, None)
    h, last = part.finish(torch.zeros(2, 2, 3, dtype=torch.bfloat16))
    assert part.P.dtype == part.s.dtype == h.dtype == torch.float32
    g_A, g_u, g_h0 = part.adjoint(torch.ones_like(h), part.saved()).finish(torch.ones_like(last))
    assert (g_A.dtype, g_u.dtype, g_h0.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    ref = _with_backend("ref", lambda: BLOCK(A, u.to(torch.bfloat16).double(), None))
    torch.testing.assert_close((h.double(), last.double()), ref, rtol=1e-4, atol=1e-5)
