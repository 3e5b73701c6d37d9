"""The delta rule's PyTorch forms against its float64 reference: values, final states and the
gradients of q, k, v, beta and h0, with and without document starts, T not a multiple of the chunk."""
import pytest
import torch

from llm_lru.kernels.delta import delta_rule, delta_rule_chunked, delta_rule_ref, delta_rule_sequential


def inputs(B=2, T=11, H=2, K=4, V=3, seed=0, h0=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if h0 else None
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, beta, s0)]


def grads(fn, args, reset=None):
    o, last = fn(*args, reset=reset) if reset is not None else fn(*args)
    g = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (last * torch.randn(last.shape, generator=g, dtype=o.dtype)).sum()
    got = torch.autograd.grad(loss, [a for a in args if a is not None])
    return o.detach(), last.detach(), got


def test_reference_by_hand_one_step():
    # One head, K = V = 2, from zeros: S_1 = beta k v^T, o = S_1^T q = beta (k . q) v.
    q = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.6, 0.8]]]], dtype=torch.float64)
    v = torch.tensor([[[[3.0, -1.0]]]], dtype=torch.float64)
    beta = torch.tensor([[[0.5]]], dtype=torch.float64)
    o, last = delta_rule_ref(q, k, v, beta)
    assert torch.allclose(o[0, 0, 0], torch.tensor([0.5 * 2.2 * 3.0, 0.5 * 2.2 * -1.0], dtype=torch.float64))
    assert torch.allclose(last[0, 0], 0.5 * torch.outer(k[0, 0, 0], v[0, 0, 0]))


@pytest.mark.parametrize("form", ["sequential", "chunked"])
@pytest.mark.parametrize("T,h0", [(11, True), (32, False), (5, True)])
def test_forms_match_reference_values_and_gradients(form, T, h0):
    args = inputs(T=T, h0=h0)
    fn = delta_rule_sequential if form == "sequential" else (lambda *a: delta_rule_chunked(*a, chunk_size=4))
    o, last, g = grads(fn, args)
    o_ref, last_ref, g_ref = grads(delta_rule_ref, args)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_document_starts_match_reference():
    args = inputs(T=9)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, 4] = reset[1, 0] = reset[1, 7] = True
    o, last, g = grads(lambda *a, reset: delta_rule(*a, reset=reset), args, reset)
    o_ref, last_ref, g_ref = grads(delta_rule_ref, args, reset)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="sequential"):
        delta_rule(*args, reset=reset, form="chunked")


def test_float32_state_accumulates_in_float32_and_shapes_are_checked():
    q, k, v, beta, s0 = (x.detach().float() for x in inputs(T=7))
    o, last = delta_rule(q, k, v, beta, s0)
    assert o.dtype == torch.float32 and last.shape == s0.shape
    o_ref, _ = delta_rule_ref(q, k, v, beta, s0)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[..., :1])
