"""The Triton split-phase scans (kernels/common/triton.py TritonLocal, per op in each op's triton.py) against the float64 sequential reference,
through test_local's `_check_split` (the map (P, s), the states from h0, a = dL/dh0 with
dL/dh_last = 0, a + P^T dL/dh_last, every input's gradient): every op (block m = 1..4, diag,
companion m = 1..4, the fused BD-LRU / H-LRU), both directions, document starts, one chunk (what
the ops choose off CUDA) and forced chunks with T not a multiple of the chunk (the folds of the
chunk maps and adjoint carries), h0 given and None, fp32 / bf16 inputs. CPU tensors under
TRITON_INTERPRET=1 at tiny sizes (as test_local's references; skipped where the kernels compile);
on CUDA the ops' own split at a length where the launch cuts the slice into chunks, against the
unsplit Triton scans under autograd."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be on before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU tensors: Triton runs them only interpreted")

from llm_lru.kernels import BLOCK, DIAG, TwoPassScan, transition_mask  # noqa: E402
from llm_lru.kernels.block.triton import block_local_triton  # noqa: E402
from llm_lru.kernels.companion.triton import companion_local_triton  # noqa: E402
from llm_lru.kernels.diag.triton import diag_local_triton  # noqa: E402

from .test_carry import _inputs, _resets  # noqa: E402
from .test_local import _check_split, _state, _with_backend  # noqa: E402

CASES = ([("block", m) for m in (1, 2, 3, 4)] + [("diag", 1)] + [("companion", m) for m in (1, 2, 3, 4)]
         + [("bdlru", 2), ("bdlru", 3), ("hlru", 1), ("hlru", 3)])


def _split(name, op, trans, u, reverse, reset, chunk):
    """The op's split: through op.local on the "triton" backend (chunk None: what the op picks),
    or the Triton split itself at a forced chunk length."""
    if chunk is None:
        part = _with_backend("triton", lambda: op.local(trans, u, reverse, reset))
        assert not isinstance(part, TwoPassScan)
        return part
    cut = transition_mask(reset, reverse)
    if name == "diag":
        return diag_local_triton(trans, u, reverse, cut, chunk=chunk)
    norm = "softmax" if name in ("bdlru", "hlru") else None
    fn = companion_local_triton if name in ("companion", "hlru") else block_local_triton
    return fn(trans, u, reverse, cut, norm=norm, op=op, chunk=chunk)


def _case(name, m, T, seed, with_reset=True, B=4, N=2):  # B = 4: _resets has four kinds of rows
    gen = torch.Generator().manual_seed(seed)
    op, trans, u = _inputs(name, B, T, N, m, gen)
    reset = _resets(B, T, gen) if with_reset else None
    return gen, op, trans, u, reset


@needs_interpreter
@pytest.mark.parametrize("name,m", CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk,with_reset", [(None, True), (3, True), (3, False)])
def test_triton_split_matches_reference(name, m, reverse, chunk, with_reset):
    """T = 7: one chunk, or chunks of 3 (the last one short); h0 given."""
    gen, op, trans, u, reset = _case(name, m, 7, hash((name, m, reverse, chunk, with_reset)) % 2**31, with_reset)
    part = _split(name, op, trans, u, reverse, reset, chunk)
    h0 = _state(DIAG if name == "diag" else BLOCK, 4, 2, m, gen)
    _check_split(part, op, trans, u, h0, reverse, reset, gen, tol=1e-9)


@needs_interpreter
@pytest.mark.parametrize("name,m", [("block", 3), ("diag", 1), ("companion", 3), ("hlru", 2)])
@pytest.mark.parametrize("chunk", [None, 2])
def test_triton_split_without_h0(name, m, chunk):
    """finish(None) scans from zeros and gives no dL/dh0; a and the other gradients as the
    reference from a zero h0; missing dL/dh and dL/dh_last are zeros."""
    reverse = chunk is None
    gen, op, trans, u, reset = _case(name, m, 5, 17 + m)
    part = _split(name, op, trans, u, reverse, reset, chunk)
    h, last = part.finish(None)
    wh = torch.randn(h.shape, dtype=h.dtype, generator=gen)
    wl = torch.randn(last.shape, dtype=h.dtype, generator=gen)

    def ref():
        x = [trans.clone().requires_grad_(), u.clone().requires_grad_(), torch.zeros_like(part.s).requires_grad_()]
        rh, rlast = op(*x, reverse, reset)
        a = torch.autograd.grad((rh * wh).sum(), x[2], retain_graph=True)[0]
        return rh, rlast, a, torch.autograd.grad((rh * wh).sum() + (rlast * wl).sum(), x[:2])
    rh, rlast, ra, rgrads = _with_backend("ref", ref)
    torch.testing.assert_close((h, last), (rh.detach(), rlast.detach()), rtol=1e-9, atol=1e-9)
    grad = part.adjoint(wh, part.saved())
    torch.testing.assert_close(grad.a, ra, rtol=1e-9, atol=1e-9)
    g_trans, g_u, g_h0 = grad.finish(wl)
    assert g_h0 is None
    torch.testing.assert_close((g_trans, g_u), rgrads, rtol=1e-9, atol=1e-9)

    part = _split(name, op, trans, u, reverse, reset, chunk)
    h, _ = part.finish(None)
    grad = part.adjoint(None, part.saved())
    assert not grad.a.any()
    g_trans, g_u, g_h0 = grad.finish(None)
    assert g_h0 is None and not g_trans.any() and not g_u.any()


@needs_interpreter
@pytest.mark.parametrize("name,m", [("block", 2), ("companion", 2), ("bdlru", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_split_in_half_precision_accumulates_in_float32(name, m, dtype):
    gen, op, trans, u, reset = _case(name, m, 6, 5)
    trans, u = trans.to(dtype), u.to(dtype)
    part = _split(name, op, trans, u, False, reset, 4)
    h0 = torch.randn(part.s.shape, generator=gen).to(torch.bfloat16)
    h, last = part.finish(h0)
    assert part.P.dtype == part.s.dtype == h.dtype == last.dtype == torch.float32
    ref = _with_backend("ref", lambda: op(trans.double(), u.double(), h0.double(), False, reset))
    torch.testing.assert_close((h.double(), last.double()), ref, rtol=1e-4, atol=1e-5)
    grad = part.adjoint(torch.ones_like(h), part.saved())
    assert grad.a.dtype == torch.float32
    g_trans, g_u, g_h0 = grad.finish(torch.ones_like(last))
    assert (g_trans.dtype, g_u.dtype, g_h0.dtype) == (dtype, dtype, torch.bfloat16)


@pytest.mark.parametrize("name,m", [("block", 4), ("diag", 1), ("companion", 4), ("bdlru", 4), ("hlru", 4)])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_split_matches_unsplit_scan(name, m, reverse):
    """op.local on the automatic launch (on CUDA, few rows x T = 1024: several chunks; under the
    interpreter one) against the unsplit Triton op under autograd and its one-chunk carry, in fp64."""
    dev, T = ("cpu", 6) if INTERPRET else ("cuda", 1024)
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device and no interpreter")
    gen, op, trans, u, reset = _case(name, m, T, 23 + m + reverse)
    trans, u, reset = trans.to(dev), u.to(dev), reset.to(dev)
    h0 = _state(DIAG if name == "diag" else BLOCK, 4, 2, m, gen).to(dev)
    part = _with_backend("triton", lambda: op.local(trans, u, reverse, reset))
    assert not isinstance(part, TwoPassScan)
    h, last = part.finish(h0)
    wh = torch.randn(h.shape, dtype=h.dtype, generator=gen).to(dev)
    wl = torch.randn(last.shape, dtype=h.dtype, generator=gen).to(dev)
    grad = part.adjoint(wh, part.saved())
    got = dict(P=part.P, s=part.s, h=h, last=last, a=grad.a, h0_grad=grad.h0_grad(wl))
    got["g_trans"], got["g_u"], got["g_h0"] = grad.finish(wl)

    def unsplit():
        x = [t.clone().requires_grad_() for t in (trans, u, h0)]
        rh, rlast = op(*x, reverse, reset)
        a = torch.autograd.grad((rh * wh).sum(), x[2], retain_graph=True)[0]
        g = torch.autograd.grad((rh * wh).sum() + (rlast * wl).sum(), x)
        P, s = op.carry(trans, u, reverse, reset)
        return dict(P=P, s=s, h=rh.detach(), last=rlast.detach(), a=a, h0_grad=g[2], g_trans=g[0], g_u=g[1],
                    g_h0=g[2])
    want = _with_backend("triton", unsplit)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-9, msg=lambda e: f"{k}: {e}")
