"""Triton scan kernels against the float64 sequential references: values and gradients of every
input, m in 1..4 (and 16 once), odd T, both directions, resets, h0, chunked two-level form,
fp32 and bf16 inputs. On CPU they run under TRITON_INTERPRET=1 at tiny sizes."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be on before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llm_lru.kernels import (block_product_ref, block_scan_ref, companion_matrix, companion_scan_ref,  # noqa: E402
                             diag_scan_ref)
from llm_lru.kernels import (NORMS, bdlru_gates, bdlru_scan_reference, hlru_scan_reference,  # noqa: E402
                             normalize_rows)
from llm_lru.kernels.block.triton import bdlru_scan_triton, block_local_triton, block_scan_triton  # noqa: E402
from llm_lru.kernels.companion.triton import (companion_local_triton, companion_scan_triton,  # noqa: E402
                                              hlru_scan_triton)
from llm_lru.kernels.diag.triton import diag_scan_triton  # noqa: E402


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
    (1, 7, False, True, True, None), (1, 9, True, False, True, 4),
    (2, 5, False, False, False, 3), (2, 7, True, True, True, None),
    (3, 9, False, True, True, 4), (3, 5, True, True, False, 2),
    (4, 7, False, True, True, 4), (4, 9, True, True, True, None),
]
SOME = [CASES[1], CASES[4], CASES[7]]  # the lighter sweeps: both directions, chunked, resets, h0
DTYPES = [(c, torch.float32) for c in CASES] + [(c, torch.bfloat16) for c in SOME]
NORM_CASES = [(c, "softmax") for c in CASES] + [(c, n) for n in NORMS[1:] for c in SOME]


def _id(x):
    if isinstance(x, tuple):  # m, T, reverse, h0, reset, chunk
        m, T, rev, h0, rst, ch = x
        return f"m{m}-T{T}" + "-rev" * rev + "-h0" * h0 + "-reset" * rst + (f"-chunk{ch}" if ch else "")
    return str(x).replace("torch.", "")


def _case_inputs(m, T, with_h0, with_reset, B=2, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(B, N, m, generator=g) if with_h0 else None
    reset = (torch.rand(B, T, generator=g) < 0.25) if with_reset else None
    return g, h0, reset


@pytest.mark.parametrize("case,dtype", DTYPES, ids=_id)
def test_block_scan(case, dtype):
    m, T, reverse, with_h0, with_reset, chunk = case
    g, h0, reset = _case_inputs(m, T, with_h0, with_reset)
    A = torch.randn(2, T, 3, m, m, generator=g) / m
    if reset is not None:  # block_scan has no reset argument: a document start is A_t = 0
        A = A * (~reset).float()[:, :, None, None, None]
    u = torch.randn(2, T, 3, m, generator=g)
    _grads_match(lambda A, u, h0: block_scan_triton(A, u, h0, reverse, chunk=chunk),
                 lambda A, u, h0: block_scan_ref(A, u, h0, reverse), [A, u, h0], dtype, TOL[dtype])


@pytest.mark.parametrize("T,reverse,chunk", [(9, False, None), (11, True, 3), (1, False, None)])
def test_diag_scan(T, reverse, chunk):
    g = torch.Generator().manual_seed(2)
    a, u, h0 = torch.randn(2, T, 3, generator=g), torch.randn(2, T, 3, generator=g), torch.randn(2, 3, generator=g)
    _grads_match(lambda a, u, h0: diag_scan_triton(a, u, h0, reverse, chunk=chunk),
                 lambda a, u, h0: diag_scan_ref(a, u, h0, reverse), [a, u, h0], torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("case,dtype", DTYPES, ids=_id)
def test_companion_scan(case, dtype):
    m, T, reverse, with_h0, with_reset, chunk = case
    g, h0, reset = _case_inputs(m, T, with_h0, with_reset)
    a = torch.randn(2, T, 3, m, generator=g) / m
    x = torch.randn(2, T, 3, generator=g)
    _grads_match(lambda a, x, h0, r: companion_scan_triton(a, x, h0, reverse, r, chunk=chunk),
                 lambda a, x, h0, r: companion_scan_ref(a, x, h0, reverse, r), [a, x, h0, reset], dtype, TOL[dtype])


@pytest.mark.parametrize("case,norm", NORM_CASES, ids=_id)
def test_bdlru_fused(case, norm):
    m, T, reverse, with_h0, with_reset, chunk = case
    g, h0, reset = _case_inputs(m, T, with_h0, with_reset)
    logits = 2 * torch.randn(2, T, 3, m, m + 1, generator=g)
    v = torch.randn(2, T, 3, m, generator=g)
    dtype = torch.bfloat16 if norm == "sigmoid" else torch.float32
    _grads_match(lambda G, v, h0, r: bdlru_scan_triton(G, v, h0, reverse, r, norm, chunk=chunk),
                 lambda G, v, h0, r: bdlru_scan_reference(G, v, h0, reverse, r, norm),
                 [logits, v, h0, reset], dtype, TOL[dtype])


@pytest.mark.parametrize("case,norm", NORM_CASES, ids=_id)
def test_hlru_fused(case, norm):
    m, T, reverse, with_h0, with_reset, chunk = case
    g, h0, reset = _case_inputs(m, T, with_h0, with_reset)
    logits = 2 * torch.randn(2, T, 3, m + 1, generator=g)
    v = torch.randn(2, T, 3, generator=g)
    dtype = torch.bfloat16 if norm == "relu" else torch.float32
    _grads_match(lambda G, v, h0, r: hlru_scan_triton(G, v, h0, reverse, r, norm, chunk=chunk),
                 lambda G, v, h0, r: hlru_scan_reference(G, v, h0, reverse, r, norm),
                 [logits, v, h0, reset], dtype, TOL[dtype])


@pytest.mark.parametrize("reverse", [False, True])
def test_largest_blocks(reverse):
    """m = 16 (the largest supported) for the block scan, m = 15 (32-wide logit rows) fused."""
    g = torch.Generator().manual_seed(3)
    A, u = torch.randn(1, 5, 2, 16, 16, generator=g) / 16, torch.randn(1, 5, 2, 16, generator=g)
    _grads_match(lambda A, u: block_scan_triton(A, u, None, reverse, chunk=2),
                 lambda A, u: block_scan_ref(A, u, None, reverse), [A, u], torch.float32, TOL[torch.float32])
    G, v = torch.randn(1, 5, 2, 15, 16, generator=g), torch.randn(1, 5, 2, 15, generator=g)
    _grads_match(lambda G, v: bdlru_scan_triton(G, v, None, reverse),
                 lambda G, v: bdlru_scan_reference(G, v, None, reverse), [G, v], torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("reverse", [False, True])
def test_carry_pass_column_groups(reverse):
    """m = 8: the chunk product's columns are split over two programs (p_columns), for the
    companion scan's two-level form and the block carry of a whole slice (the split's pass 1)."""
    from llm_lru.kernels.common.triton import p_columns
    assert p_columns(8) < 8
    g = torch.Generator().manual_seed(6)
    B, T, N, m = 1, 7, 2, 8
    reset = torch.rand(B, T, generator=g) < 0.2
    a, x = torch.randn(B, T, N, m, generator=g) / m, torch.randn(B, T, N, generator=g)
    h0 = torch.randn(B, N, m, generator=g)
    _grads_match(lambda a, x, h0, r: companion_scan_triton(a, x, h0, reverse, r, chunk=3),
                 lambda a, x, h0, r: companion_scan_ref(a, x, h0, reverse, r), [a, x, h0, reset], torch.float32,
                 TOL[torch.float32])
    A, u = torch.randn(B, T, N, m, m, generator=g) / m, torch.randn(B, T, N, m, generator=g)
    part = block_local_triton(A, u, reverse, reset)   # the carry-free pass: the slice map (P, s)
    P, s = part.P, part.s
    Ac = A.double() * (~reset).double()[:, :, None, None, None]
    torch.testing.assert_close(P.double(), block_product_ref(Ac, reverse), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.double(), block_scan_ref(Ac, u.double(), None, reverse)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_slice_carries(reverse):
    """(P, s) of a slice: P is the product of the (cut) transitions, s the state from zero, and
    h_last(h0) = P h0 + s -- the quantity sequence parallelism exchanges."""
    g = torch.Generator().manual_seed(4)
    B, T, N, m = 2, 9, 3, 3
    reset = torch.rand(B, T, generator=g) < 0.2
    G, v = torch.randn(B, T, N, m, m + 1, generator=g), torch.randn(B, T, N, m, generator=g)
    h0 = torch.randn(B, N, m, generator=g)
    part = block_local_triton(G, v, reverse, reset, "softmax")
    P, s = part.P, part.s
    A, u = bdlru_gates(G.double(), v.double(), "softmax", reset)
    torch.testing.assert_close(P.double(), block_product_ref(A, reverse), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.double(), block_scan_ref(A, u, None, reverse)[1], rtol=1e-5, atol=1e-5)
    h_last = bdlru_scan_triton(G, v, h0, reverse, reset)[1]
    torch.testing.assert_close(h_last, torch.einsum("bnij,bnj->bni", P, h0) + s, rtol=1e-5, atol=1e-5)
    L = torch.randn(B, T, N, m + 1, generator=g)
    part = companion_local_triton(L, v[..., 0], reverse, reset, "tanh")
    P, s = part.P, part.s
    Pn = normalize_rows(L.double(), "tanh")
    C = companion_matrix(Pn[..., :m]) * (~reset).double()[:, :, None, None, None]
    torch.testing.assert_close(P.double(), block_product_ref(C, reverse), rtol=1e-5, atol=1e-6)
    ref = hlru_scan_reference(L.double(), v[..., 0].double(), None, reverse, reset, "tanh")[1]
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5)


def test_errors_name_the_input():
    G, v = torch.randn(1, 4, 2, 3, 4), torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match="norm"):
        bdlru_scan_triton(G, v, norm="softplus")
    with pytest.raises(ValueError, match="logits"):
        bdlru_scan_triton(G[..., :3], v)
    with pytest.raises(ValueError, match="h0"):
        hlru_scan_triton(torch.randn(1, 4, 2, 3), v[..., 0], h0=torch.zeros(1, 2, 3))
    with pytest.raises(TypeError, match="reset"):
        companion_scan_triton(torch.randn(1, 4, 2, 2), v[..., 0], reset=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="chunk"):
        block_scan_triton(torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 2, 2), chunk=0)


def test_carry_index_bound():
    """The kernels index the (B, C, N, m, m) chunk carries in int32: a launch past that bound is
    refused before anything is allocated, with the sizes named; one just under it is accepted."""
    from llm_lru.kernels.common.triton import Launch
    cpu = torch.device("cpu")
    assert Launch(16, 2 ** 16, 127, cpu, chunk=1).C == 127  # 2^16 x 127 x 256 < 2^31
    with pytest.raises(ValueError, match=r"int32 indexing: B \* N = 65536 rows x 128 chunks"):
        Launch(16, 2 ** 16, 128, cpu, chunk=1)


@pytest.mark.parametrize("reverse", [False, True])
def test_gated_ops_dispatch_to_triton(reverse):
    """The layers' gated ops with backend "triton" (document starts -> cuts, reverse) agree with
    backend "ref": the seam the mixers use, end to end through these kernels."""
    from llm_lru.kernels import GatedBlockScan, GatedCompanionScan, get_backend, set_backend
    g = torch.Generator().manual_seed(5)
    B, T, N, m = 2, 9, 2, 2
    starts = torch.rand(B, T, generator=g) < 0.3
    cases = [(GatedBlockScan("relu"), torch.randn(B, T, N, m, m + 1, generator=g), torch.randn(B, T, N, m, generator=g)),
             (GatedCompanionScan("softmax"), torch.randn(B, T, N, m + 1, generator=g), torch.randn(B, T, N, generator=g))]
    before = get_backend()
    try:
        for op, G, v in cases:
            outs = []
            for backend in ("triton", "ref"):
                set_backend(backend)
                Gl = G.clone().requires_grad_()
                y, last = op(Gl, v, None, reverse, starts)
                (y.sum() + last.square().sum()).backward()
                outs.append((y, last, Gl.grad))
            for a, b in zip(*outs):
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
    finally:
        set_backend(before)
