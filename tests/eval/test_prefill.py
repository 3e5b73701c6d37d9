"""Chunked prefill against the full forward, and greedy decoding against a recompute loop."""
import pytest
import torch

from llm_lru.eval.prefill import cut_at_stop, greedy_generate, prefill, token_logprobs

from .helpers import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_token_logprobs_equal_full_forward(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 258, (2, 45))
    ds = torch.zeros(2, 45, dtype=torch.bool)
    ds[:, 0] = True
    ds[1, 19] = True  # a document boundary inside the second row, not on a chunk edge
    with torch.no_grad():
        ref = torch.log_softmax(model(ids, ds).double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    for chunk in (1, 7, 16, 45, 100):
        lp, greedy = token_logprobs(model, ids, chunk, doc_start=ds)
        assert torch.isnan(lp[:, -1]).all()
        torch.testing.assert_close(lp[:, :-1].double(), ref, atol=2e-5, rtol=0)
        argmax = model(ids, ds)[:, :-1].argmax(-1)
        assert torch.equal(greedy[:, :-1], argmax == ids[:, 1:])


def test_prefill_state_continues_like_full_forward(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 258, (1, 30))
    last, state = prefill(model, ids[:, :23], 5)
    assert state.pos == 23
    logits, _ = model(ids[:, 23:], state=state, return_state=True)
    full = model(ids)
    torch.testing.assert_close(last, full[:, 22], atol=2e-5, rtol=0)
    torch.testing.assert_close(logits, full[:, 23:], atol=2e-5, rtol=0)


def test_greedy_generate_matches_recompute(model):
    torch.manual_seed(3)
    ids = torch.randint(0, 258, (2, 12))
    last, state = prefill(model, ids, 4)
    got = greedy_generate(model, state, last, 6)
    seq = ids.clone()
    for _ in range(6):  # reference: the whole sequence again for every new token
        nxt = model(seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(got, seq[:, 12:])


def test_generate_stops_and_cut():
    assert cut_at_stop([5, 6, 7, 6], [7]) == [5, 6]
    m = tiny_model()
    ids = torch.randint(0, 258, (1, 8))
    last, state = prefill(m, ids, 8)
    first = int(last.argmax(-1))
    out = greedy_generate(m, state, last, 10, stop_ids=[first])
    assert out.tolist() == [[first]]


def test_bad_chunk_size(model):
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, torch.zeros(1, 4, dtype=torch.long), 0)
