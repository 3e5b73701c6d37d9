"""write_folder on an in-process model (no DeepSpeed): other layer mixes, untied head, the
generation cache, the transformers version check, errors.

Reference for generation: transformers' generate without a cache (the whole text re-read for
every token) and one forward over the whole text.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings

import pytest
import torch

from llm_lru.config import ModelConfig
from llm_lru.models import HybridLM

# Every causal mixer kind, full and sliding-window attention included.
HYBRID = ModelConfig(vocab_size=50, d_model=24, n_layers=6, pattern="BHLGAS", d_state=12, block_size=3, n_heads=2,
                     n_kv_heads=1, window=4)


def _export(tmp_path, cfg, **kw):
    from transformers import AutoModelForCausalLM

    from llm_lru.export.exporter import write_folder

    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    write_folder(tmp_path, cfg, model.state_dict(), **kw)
    return model, AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hybrid")
    model, hf = _export(folder, HYBRID)
    return folder, model, hf


def _remote(hf):
    """The folder's modeling module (modeling_llm_lru.py as transformers imported it)."""
    return sys.modules[type(hf).__module__]


def test_untied_head_and_other_mixers_round_trip(tmp_path):
    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=5, pattern="GHSLB", d_state=12, block_size=3,
                      gate_norm="sigmoid", n_heads=2, window=4, tie_embeddings=False)
    model, hf = _export(tmp_path, cfg)
    assert not torch.equal(hf.model.head.weight, hf.model.embed.weight)
    round_trip(model, hf)


def round_trip(model, hf):
    """The export computes what the training model does: one forward, chunked prefill (chunks of 4)
    + steps, and cached greedy and beam-search generation equal to the uncached."""
    ids = torch.randint(0, 50, (3, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=0)
        # Chunked prefill (chunks of 4) + steps, against one forward over the whole text.
        hf.config.prefill_chunk_size = 4
        out = hf(ids[:, :15], use_cache=True)
        for t in range(15, 19):
            out = hf(ids[:, t:t + 1], cache=out.cache)
            torch.testing.assert_close(out.logits[:, 0], model(ids[:, :t + 1])[:, -1], rtol=1e-5, atol=1e-5)
        cached = hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False)
        full = hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False, use_cache=False)
        # Beam search reorders the cache (Cache.reorder_cache) between steps.
        beams = hf.generate(ids[:, :6], max_new_tokens=6, num_beams=3, do_sample=False)
        beams_full = hf.generate(ids[:, :6], max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(beams, beams_full)


# top_k: a random model's next-token distribution is near uniform, where the same random draw
# picks the same token from quite different logits; the top 5 depend on the logits' order.
@pytest.mark.parametrize("mode", [
    dict(do_sample=False),
    dict(do_sample=True, top_k=5, num_return_sequences=2),  # the cache is made for the expanded batch
    dict(do_sample=False, num_beams=4, num_return_sequences=2),
    dict(do_sample=True, top_k=5, num_beams=3),
], ids=["greedy", "sampling", "beams", "beam-sampling"])
def test_generate_with_cache_equals_without(hybrid, mode):
    _, _, hf = hybrid
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.no_grad():
        for use_cache in (True, False):
            torch.manual_seed(5)  # the same random draws for both
            out[use_cache] = hf.generate(ids, max_new_tokens=12, use_cache=use_cache, **mode)
    assert out[True].shape[1] == 19
    assert torch.equal(out[True], out[False])


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(do_sample=False, num_beams=3)], ids=["greedy", "beams"])
def test_left_padded_batch_with_cache_equals_without(hybrid, mode):
    """Left padding becomes a document start, in the cached K/V's `starts` as in a full forward."""
    _, _, hf = hybrid
    pad = 49
    rows = [torch.randint(0, 48, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 6)]
    ids = torch.stack([torch.cat([torch.full((9 - len(r),), pad), r]) for r in rows])
    mask = (torch.arange(9) >= torch.tensor([9 - len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        cached = hf.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=pad, **mode)
        full = hf.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=pad, use_cache=False, **mode)
        alone = hf.generate(rows[1][None], max_new_tokens=8, pad_token_id=pad, **mode)
    assert torch.equal(cached, full)
    assert torch.equal(cached[1, 9:], alone[0, 4:])  # a padded row generates what it does alone


def test_cache_is_a_transformers_cache(hybrid):
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, CacheLayerMixin

    _, model, hf = hybrid
    remote = _remote(hf)
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        out = hf(ids[:, :8], use_cache=True)
        cache = out.cache
        assert isinstance(cache, Cache) and type(cache) is remote.LLMLRUCache
        assert all(isinstance(layer, CacheLayerMixin) for layer in cache.layers)
        assert [type(layer).__name__ for layer in cache.layers] == ["RecurrentStateLayer"] * 4 + ["AttentionLayer"] * 2
        assert cache.is_sliding == [False] * 5 + [True] and not any(cache.is_linear)
        assert cache.get_seq_length() == 8 and not cache.is_croppable and not cache.is_compileable
        # `past_key_values`, the name before transformers 5.24, is the same argument.
        step = hf(ids[:, 8:9], past_key_values=cache).logits
        torch.testing.assert_close(step[:, 0], model(ids[:, :9])[:, -1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="cache, past_key_values"):
            hf(ids[:, 9:10], cache=cache, past_key_values=cache)
        # A fresh DynamicCache (what generate() makes, or a user) gets this model's layers.
        dyn = DynamicCache(config=hf.config)
        hf(ids[:, :10], cache=dyn)
        assert [type(a) for a in dyn.layers] == [type(b) for b in cache.layers] and dyn.get_seq_length() == 10
        torch.testing.assert_close(hf(ids[:, 10:], cache=dyn).logits[:, 0], model(ids)[:, -1], rtol=1e-5, atol=1e-5)
        gen = hf.generate(ids[:, :5], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        assert isinstance(gen.cache, Cache) and gen.cache.get_seq_length() == 8  # the last token is never read
        # One another model filled is refused, naming the argument.
        other = DynamicCache()
        other.update(torch.zeros(2, 1, 3, 12), torch.zeros(2, 1, 3, 12), 0)
        with pytest.raises(ValueError, match="cache: a DynamicCache filled by another model"):
            hf(ids[:, :1], cache=other)
        with pytest.raises(TypeError, match="cache: expected a transformers Cache"):
            hf(ids[:, :1], cache=[])


def test_beam_search_reorders_every_layer(hybrid):
    _, _, hf = hybrid
    with torch.no_grad():
        cache = hf(torch.randint(0, 50, (3, 6)), use_cache=True).cache
    before = [[getattr(layer, n).clone() for n in layer.held] for layer in cache.layers]
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    for layer, old in zip(cache.layers, before):
        for name, t in zip(layer.held, old):
            assert torch.equal(getattr(layer, name), t[[2, 2, 0]]), name


def test_export_records_transformers_version_and_warns_outside_range(hybrid, tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM

    from llm_lru.export.exporter import TRANSFORMERS_SUPPORTED

    folder, _, hf = hybrid
    meta = json.loads((folder / "llm_lru_export.json").read_text())
    assert meta["transformers"] == {"exported_with": transformers.__version__, "supported_min": TRANSFORMERS_SUPPORTED[0],
                                    "supported_below": TRANSFORMERS_SUPPORTED[1]}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    assert not [w for w in seen if "verified with" in str(w.message)]  # the installed version is in range
    moved = shutil.copytree(folder, tmp_path / "old")
    meta["transformers"].update(exported_with="5.20.1", supported_min="5.20.0", supported_below="5.21.0")
    (moved / "llm_lru_export.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=rf"exported with transformers 5\.20\.1 and verified with >=5\.20\.0,<5\.21\.0, "
                                         rf"but transformers {transformers.__version__} is installed"):
        AutoModelForCausalLM.from_pretrained(str(moved), trust_remote_code=True)
    check = _remote(hf).check_transformers_version
    rec = {"transformers": {"exported_with": "5.24.0", "supported_min": "5.23.0", "supported_below": "5.25.0"}}
    for installed, warns in [("5.22.9", True), ("5.23.0", False), ("5.24.3", False), ("5.25.0.dev0", True), ("6.0.0", True)]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            check("X", rec, installed=installed)
        assert bool(seen) == warns, installed


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


def test_config_without_hlru_readout_reads_as_the_old_last_readout(tmp_path):
    """An export made before model.hlru_readout existed has no such key: it read out y_t alone."""
    import dataclasses

    for readout in ("state", "last"):
        cfg = dataclasses.replace(HYBRID, pattern="HA", n_layers=2, hlru_readout=readout)
        (tmp_path / readout).mkdir()
        model, hf = _export(tmp_path / readout, cfg)
        assert hf.config.hlru_readout == readout
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    saved = json.loads((tmp_path / "last" / "config.json").read_text())
    saved.pop("hlru_readout", None)
    (tmp_path / "last" / "config.json").write_text(json.dumps(saved))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(tmp_path / "last"), trust_remote_code=True).hlru_readout == "last"
