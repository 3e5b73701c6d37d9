"""HybridLM.loss through the chunked linear + cross-entropy (llm_lru.kernels.loss, tested on its own in
tests/kernels/loss/test_loss.py):

- HybridLM.loss (tied and untied head) equals cross-entropy of the model's logits (fp32), with
  every parameter's gradient; forward(labels=...) is the same path.
- Memory: with chunks much smaller than B*T, no tensor with more than chunk x V elements is
  created in the forward or the backward (every op's output is recorded by a dispatch mode);
  the same recorder sees the (B*T, V) logits of the plain loss.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llm_lru.config import from_dict
from llm_lru.models import HybridLM


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
