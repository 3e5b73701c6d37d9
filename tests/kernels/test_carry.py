"""Slice carries `op.carry(trans, u, reverse, reset) -> (P, s)` (values only: the native split's
pass 1 on the chunked path, the one-pass Triton carries that TwoPassScan exchanges for
kernels that read h0 first) against the float64 reference:
P = op.product(...) and s = op(..., h0=None)[1] under the "ref" backend (sequential loops,
materialised products). Every op, both directions, document starts (at t = 0, inside, at the
end), m in 1..4 (and 8), T = 1, T a multiple of the chunk and not; the one-pass Triton carries
(interpreter on CPU) at one tiny size. The native split's maps: test_local.py."""
import pytest
import torch

from llm_lru.kernels import BLOCK, COMPANION, DIAG, GatedBlockScan, GatedCompanionScan, get_backend, set_backend

F64 = torch.float64


def _stable(*shape, gen):
    A = torch.randn(*shape, dtype=F64, generator=gen)
    return A / A.abs().sum(-1, keepdim=True).clamp_min(1.0) * 0.99


def _inputs(op_name, B, T, N, m, gen):
    """(op, trans, u) for one op at these sizes, float64."""
    if op_name == "block":
        return BLOCK, _stable(B, T, N, m, m, gen=gen), torch.randn(B, T, N, m, dtype=F64, generator=gen)
    if op_name == "diag":
        return DIAG, _stable(B, T, N, gen=gen), torch.randn(B, T, N, dtype=F64, generator=gen)
    if op_name == "companion":
        a = torch.randn(B, T, N, m, dtype=F64, generator=gen)
        return COMPANION, a / a.abs().sum(-1, keepdim=True) * 0.99, torch.randn(B, T, N, dtype=F64, generator=gen)
    if op_name == "bdlru":
        return (GatedBlockScan(), torch.randn(B, T, N, m, m + 1, dtype=F64, generator=gen),
                torch.randn(B, T, N, m, dtype=F64, generator=gen))
    return (GatedCompanionScan(), torch.randn(B, T, N, m + 1, dtype=F64, generator=gen),
            torch.randn(B, T, N, dtype=F64, generator=gen))


def _resets(B, T, gen):
    """Document starts: row 0 none, row 1 at t = 0 and inside, row 2 random, row 3 at the last step."""
    r = torch.zeros(B, T, dtype=torch.bool)
    r[1, 0] = True
    r[1, T // 2] = True
    r[2] = torch.rand(T, generator=gen) < 0.3
    r[3, T - 1] = True
    return r


def _reference(op, trans, u, reverse, reset):
    old = get_backend()
    set_backend("ref")
    try:
        return op.product(trans, reverse, reset), op(trans, u, None, reverse, reset)[1]
    finally:
        set_backend(old)


def _check(op, trans, u, reverse, reset, backend="torch", tol=1e-10):
    P_ref, s_ref = _reference(op, trans, u, reverse, reset)
    old = get_backend()
    set_backend(backend)
    try:
        P, s = op.carry(trans, u, reverse, reset)
    finally:
        set_backend(old)
    assert P.shape == P_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(P, P_ref.to(P.dtype), rtol=tol, atol=tol, msg=lambda e: f"P: {e}")
    torch.testing.assert_close(s, s_ref.to(s.dtype), rtol=tol, atol=tol, msg=lambda e: f"s: {e}")


CASES = [(name, m) for name in ("block", "companion", "bdlru", "hlru") for m in (1, 2, 3, 4)]
CASES += [("diag", 1), ("block", 8)]


@pytest.mark.parametrize("name,m", CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 13, 16])
@pytest.mark.parametrize("with_reset", [False, True])
def test_carry_matches_product_and_scan(name, m, reverse, T, with_reset):
    gen = torch.Generator().manual_seed(hash((name, m, reverse, T, with_reset)) % 2**31)
    B, N = 4, 3
    op, trans, u = _inputs(name, B, T, N, m, gen)
    reset = _resets(B, T, gen) if with_reset else None
    _check(op, trans, u, reverse, reset)


def test_carry_in_float32_and_bf16_accumulates_in_float32():
    gen = torch.Generator().manual_seed(3)
    op, logits, v = _inputs("bdlru", 2, 16, 2, 3, gen)
    for dt in (torch.float32, torch.bfloat16):
        P, s = op.carry(logits.to(dt), v.to(dt), False, None)
        assert P.dtype == s.dtype == torch.float32
        P_ref, s_ref = _reference(op, logits.to(dt).double(), v.to(dt).double(), False, None)
        torch.testing.assert_close((P.double(), s.double()), (P_ref, s_ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,m", [("block", 2), ("diag", 1), ("companion", 3), ("bdlru", 2), ("hlru", 3)])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_carry_matches_reference(name, m, reverse):
    """The routing to the Triton carries (CUDA, or backend "triton"; the interpreter on CPU)."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(11 + reverse)
    B, T, N = 4, 6, 2
    op, trans, u = _inputs(name, B, T, N, m, gen)
    _check(op, trans, u, reverse, _resets(B, T, gen), backend="triton", tol=1e-9)
