"""Gate normalisations and the BD-LRU / H-LRU reference scans against hand-written loops."""
import math

import pytest
import torch

from llm_lru.kernels import EPS, NORMS, bdlru_scan_reference, hlru_scan_reference, normalize_rows


def _row(g, norm):
    """One row, element by element, straight from DESIGN.md §2."""
    if norm == "softmax":
        e = [math.exp(x) for x in g]
        return [x / sum(e) for x in e]
    if norm == "sigmoid":
        s = [1 / (1 + math.exp(-x)) for x in g]
        return [x / sum(s) for x in s]
    if norm == "relu":
        s = [max(x, 0.0) for x in g]
        return [x / (sum(s) + EPS) for x in s]
    s = [math.tanh(x) for x in g] if norm == "tanh" else list(g)  # lin_l1: the logits themselves
    return [x / (sum(abs(y) for y in s) + EPS) for x in s]


@pytest.mark.parametrize("norm", NORMS)
def test_normalize_rows_matches_formula(norm):
    g = torch.randn(3, 4, 5, dtype=torch.float64) * 2
    P = normalize_rows(g, norm)
    want = torch.tensor([[_row(r.tolist(), norm) for r in rows] for rows in g], dtype=torch.float64)
    torch.testing.assert_close(P, want)
    assert P.abs().sum(-1).max() <= 1 + 1e-12  # bounded state
    if norm not in ("tanh", "lin_l1"):
        assert (P >= 0).all()


@pytest.mark.parametrize("width", [2, 3, 5, 7, 8, 17])  # below and above the short-row path
def test_softmax_values_and_gradient_match_the_jacobian(width):
    g = (torch.randn(4, 6, width, dtype=torch.float64) * 3).requires_grad_()
    go = torch.randn(4, 6, width, dtype=torch.float64)
    P = normalize_rows(g, "softmax")
    P.backward(go)
    want = torch.softmax(g.detach(), -1)  # torch's own float64 kernel, not the short-row path
    jac = torch.diag_embed(want) - want[..., :, None] * want[..., None, :]  # dP_i/dg_j = P_i (d_ij - P_j)
    torch.testing.assert_close(P.detach(), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g.grad, torch.einsum("...i,...ij->...j", go, jac), rtol=1e-10, atol=1e-12)


def test_softmax_large_logits_stay_finite():
    g = torch.tensor([[1000.0, 999.0, -1000.0, 0.0, 1000.0]])
    P = normalize_rows(g, "softmax")
    e = torch.tensor([1.0, math.exp(-1.0), 0.0, 0.0, 1.0])
    torch.testing.assert_close(P[0], e / e.sum())


def test_normalize_rows_half_inputs_and_zero_rows():
    g = torch.randn(2, 3, dtype=torch.bfloat16)
    assert normalize_rows(g, "softmax").dtype == torch.float32
    assert torch.isfinite(normalize_rows(torch.full((2, 3), -1.0), "relu")).all()
    assert torch.isfinite(normalize_rows(torch.zeros(2, 3), "tanh")).all()
    with pytest.raises(ValueError, match="norm"):
        normalize_rows(g, "softplus")


@pytest.mark.parametrize("reverse", [False, True])
def test_bdlru_reference_is_the_gated_recurrence(reverse):
    B, T, N, m = 2, 6, 3, 2
    G = torch.randn(B, T, N, m, m + 1, dtype=torch.float64)
    v = torch.randn(B, T, N, m, dtype=torch.float64)
    h0 = torch.randn(B, N, m, dtype=torch.float64)
    reset = torch.rand(B, T) < 0.3
    h, last = bdlru_scan_reference(G, v, h0, reverse, reset, "sigmoid")
    P = normalize_rows(G, "sigmoid")
    for b in range(B):
        for n in range(N):
            s = h0[b, n]
            for t in (range(T - 1, -1, -1) if reverse else range(T)):
                A = torch.zeros(m, m, dtype=torch.float64) if reset[b, t] else P[b, t, n, :, :m]
                s = A @ s + P[b, t, n, :, m] * v[b, t, n]
                torch.testing.assert_close(h[b, t, n], s)
            torch.testing.assert_close(last[b, n], s)


@pytest.mark.parametrize("reverse", [False, True])
def test_hlru_reference_is_the_higher_order_recurrence(reverse):
    B, T, N, m = 1, 7, 2, 3
    G = torch.randn(B, T, N, m + 1, dtype=torch.float64)
    v = torch.randn(B, T, N, dtype=torch.float64)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 4] = True
    y, last = hlru_scan_reference(G, v, None, reverse, reset, "softmax")
    P = normalize_rows(G, "softmax")
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    for n in range(N):
        hist = []  # outputs in scan order since the last reset
        for t in order:
            if reset[0, t]:
                hist = []
            want = P[0, t, n, m] * v[0, t, n] + sum(P[0, t, n, k - 1] * hist[-k] for k in range(1, m + 1)
                                                    if k <= len(hist))
            hist.append(want)
            torch.testing.assert_close(y[0, t, n], want)
        torch.testing.assert_close(last[0, n], torch.stack(hist[::-1][:m]))


def test_reference_errors_name_the_tensor():
    with pytest.raises(ValueError, match="logits"):
        bdlru_scan_reference(torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="h0"):
        hlru_scan_reference(torch.randn(1, 3, 2, 3), torch.randn(1, 3, 2), h0=torch.zeros(1, 2, 3))
