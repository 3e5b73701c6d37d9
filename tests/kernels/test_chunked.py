"""The chunked PyTorch scans (each op's op.py in llm_lru.kernels) against the float64 sequential references:
values and gradients of every input on fresh random inputs, m in 1..8, T = 1 and T not a multiple
of the chunk, both directions, with and without h0, companion cut masks; gradcheck on small cases;
fp32 and bf16 inputs; the slice product."""
import itertools

import pytest
import torch

from llm_lru.kernels import block_product_ref, block_product_tree, block_scan_chunked, block_scan_ref, companion_matrix, companion_product_chunked, companion_scan_chunked, companion_scan_ref, diag_scan_chunked, diag_scan_ref

F64 = torch.float64


def stable(*shape, dtype=F64, gen=None):
    """Random transitions with signed entries and row sums of |A| <= 0.99 (so |A|_inf < 1)."""
    A = torch.randn(*shape, dtype=dtype, generator=gen)
    return A / A.abs().sum(-1, keepdim=True).clamp_min(1.0) * 0.99


def assert_same(fast, ref, inputs, tol=1e-10):
    """fast(*inputs) == ref(*inputs) in value, and so are the gradients of every floating input under
    a random linear loss on both outputs (autograd of the reference)."""
    gen = torch.Generator().manual_seed(7)
    xs = [x.detach().requires_grad_() if x is not None and x.is_floating_point() else x for x in inputs]
    rs = [x.detach().requires_grad_() if x is not None and x.is_floating_point() else x for x in inputs]
    out, last = fast(*xs)
    rout, rlast = ref(*rs)
    torch.testing.assert_close(out, rout, rtol=tol, atol=tol)
    torch.testing.assert_close(last, rlast, rtol=tol, atol=tol)
    w1 = torch.randn(rout.shape, dtype=rout.dtype, generator=gen)
    w2 = torch.randn(rlast.shape, dtype=rlast.dtype, generator=gen)
    ((out * w1).sum() + (last * w2).sum()).backward()
    ((rout * w1).sum() + (rlast * w2).sum()).backward()
    for i, (x, r) in enumerate(zip(xs, rs)):
        if x is not None and x.is_floating_point():
            assert x.grad is not None, f"input {i} got no gradient"
            torch.testing.assert_close(x.grad, r.grad, rtol=tol, atol=tol, msg=lambda s: f"grad of input {i}: {s}")


CASES = list(itertools.product(range(1, 9), [1, 13], [False, True], [False, True]))  # m, T, reverse, h0


@pytest.mark.parametrize("m,T,reverse,with_h0", CASES + [(16, 6, False, True), (16, 6, True, True)])
def test_block_scan_matches_reference(m, T, reverse, with_h0):
    gen = torch.Generator().manual_seed(100 * m + T)
    B, N = 2, 3
    A = stable(B, T, N, m, m, gen=gen)
    u = torch.randn(B, T, N, m, dtype=F64, generator=gen)
    h0 = torch.randn(B, N, m, dtype=F64, generator=gen) if with_h0 else None
    # chunk 4: several chunks and a partial last one (13 = 3 * 4 + 1)
    assert_same(lambda A, u, h0: block_scan_chunked(A, u, h0, reverse, chunk=4),
                lambda A, u, h0: block_scan_ref(A, u, h0, reverse), [A, u, h0])


@pytest.mark.parametrize("T,reverse,with_h0", list(itertools.product([1, 2, 12, 13, 37], [False, True], [False, True])))
def test_diag_scan_matches_reference(T, reverse, with_h0):
    gen = torch.Generator().manual_seed(T)
    B, N = 2, 5
    a = stable(B, T, N, 1, gen=gen)[..., 0]
    u = torch.randn(B, T, N, dtype=F64, generator=gen)
    h0 = torch.randn(B, N, dtype=F64, generator=gen) if with_h0 else None
    for chunk in (None, 4):
        assert_same(lambda a, u, h0: diag_scan_chunked(a, u, h0, reverse, chunk=chunk),
                    lambda a, u, h0: diag_scan_ref(a, u, h0, reverse), [a, u, h0])


def _cuts(B, T, gen):
    """Random cuts with a cut on the first and last step of row 0 (the edges of the slice)."""
    reset = torch.rand(B, T, generator=gen) < 0.25
    reset[0, 0] = reset[0, -1] = True
    return reset


@pytest.mark.parametrize("m,T,reverse,with_h0", CASES)
def test_companion_scan_matches_reference(m, T, reverse, with_h0):
    gen = torch.Generator().manual_seed(10 * m + T + 1)
    B, N = 2, 3
    a = stable(B, T, N, m, gen=gen)
    x = torch.randn(B, T, N, dtype=F64, generator=gen)
    h0 = torch.randn(B, N, m, dtype=F64, generator=gen) if with_h0 else None
    for reset in (None, _cuts(B, T, gen)):
        assert_same(lambda a, x, h0, r: companion_scan_chunked(a, x, h0, reverse, r, chunk=4),
                    lambda a, x, h0, r: companion_scan_ref(a, x, h0, reverse, r), [a, x, h0, reset])


@pytest.mark.parametrize("m", [1, 2, 5])
def test_companion_longer_chunks_and_short_chunks(m):
    """Chunks shorter than the order (the chunk-end state reaches into the previous chunk) and
    the default chunk on a longer sequence."""
    gen = torch.Generator().manual_seed(m)
    B, T, N = 2, 50, 2
    a, x = stable(B, T, N, m, gen=gen), torch.randn(B, T, N, dtype=F64, generator=gen)
    h0, reset = torch.randn(B, N, m, dtype=F64, generator=gen), _cuts(B, T, gen)
    for chunk, reverse in itertools.product((1, 2, None), (False, True)):
        assert_same(lambda a, x, h0, r: companion_scan_chunked(a, x, h0, reverse, r, chunk=chunk),
                    lambda a, x, h0, r: companion_scan_ref(a, x, h0, reverse, r), [a, x, h0, reset])


@pytest.mark.parametrize("m,T", [(1, 1), (2, 7), (3, 8), (4, 13), (16, 3)])
def test_block_product_matches_reference(m, T):
    gen = torch.Generator().manual_seed(m * T)
    A = stable(2, T, 3, m, m, gen=gen)
    for reverse in (False, True):
        Af, Ar = A.clone().requires_grad_(), A.clone().requires_grad_()
        P, R = block_product_tree(Af, reverse), block_product_ref(Ar, reverse)
        torch.testing.assert_close(P, R, rtol=1e-12, atol=1e-12)
        w = torch.randn(P.shape, dtype=F64, generator=gen)
        (P * w).sum().backward()
        (R * w).sum().backward()
        torch.testing.assert_close(Af.grad, Ar.grad, rtol=1e-12, atol=1e-12)


def test_block_product_is_the_state_map():
    """h_last(h0) = P h0 + h_last(0) for the chunked scan, both directions."""
    gen = torch.Generator().manual_seed(3)
    A, u, h0 = stable(2, 11, 3, 4, 4, gen=gen), torch.randn(2, 11, 3, 4, dtype=F64), torch.randn(2, 3, 4, dtype=F64)
    for reverse in (False, True):
        P = block_product_tree(A, reverse)
        _, with_h0 = block_scan_chunked(A, u, h0, reverse, chunk=3)
        _, without = block_scan_chunked(A, u, None, reverse, chunk=3)
        torch.testing.assert_close(with_h0, torch.einsum("bnij,bnj->bni", P, h0) + without)


def test_gradcheck_small_float64():
    gen = torch.Generator().manual_seed(0)
    B, T, N, m = 1, 5, 2, 3
    A = stable(B, T, N, m, m, gen=gen).requires_grad_()
    u = torch.randn(B, T, N, m, dtype=F64, generator=gen, requires_grad=True)
    h0 = torch.randn(B, N, m, dtype=F64, generator=gen, requires_grad=True)
    a = stable(B, T, N, m, gen=gen).requires_grad_()
    x = torch.randn(B, T, N, dtype=F64, generator=gen, requires_grad=True)
    reset = torch.tensor([[False, False, True, False, False]])
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda A, u, h0: block_scan_chunked(A, u, h0, reverse, chunk=2),
                                        (A, u, h0))
        assert torch.autograd.gradcheck(
            lambda a, u, h0: diag_scan_chunked(a, u, h0, reverse, chunk=2),
            (A[..., 0, 0].detach().requires_grad_(), u[..., 0].detach().requires_grad_(),
             h0[..., 0].detach().requires_grad_()))
        assert torch.autograd.gradcheck(
            lambda a, x, h0: companion_scan_chunked(a, x, h0, reverse, reset, chunk=2), (a, x, h0))
        assert torch.autograd.gradcheck(lambda A: block_product_tree(A, reverse), (A,))


def test_h_last_is_the_last_state_in_scan_order():
    gen = torch.Generator().manual_seed(5)
    A, u = stable(2, 9, 3, 2, 2, gen=gen), torch.randn(2, 9, 3, 2, dtype=F64, generator=gen)
    a, x = stable(2, 9, 3, 3, gen=gen), torch.randn(2, 9, 3, dtype=F64, generator=gen)
    for reverse in (False, True):
        i = 0 if reverse else -1
        h, last = block_scan_chunked(A, u, None, reverse, chunk=4)
        assert torch.equal(last, h[:, i])
        h, last = diag_scan_chunked(A[..., 0, 0], u[..., 0], None, reverse, chunk=4)
        assert torch.equal(last, h[:, i])
        y, s = companion_scan_chunked(a, x, None, reverse, None, chunk=4)
        assert torch.equal(s[..., 0], y[:, i])
        # the rest of the companion state is the previous outputs in scan order
        prev = y[:, i - 1] if not reverse else y[:, 1]
        torch.testing.assert_close(s[..., 1], prev)


def test_float32_inputs_against_float64_reference():
    """A long-ish scan in fp32 (default chunk) stays within fp32 accumulation error of fp64."""
    gen = torch.Generator().manual_seed(11)
    B, T, N, m = 2, 300, 4, 4
    A, u, h0 = stable(B, T, N, m, m, gen=gen), torch.randn(B, T, N, m, dtype=F64, generator=gen), \
        torch.randn(B, N, m, dtype=F64, generator=gen)
    a, x = stable(B, T, N, m, gen=gen), torch.randn(B, T, N, dtype=F64, generator=gen)
    reset = torch.rand(B, T, generator=gen) < 0.02
    tol = dict(rtol=1e-4, atol=1e-4)
    for reverse in (False, True):
        h, last = block_scan_chunked(A.float(), u.float(), h0.float(), reverse)
        rh, rlast = block_scan_ref(A, u, h0, reverse)
        assert h.dtype == torch.float32
        torch.testing.assert_close(h.double(), rh, **tol)
        torch.testing.assert_close(last.double(), rlast, **tol)
        h, _ = diag_scan_chunked(A[..., 0, 0].float(), u[..., 0].float(), h0[..., 0].float(), reverse)
        rh, _ = diag_scan_ref(A[..., 0, 0], u[..., 0], h0[..., 0], reverse)
        torch.testing.assert_close(h.double(), rh, **tol)
        y, s = companion_scan_chunked(a.float(), x.float(), h0.float(), reverse, reset)
        ry, rs = companion_scan_ref(a, x, h0, reverse, reset)
        torch.testing.assert_close(y.double(), ry, **tol)
        torch.testing.assert_close(s.double(), rs, **tol)


def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 inputs give fp32 states equal (to fp32 error) to the fp64 scan of the same bf16 values,
    and gradients in the inputs' dtype."""
    gen = torch.Generator().manual_seed(12)
    B, T, N, m = 2, 200, 3, 2
    A = stable(B, T, N, m, m, gen=gen).bfloat16().requires_grad_()
    u = torch.randn(B, T, N, m, generator=gen).bfloat16().requires_grad_()
    h, last = block_scan_chunked(A, u)
    assert h.dtype == torch.float32 and last.dtype == torch.float32
    rh, _ = block_scan_ref(A.detach().double(), u.detach().double())
    torch.testing.assert_close(h.double(), rh, rtol=1e-4, atol=1e-4)
    (h.sum() + last.sum()).backward()
    assert A.grad.dtype == torch.bfloat16 and u.grad.dtype == torch.bfloat16
    a = stable(B, T, N, 3, gen=gen).bfloat16().requires_grad_()
    x = torch.randn(B, T, N, generator=gen).bfloat16().requires_grad_()
    y, s = companion_scan_chunked(a, x)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    ry, _ = companion_scan_ref(a.detach().double(), x.detach().double())
    torch.testing.assert_close(y.double(), ry, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert a.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    d, _ = diag_scan_chunked(A[..., 0, 0].detach(), u[..., 0].detach())
    assert d.dtype == torch.float32


@pytest.mark.parametrize("m,T", [(1, 5), (3, 2), (3, 13), (5, 9)])
def test_companion_product_matches_materialised_product(m, T):
    """The companion slice map without (B, T, N, m, m): equal, with gradients, to the product of the
    materialised companion matrices (cut steps zeroed), also for T < m."""
    gen = torch.Generator().manual_seed(m + 7 * T)
    B, N = 2, 3
    a = stable(B, T, N, m, gen=gen)
    for reverse, reset in itertools.product((False, True), (None, _cuts(B, T, gen))):
        af, ar = a.clone().requires_grad_(), a.clone().requires_grad_()
        P = companion_product_chunked(af, reverse, reset)
        Cm = companion_matrix(ar)
        if reset is not None:
            Cm = Cm * (~reset).to(F64)[:, :, None, None, None]
        R = block_product_ref(Cm, reverse)
        torch.testing.assert_close(P, R, rtol=1e-10, atol=1e-10)
        w = torch.randn(P.shape, dtype=F64, generator=gen)
        (P * w).sum().backward()
        (R * w).sum().backward()
        torch.testing.assert_close(af.grad, ar.grad, rtol=1e-10, atol=1e-10)


def test_mixed_dtypes_and_strided_inputs():
    """Mixed float dtypes promote like the reference (fp64 h0 -> fp64 states), and non-contiguous
    inputs (transposed views, expanded values) are read as they are."""
    gen = torch.Generator().manual_seed(13)
    B, T, N, m = 2, 10, 3, 3
    At = stable(B, T, N, m, m, gen=gen).float().transpose(-1, -2)  # a view, not contiguous
    u = torch.randn(1, T, N, m, generator=gen).bfloat16().expand(B, T, N, m)
    h0 = torch.randn(B, N, m, dtype=F64, generator=gen)
    for reverse in (False, True):
        h, last = block_scan_chunked(At, u, h0, reverse, chunk=4)
        rh, rlast = block_scan_ref(At, u, h0, reverse)
        assert h.dtype == rh.dtype == F64
        torch.testing.assert_close(h, rh)
        torch.testing.assert_close(last, rlast)


def test_backward_keeps_no_per_step_graph():
    """One autograd node per scan, straight onto the inputs, saving no more than inputs and outputs."""
    gen = torch.Generator().manual_seed(14)
    B, T, N, m = 2, 40, 3, 2
    A = stable(B, T, N, m, m, gen=gen).requires_grad_()
    u = torch.randn(B, T, N, m, dtype=F64, generator=gen, requires_grad=True)
    h0 = torch.randn(B, N, m, dtype=F64, generator=gen, requires_grad=True)
    a, x = stable(B, T, N, m, gen=gen).requires_grad_(), u[..., 0].detach().requires_grad_()
    ad, hd = A[..., 0, 0].detach().requires_grad_(), h0[..., 0].detach().requires_grad_()
    runs = [(block_scan_chunked(A, u, h0)[0], (A, u, h0)),
            (diag_scan_chunked(ad, x, hd)[0], (ad, x, hd)),
            (companion_scan_chunked(a, x, h0)[0], (a, x, h0))]
    for out, leaves in runs:
        node = out.grad_fn
        nexts = [f for f, _ in node.next_functions if f is not None]
        assert all(type(f).__name__ == "AccumulateGrad" for f in nexts), nexts
        assert {id(f.variable) for f in nexts} == {id(v) for v in leaves}
        saved = sum(t.numel() for t in node.saved_tensors if t is not None)
        assert saved <= sum(v.numel() for v in leaves) + out.numel()
