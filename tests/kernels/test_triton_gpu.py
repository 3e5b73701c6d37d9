"""The Triton kernels at real sizes on a GPU (bf16 and fp32 inputs, automatic chunking), against the
float64 references run on the same GPU. Marked gpu (m = 16: gpu_m16): skipped where no CUDA device is present."""
import pytest
import torch

from llm_lru.kernels import block_scan_ref, companion_scan_ref, diag_scan_ref
from llm_lru.kernels import bdlru_scan_reference, hlru_scan_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# m = 16 compiles ~270 s a case on sm_90 (bench/gpu_check_budget.py): marked gpu_m16, not gpu
M_GPU = [pytest.param(m, marks=pytest.mark.gpu) for m in (1, 2, 4, 8)] + [pytest.param(16, marks=pytest.mark.gpu_m16)]

B, T, N = 2, 2047, 64
TOL = {torch.float32: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _check(fn, ref, inputs, dtype):
    xs = [x if x is None or not x.is_floating_point() else x.cuda().to(dtype).requires_grad_() for x in inputs]
    xs = [x.cuda() if x is not None and not x.is_floating_point() else x for x in xs]
    rs = [x if x is None or not x.is_floating_point() else x.detach().double().requires_grad_() for x in xs]
    out, last = fn(*xs)
    rout, rlast = ref(*rs)
    torch.testing.assert_close(out.double(), rout, **TOL[dtype])
    torch.testing.assert_close(last.double(), rlast, **TOL[dtype])
    w1, w2 = torch.randn_like(rout), torch.randn_like(rlast)
    ((out.double() * w1).sum() + (last.double() * w2).sum()).backward()
    ((rout * w1).sum() + (rlast * w2).sum()).backward()
    for i, (x, r) in enumerate(zip(xs, rs)):
        if x is not None and x.is_floating_point():
            scale = r.grad.abs().max().clamp_min(1.0)
            torch.testing.assert_close(x.grad.double() / scale, r.grad / scale, **TOL[dtype],
                                       msg=lambda m: f"grad of input {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", M_GPU)
@pytest.mark.parametrize("reverse", [False, True])
def test_block_and_bdlru_real_size(m, reverse, dtype):
    from llm_lru.kernels.block.triton import bdlru_scan_triton, block_scan_triton
    A = torch.rand(B, T, N, m, m)
    A = A / A.sum(-1, keepdim=True) * 0.98
    u, h0 = torch.randn(B, T, N, m), torch.randn(B, N, m)
    _check(lambda A, u, h0: block_scan_triton(A, u, h0, reverse), lambda A, u, h0: block_scan_ref(A, u, h0, reverse),
           [A, u, h0], dtype)
    reset = torch.rand(B, T) < 0.01
    G = torch.randn(B, T, N, m, m + 1)
    _check(lambda G, u, h0, r: bdlru_scan_triton(G, u, h0, reverse, r),
           lambda G, u, h0, r: bdlru_scan_reference(G, u, h0, reverse, r), [G, u, h0, reset], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("reverse", [False, True])
def test_companion_and_hlru_real_size(m, reverse, dtype):
    from llm_lru.kernels.companion.triton import companion_scan_triton, hlru_scan_triton
    reset = torch.rand(B, T) < 0.01
    a = torch.rand(B, T, N, m) / m * 0.98
    x, h0 = torch.randn(B, T, N), torch.randn(B, N, m)
    _check(lambda a, x, h0, r: companion_scan_triton(a, x, h0, reverse, r),
           lambda a, x, h0, r: companion_scan_ref(a, x, h0, reverse, r), [a, x, h0, reset], dtype)
    G = torch.randn(B, T, N, m + 1)
    _check(lambda G, x, h0, r: hlru_scan_triton(G, x, h0, reverse, r, "tanh"),
           lambda G, x, h0, r: hlru_scan_reference(G, x, h0, reverse, r, "tanh"), [G, x, h0, reset], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diag_real_size_few_rows_long_T(dtype):
    """Few rows and long T: the automatic two-level (chunked) form carries the state across chunks."""
    from llm_lru.kernels.diag.triton import diag_scan_triton
    a = torch.rand(1, 32768, 8) * 0.2 + 0.79
    u, h0 = torch.randn(1, 32768, 8), torch.randn(1, 8)
    _check(lambda a, u, h0: diag_scan_triton(a, u, h0), lambda a, u, h0: diag_scan_ref(a, u, h0), [a, u, h0], dtype)
