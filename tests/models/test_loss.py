"""The chunked linear + cross-entropy (llm_lru/models/loss.py) against the plain full-logits loss.

- Values and gradients (hidden states, head weight) equal F.linear + F.cross_entropy in float64
  and fp32 for random shapes, chunk sizes that do not divide the token count, ignored positions
  and batches where everything is ignored; the no-grad path gives the same value.
- HybridLM.loss (tied and untied head) equals cross-entropy of the model's logits (fp32), with
  every parameter's gradient; forward(labels=...) is the same path.
- Memory: with chunks much smaller than B*T, no tensor with more than chunk x V elements is
  created in the forward or the backward (every op's output is recorded by a dispatch mode);
  the same recorder sees the (B*T, V) logits of the plain loss.
- Route selection (fla's fused kernel on CUDA where installed) on CPU with a stand-in for fla.
"""
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llm_lru.config import from_dict
from llm_lru.models import HybridLM
from llm_lru.models import loss as loss_mod
from llm_lru.models.loss import linear_cross_entropy, linear_cross_entropy_reference


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


# --- the model -----------------------------------------------------------------------------

def _model(tie, V=29, **kw):
    cfg = from_dict({"data": {"source": "random"},
                     "model": dict(vocab_size=V, d_model=16, n_layers=3, pattern="BAS", n_heads=2, n_kv_heads=1,
                                   window=4, block_size=2, tie_embeddings=tie, **kw)}).model
    torch.manual_seed(0)
    return HybridLM(cfg)


def _lm_batch(B, T, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.25] = -100
    labels[1, :5] = -100
    docs = torch.rand(B, T, generator=g) < 0.1
    docs[:, 0] = True
    return ids, labels, docs


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_equals_cross_entropy_of_its_logits(tie):
    model = _model(tie)
    assert (model.head.weight is model.embed.weight) == tie
    ids, labels, docs = _lm_batch(2, 19, 29)
    ref = F.cross_entropy(model(ids, docs, pos_offset=3).reshape(-1, 29), labels.reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    loss = model.loss(ids, labels, docs, pos_offset=3, chunk_tokens=7)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        # fp32: relative to the tensor's largest entry (small entries carry the same absolute error)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name
    # forward with labels is the same path; 'sum' is the mean times the counted tokens
    total = model(ids, docs, pos_offset=3, labels=labels, loss_reduction="sum", loss_chunk_tokens=5)
    torch.testing.assert_close(total, ref * (labels != -100).sum(), rtol=1e-6, atol=1e-6)


def test_model_loss_with_state_and_wrong_labels():
    model = _model(True).eval()
    ids, labels, _ = _lm_batch(2, 8, 29)
    with torch.no_grad():
        loss, state = model(ids, state=model.init_state(2), return_state=True, labels=labels)
        ref = F.cross_entropy(model(ids).reshape(-1, 29), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    assert state.pos == 8
    with pytest.raises(ValueError, match="labels"):
        model.loss(ids, labels[:, :-1])


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _largest_vocab_tensor(fn, V):
    """Run fn() (forward and backward) under the recorder; the largest numel of a tensor with a
    dimension of size V."""
    rec = _Shapes()
    with rec:
        fn()
    return max(math.prod(s) for s in rec.shapes if V in s)


@pytest.mark.parametrize("tie", [True, False])
def test_no_full_logits_exist_forward_or_backward(tie):
    V, B, T, chunk = 997, 2, 64, 16  # V unlike any other size in the model
    model = _model(tie, V=V)
    ids, labels, docs = _lm_batch(B, T, V)

    def chunked():
        model.zero_grad()
        model.loss(ids, labels, docs, chunk_tokens=chunk).backward()

    def plain():
        model.zero_grad()
        F.cross_entropy(model(ids, docs).reshape(-1, V), labels.reshape(-1), ignore_index=-100).backward()

    assert _largest_vocab_tensor(plain, V) >= B * T * V  # the recorder sees full logits where they exist
    assert _largest_vocab_tensor(chunked, V) <= chunk * V
    with torch.no_grad():
        assert _largest_vocab_tensor(lambda: model.loss(ids, labels, docs, chunk_tokens=chunk), V) <= chunk * V


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
