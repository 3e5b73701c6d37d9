"""The public scan API: input errors name the tensor, backend dispatch, and the ScanOps (document
starts as cuts, products) on the chunked path against the references."""
import subprocess
import sys

import pytest
import torch

import llm_lru.kernels as K
import llm_lru.kernels.block.op as block_op

F64 = torch.float64


@pytest.fixture
def backend():
    before = K.get_backend()
    yield K.set_backend
    K.set_backend(before)


def _block(B=2, T=5, N=3, m=2, dtype=torch.float32):
    return torch.rand(B, T, N, m, m, dtype=dtype) / m, torch.randn(B, T, N, m, dtype=dtype)


@pytest.mark.parametrize("fn", [K.block_scan, K.block_scan_chunked, K.block_scan_ref])
def test_block_input_errors_name_the_tensor(fn):
    A, u = _block()
    with pytest.raises(ValueError, match=r"^A: expected shape"):
        fn(A[:, :4], u)
    with pytest.raises(ValueError, match=r"^A: expected shape"):
        fn(A[..., :1], u)
    with pytest.raises(ValueError, match=r"^u: expected shape"):
        fn(A, u[..., 0])
    with pytest.raises(ValueError, match=r"^h0: expected shape \(B, N, m\)"):
        fn(A, u, torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"^u: block size m=17 outside"):
        fn(torch.zeros(1, 2, 1, 17, 17), torch.zeros(1, 2, 1, 17))
    with pytest.raises(TypeError, match=r"^A: expected a floating-point tensor"):
        fn(A.long(), u)
    with pytest.raises(TypeError, match=r"^h0: expected a floating-point tensor"):
        fn(A, u, torch.zeros(2, 3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"different devices: A=cpu, u=meta"):
        fn(A, u.to("meta"))


@pytest.mark.parametrize("fn", [K.diag_scan, K.diag_scan_chunked])
def test_diag_input_errors_name_the_tensor(fn):
    a, u = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"^a: expected shape"):
        fn(a[:, :, :2], u)
    with pytest.raises(ValueError, match=r"^h0: expected shape"):
        fn(a, u, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"different devices: a=meta"):
        fn(a.to("meta"), u)


@pytest.mark.parametrize("fn", [K.companion_scan, K.companion_scan_chunked])
def test_companion_input_errors_name_the_tensor(fn):
    a, x = torch.rand(2, 5, 3, 4) / 4, torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"^a: expected shape"):
        fn(a[:, :4], x)
    with pytest.raises(ValueError, match=r"^a: order m=17 outside"):
        fn(torch.zeros(2, 5, 3, 17), x)
    with pytest.raises(ValueError, match=r"^h0: expected shape"):
        fn(a, x, torch.zeros(2, 3, 3))
    with pytest.raises(TypeError, match=r"^reset: expected a bool tensor"):
        fn(a, x, None, False, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"^reset: expected shape \(B, T\)"):
        fn(a, x, None, False, torch.zeros(2, 4, dtype=torch.bool))


def test_block_product_input_errors_name_the_tensor():
    with pytest.raises(ValueError, match=r"^A: expected shape"):
        K.block_product_tree(torch.zeros(1, 3, 2, 2, 3))
    with pytest.raises(ValueError, match=r"^A: expected shape"):
        K.block_product_tree(torch.zeros(3, 2, 2, 2))


def test_backend_dispatch(backend, monkeypatch):
    A, u = _block()
    calls = []
    monkeypatch.setattr(block_op, "block_scan_chunked", lambda *a: calls.append("torch") or K.block_scan_chunked(*a))
    monkeypatch.setattr(block_op, "block_scan_ref", lambda *a: calls.append("ref") or K.block_scan_ref(*a))
    for name in ("auto", "torch", "ref"):
        backend(name)
        assert K.resolve_backend("block", A, u) == ("torch" if name == "auto" else name)
        K.block_scan(A, u)
    assert calls == ["torch", "torch", "ref"]
    backend("triton")
    assert K.resolve_backend("block", A, u) == "triton"
    with pytest.raises(ValueError, match="unknown 'cuda'"):
        backend("cuda")


def test_cpu_scans_never_import_triton():
    code = ("import sys, torch, llm_lru.kernels as K\n"
            "A = torch.rand(1, 3, 2, 2, 2) / 2; u = torch.randn(1, 3, 2, 2)\n"
            "K.block_scan(A, u); K.diag_scan(A[..., 0, 0], u[..., 0]); K.companion_scan(A[..., 0, :], u[..., 0])\n"
            "K.block_product(A)\n"
            "assert 'triton' not in sys.modules and not [m for m in sys.modules if m.startswith('llm_lru.kernels') and m.endswith('.triton')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={"LLM_LRU_SCAN": "auto", "OMP_NUM_THREADS": "1"})


def _ops_outputs(op, trans, u, h0, reverse, reset):
    """Outputs, product and gradients of one ScanOp call."""
    trans, u, h0 = (t.detach().requires_grad_() for t in (trans, u, h0))
    h, last = op(trans, u, h0, reverse, reset)
    P = op.product(trans, reverse, reset)
    (h.sum() + 2 * last.sum() + P.sum()).backward()
    return [h, last, P, trans.grad, u.grad, h0.grad]


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_ops_torch_backend_equal_reference_backend(backend, reverse):
    """The three ScanOps with document starts give the same values, products and gradients on the
    chunked path as on the sequential reference."""
    gen = torch.Generator().manual_seed(2)
    B, T, N, m = 2, 23, 3, 3
    doc_start = torch.rand(B, T, generator=gen) < 0.2
    doc_start[:, 0] = True
    A = torch.rand(B, T, N, m, m, dtype=F64, generator=gen) / m
    a = torch.rand(B, T, N, m, dtype=F64, generator=gen) / m
    u = torch.randn(B, T, N, m, dtype=F64, generator=gen)
    h0 = torch.randn(B, N, m, dtype=F64, generator=gen)
    args = {K.BLOCK: (A, u, h0), K.DIAG: (A[..., 0, 0], u[..., 0], h0[..., 0]), K.COMPANION: (a, u[..., 0], h0)}
    for op, (trans, x, s0) in args.items():
        backend("ref")
        want = _ops_outputs(op, trans, x, s0, reverse, doc_start)
        backend("torch")
        got = _ops_outputs(op, trans, x, s0, reverse, doc_start)
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda s: f"{op.name} output {i}: {s}")
        # the product is the state map of the slice: h_last(h0) = P h0 + h_last(0)
        P = op.product(trans, reverse, doc_start)
        torch.testing.assert_close(op(trans, x, s0, reverse, doc_start)[1],
                                   op.apply(P, s0) + op(trans, x, None, reverse, doc_start)[1])
