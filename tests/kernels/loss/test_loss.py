"""The chunked linear + cross-entropy (llm_lru.kernels.loss) against the plain full-logits loss.

- Values and gradients (hidden states, head weight) equal F.linear + F.cross_entropy in float64
  and fp32 for random shapes, chunk sizes that do not divide the token count, ignored positions
  and batches where everything is ignored; the no-grad path gives the same value.
- The model's loss through it (HybridLM.loss, and no full logits anywhere): tests/models/test_loss.py.
- Route selection (fla's fused kernel on CUDA where installed) on CPU with a stand-in for fla.
"""
import math
import sys

import pytest
import torch

from llm_lru.kernels.loss import linear_cross_entropy, linear_cross_entropy_reference
from llm_lru.kernels.loss import op as loss_mod


def _case(seed, B, T, D, V, dtype=torch.float64, ignore=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=dtype) / math.sqrt(D)).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < ignore] = -100
    return h, w, y


def _value_and_grads(fn, h, w, y, **kw):
    out = fn(h, w, y, **kw)
    return (out.detach(), *torch.autograd.grad(out, (h, w)))


# (B, T, D, V, chunk): chunks that divide B*T, that do not, one chunk, one token per chunk
SHAPES = [(2, 13, 8, 37, 5), (3, 7, 4, 50, 21), (1, 16, 16, 9, 4), (2, 5, 3, 11, 1), (4, 9, 6, 23, 1000)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_plain_loss_in_float64(shape, reduction):
    B, T, D, V, chunk = shape
    h, w, y = _case(sum(shape), B, T, D, V)
    got = _value_and_grads(linear_cross_entropy, h, w, y, reduction=reduction, chunk_tokens=chunk)
    ref = _value_and_grads(linear_cross_entropy_reference, h, w, y, reduction=reduction)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    with torch.no_grad():  # the forward-only loop
        torch.testing.assert_close(linear_cross_entropy(h, w, y, reduction, chunk), ref[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_equals_plain_loss_in_fp32(shape):
    B, T, D, V, chunk = shape
    h, w, y = _case(sum(shape), B, T, D, V, torch.float32)
    got = _value_and_grads(linear_cross_entropy, h, w, y, chunk_tokens=chunk)
    ref = _value_and_grads(linear_cross_entropy_reference, h, w, y)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        assert a.dtype == torch.float32 if name == "loss" else a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_scales_with_the_incoming_gradient_and_only_wanted_inputs_get_one():
    h, w, y = _case(1, 2, 11, 5, 17)
    (linear_cross_entropy(h, w, y, chunk_tokens=3) * 2.5).backward()
    ref = _value_and_grads(linear_cross_entropy_reference, h, w, y)
    torch.testing.assert_close(h.grad, 2.5 * ref[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, 2.5 * ref[2], rtol=1e-12, atol=1e-12)
    frozen = w.detach()  # a frozen head: only the hidden states get a gradient
    (dh,) = torch.autograd.grad(linear_cross_entropy(h, frozen, y, chunk_tokens=4), (h,))
    torch.testing.assert_close(dh, ref[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(reduction):
    h, w, y = _case(2, 2, 6, 4, 9, ignore=1.0)
    assert (y == -100).all()
    loss, dh, dw = _value_and_grads(linear_cross_entropy, h, w, y, reduction=reduction, chunk_tokens=4)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()
    assert linear_cross_entropy_reference(h, w, y, reduction).item() == 0.0


def test_bad_input_is_refused_naming_it():
    h, w, y = _case(3, 2, 4, 3, 5)
    with pytest.raises(ValueError, match="train.loss_chunk_tokens"):
        linear_cross_entropy(h, w, y, chunk_tokens=0)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:, :3])
    with pytest.raises(TypeError, match="labels"):
        linear_cross_entropy(h, w, y.double())
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :2], y)


# --- route selection -----------------------------------------------------------------------

class _FakeFla(torch.nn.Module):
    """Stands in for fla's FusedLinearCrossEntropyLoss: records its arguments, computes the plain loss."""

    calls = []

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x, target, weight):
        _FakeFla.calls.append((self.kw, tuple(x.shape), tuple(target.shape)))
        return linear_cross_entropy_reference(x, weight, target, reduction=self.kw["reduction"],
                                              ignore_index=self.kw["ignore_index"])


def test_route_takes_fla_on_cuda_with_gradients_only(monkeypatch):
    monkeypatch.setattr(loss_mod, "fla_loss_class", lambda: _FakeFla)
    assert loss_mod.loss_route(torch.device("cuda", 0), needs_grad=True) == "fla"
    assert loss_mod.loss_route(torch.device("cuda", 0), needs_grad=False) == "chunked"  # eval: no gradients
    assert loss_mod.loss_route(torch.device("cpu"), needs_grad=True) == "chunked"
    monkeypatch.setattr(loss_mod, "fla_loss_class", lambda: None)
    assert loss_mod.loss_route(torch.device("cuda", 0), needs_grad=True) == "chunked"


def test_fla_absent_means_no_fla_class(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # makes `import fla...` raise ImportError
    loss_mod.fla_loss_class.cache_clear()
    try:
        assert loss_mod.fla_loss_class() is None
    finally:
        loss_mod.fla_loss_class.cache_clear()


def test_fla_route_gets_sum_reduction_and_chunk_count(monkeypatch):
    monkeypatch.setattr(loss_mod, "fla_loss_class", lambda: _FakeFla)
    monkeypatch.setattr(loss_mod, "loss_route", lambda device, needs_grad: "fla")
    _FakeFla.calls.clear()
    h, w, y = _case(5, 3, 10, 4, 13)
    for reduction in ("mean", "sum"):
        got = linear_cross_entropy(h, w, y, reduction=reduction, chunk_tokens=7)
        torch.testing.assert_close(got, linear_cross_entropy_reference(h, w, y, reduction), rtol=1e-12, atol=1e-12)
    kw, xs, ts = _FakeFla.calls[0]
    assert kw == {"ignore_index": -100, "reduction": "sum", "num_chunks": math.ceil(30 / 7)}
    assert (xs, ts) == ((30, 4), (30,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_route_equals_plain_loss(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    h, w, y = _case(6, 4, 300, 64, 1000, torch.float32)
    h, w = (t.detach().to("cuda", dtype).requires_grad_() for t in (h, w))
    got = _value_and_grads(linear_cross_entropy, h, w, y.cuda(), chunk_tokens=256)
    ref = _value_and_grads(linear_cross_entropy_reference, h, w, y.cuda())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a.float(), b.float(), msg=name, **tol)
