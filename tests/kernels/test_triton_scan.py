"""Triton scan kernels against the float64 sequential references: values and gradients of every
input, m in 1..4 (and 16 once), odd T, both directions, resets, h0, chunked two-level form,
fp32 and bf16 inputs. On CPU they run under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be on before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llm_lru.kernels import block_scan_ref, companion_scan_ref, diag_scan_ref  # noqa: E402
from llm_lru.kernels.gates import NORMS, bdlru_scan_reference, hlru_scan_reference  # noqa: E402
from llm_lru.kernels.triton import (bdlru_scan_triton, block_scan_triton, companion_scan_triton,  # noqa: E402
                                    diag_scan_triton, hlru_scan_triton)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _grads_match(fn, ref, inputs, dtype, tol):
    """Run fn on `inputs` cast to dtype and ref on the same values in float64; compare outputs and
    the gradients of every input under a random linear loss on both outputs."""
    gen = torch.Generator().manual_seed(1)
    xs = [x if x is None or not x.is_floating_point() else x.to(DEV, dtype).requires_grad_() for x in inputs]
    # the reference sees exactly the values the kernel sees (bf16-rounded), in float64
    rs = [x if x is None or not x.is_floating_point() else x.detach().double().requires_grad_() for x in xs]
    xs = [x.to(DEV) if x is not None and not x.is_floating_point() else x for x in xs]
    out, last = fn(*xs)
    rout, rlast = ref(*rs)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    torch.testing.assert_close(out.double(), rout, **tol)
    torch.testing.assert_close(last.double(), rlast, **tol)
    w1 = torch.randn(rout.shape, generator=gen, dtype=torch.float64).to(DEV)
    w2 = torch.randn(rlast.shape, generator=gen, dtype=torch.float64).to(DEV)
    ((out.double() * w1).sum() + (last.double() * w2).sum()).backward()
    ((rout * w1).sum() + (rlast * w2).sum()).backward()
    for i, (x, r) in enumerate(zip(xs, rs)):
        if x is None or not x.is_floating_point():
            continue
        assert x.grad is not None and x.grad.dtype == dtype, f"input {i}"
        torch.testing.assert_close(x.grad.double(), r.grad, **tol, msg=lambda m: f"grad of input {i}: {m}")


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
CASES = [  # (m, T, reverse, with h0, with reset, chunk)
    (1, 9, False, True, True, None), (1, 11, True, False, True, 4),
    (2, 7, False, False, False, 3), (2, 9, True, True, True, None),
    (3, 13, False, True, True, 5), (3, 5, True, True, False, 2),
    (4, 9, False, True, True, 4), (4, 11, True, True, True, None),
]


def _case_inputs(m, T, with_h0, with_reset, B=2, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(B, N, m, generator=g) if with_h0 else None
    reset = (torch.rand(B, T, generator=g) < 0.25) if with_reset else None
    return g, h0, reset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,T,reverse,with_h0,with_reset,chunk", CASES)
def test_block_scan(m, T, reverse, with_h0, with_reset, chunk, dtype):
    g, h0, _ = _case_inputs(m, T, with_h0, False)
    A = torch.randn(2, T, 3, m, m, generator=g) / m
    u = torch.randn(2, T, 3, m, generator=g)
    _grads_match(lambda A, u, h0: block_scan_triton(A, u, h0, reverse, chunk=chunk),
                 lambda A, u, h0: block_scan_ref(A, u, h0, reverse), [A, u, h0], dtype, TOL[dtype])


@pytest.mark.parametrize("T,reverse,chunk", [(9, False, None), (11, True, 3), (1, False, None)])
def test_diag_scan(T, reverse, chunk):
    g = torch.Generator().manual_seed(2)
    a, u, h0 = torch.randn(2, T, 3, generator=g), torch.randn(2, T, 3, generator=g), torch.randn(2, 3, generator=g)
    _grads_match(lambda a, u, h0: diag_scan_triton(a, u, h0, reverse, chunk=chunk),
                 lambda a, u, h0: diag_scan_ref(a, u, h0, reverse), [a, u, h0], torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,T,reverse,with_h0,with_reset,chunk", CASES)
def test_companion_scan(m, T, reverse, with_h0, with_reset, chunk, dtype):
    g, h0, reset = _case_inputs(m, T, with_h0, with_reset)
    a = torch.randn(2, T, 3, m, generator=g) / m
    x = torch.randn(2, T, 3, generator=g)
    _grads_match(lambda a, x, h0, r: companion_scan_triton(a, x, h0, reverse, r, chunk=chunk),
                 lambda a, x, h0, r: companion_scan_ref(a, x, h0, reverse, r), [a, x, h0, reset], dtype, TOL[dtype])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("m,T,reverse,with_h0,with_reset,chunk", CASES)
def test_bdlru_fused(m, T, reverse, with_h0, with_reset, chunk, norm):
    g, h0, reset = _case_inputs(m, T, with_h0, with_reset)
    logits = 2 * torch.randn(2, T, 3, m, m + 1, generator=g)
    v = torch.randn(2, T, 3, m, generator=g)
    dtype = torch.bfloat16 if norm == "sigmoid" else torch.float32
    _grads_match(lambda G, v, h0, r: bdlru_scan_triton(G, v, h0, reverse, r, norm, chunk=chunk),
                 lambda G, v, h0, r: bdlru_scan_reference(G, v, h0, reverse, r, norm),
                 [logits, v, h0, reset], dtype, TOL[dtype])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("m,T,reverse,with_h0,with_reset,chunk", CASES)
def test_hlru_fused(m, T, reverse, with_h0, with_reset, chunk, norm):
    g, h0, reset = _case_inputs(m, T, with_h0, with_reset)
    logits = 2 * torch.randn(2, T, 3, m + 1, generator=g)
    v = torch.randn(2, T, 3, generator=g)
    dtype = torch.bfloat16 if norm == "relu" else torch.float32
    _grads_match(lambda G, v, h0, r: hlru_scan_triton(G, v, h0, reverse, r, norm, chunk=chunk),
                 lambda G, v, h0, r: hlru_scan_reference(G, v, h0, reverse, r, norm),
                 [logits, v, h0, reset], dtype, TOL[dtype])
