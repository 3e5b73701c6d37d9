"""write_folder on an in-process model (no DeepSpeed): other layer mixes, untied head, errors."""
from __future__ import annotations

import pytest
import torch

from llm_lru.config import ModelConfig
from llm_lru.models import HybridLM


def _export(tmp_path, cfg, **kw):
    from transformers import AutoModelForCausalLM

    from llm_lru.export.exporter import write_folder

    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    write_folder(tmp_path, cfg, model.state_dict(), **kw)
    return model, AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()


def test_untied_head_and_other_mixers_round_trip(tmp_path):
    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=5, pattern="GHSLB", d_state=12, block_size=3,
                      gate_norm="sigmoid", n_heads=2, window=4, tie_embeddings=False)
    model, hf = _export(tmp_path, cfg)
    assert not torch.equal(hf.model.head.weight, hf.model.embed.weight)
    ids = torch.randint(0, 50, (3, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=0)
        # Chunked prefill (chunks of 4) + steps, against one forward over the whole text.
        hf.config.prefill_chunk_size = 4
        out = hf(ids[:, :15], use_cache=True)
        for t in range(15, 19):
            out = hf(ids[:, t:t + 1], past_key_values=out.past_key_values)
            torch.testing.assert_close(out.logits[:, 0], model(ids[:, :t + 1])[:, -1], rtol=1e-5, atol=1e-5)
        cached = hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False)
        full = hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False, use_cache=False)
        # Beam search reorders the cache (LLMLRUCache.reorder_cache) between steps.
        beams = hf.generate(ids[:, :6], max_new_tokens=6, num_beams=3, do_sample=False)
        beams_full = hf.generate(ids[:, :6], max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(beams, beams_full)


def test_labels_give_the_shifted_cross_entropy(tmp_path):
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, pattern="BA", d_state=16, n_heads=2)
    model, hf = _export(tmp_path, cfg)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
        want = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, want)


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    from llm_lru.data_prep.tokenizer import make_tokenizer
    from llm_lru.export.exporter import write_folder

    cfg = ModelConfig(vocab_size=100, d_model=16, n_layers=1, pattern="G")
    with pytest.raises(ValueError, match="258 tokens but model.vocab_size=100"):
        write_folder(tmp_path, cfg, HybridLM(cfg).state_dict(), tok=make_tokenizer("bytes"))
