"""CompanionLags (H-LRU's state readout op): its split scan against the whole scan."""
import pytest
import torch

from llm_lru.kernels import COMPANION, CompanionLags, get_backend, set_backend
from tests.models.test_mixers import B, T, doc_starts


@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("m", [1, 3])
def test_companion_lags_split_scan_matches_whole_scan(backend, m):
    """The split scan sequence parallelism runs (local -> finish(h0) -> adjoint -> finish(g_last))
    gives CompanionLags' outputs and every gradient, dL/dh0 with the lags' share included."""
    op = CompanionLags(COMPANION, m)  # ref: the generic TwoPassScan inside; torch: the chunked native split
    N = 3
    a = 0.9 * torch.softmax(torch.randn(B, T, N, m), -1)
    u, h0 = torch.randn(B, T, N), torch.randn(B, N, m)
    ds = doc_starts(B, T, [6])
    g_h, g_last = torch.randn(B, T + m - 1, N), torch.randn(B, N, m)
    old = get_backend()
    set_backend(backend)
    try:
        leaves = [x.clone().requires_grad_() for x in (a, u, h0)]
        h, h_last = op(*leaves, False, ds)
        torch.autograd.backward([h, h_last], [g_h, g_last])
        part = op.local(a, u, False, ds)
        hp, lp = part.finish(h0)
        torch.testing.assert_close(hp, h.detach())
        torch.testing.assert_close(lp, h_last.detach())
        torch.testing.assert_close(op.apply(part.P, h0) + part.s, h_last.detach())
        grad = part.adjoint(g_h, part.saved())
        torch.testing.assert_close(grad.h0_grad(g_last), leaves[2].grad)
        for got, x in zip(grad.finish(g_last), leaves):
            torch.testing.assert_close(got, x.grad)
    finally:
        set_backend(old)
