"""An export of a stack with the baseline mixers (LSTM, DeltaNet) loads in plain transformers and
computes what the training model does: full forward, chunked prefill + steps, cached generation."""
import torch

from llm_lru.config import ModelConfig

from .test_folder import _export


def test_lstm_and_deltanet_round_trip(tmp_path):
    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=3, pattern="CDA", d_state=12, n_heads=2)
    model, hf = _export(tmp_path, cfg)
    ids = torch.randint(0, 50, (3, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=0)
        hf.config.prefill_chunk_size = 4
        out = hf(ids[:, :15], use_cache=True)
        for t in range(15, 19):
            out = hf(ids[:, t:t + 1], cache=out.cache)
            torch.testing.assert_close(out.logits[:, 0], model(ids[:, :t + 1])[:, -1], rtol=1e-5, atol=1e-5)
        cached = hf.generate(ids[:, :6], max_new_tokens=8, do_sample=False)
        full = hf.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=False)
        beams = hf.generate(ids[:, :6], max_new_tokens=5, num_beams=3, do_sample=False)
        beams_full = hf.generate(ids[:, :6], max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(beams, beams_full)
