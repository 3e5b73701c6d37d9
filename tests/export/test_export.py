"""Export round trip from a real ZeRO-3 checkpoint of 2 gloo processes.

Reference: the live DeepSpeed engine's logits on fixed inputs (fp32), and transformers'
generate without a cache (the whole text re-read for every token).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.distributed import run_world
from tests.export.zero_ckpt import env_for_deepspeed, train_and_save

REPO = Path(__file__).resolve().parents[2]
VOCAB = 258
MODEL = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 6, "pattern": "BHLGAS", "d_state": 16, "block_size": 4,
         "n_heads": 4, "n_kv_heads": 2, "window": 8}


def _load(folder, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kw).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ZeRO-3 DeepSpeed checkpoint (2 ranks) with config.yaml beside it, a data manifest with a
    byte tokenizer, and the live model's logits on `probe`."""
    from llm_lru.config import from_dict, save_config
    from llm_lru.data_prep.manifest import FORMAT
    from llm_lru.data_prep.tokenizer import make_tokenizer, save_tokenizer

    env_for_deepspeed(REPO)
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    data.mkdir()
    rec = save_tokenizer(make_tokenizer("bytes"), data)
    (data / "manifest.json").write_text(json.dumps({"format": FORMAT, "tokenizer": rec}))
    cfg = {"out_dir": str(root), "model": MODEL, "data": {"path": str(data)}, "train": {"seed": 7}}
    ds_dir = root / "ds"
    probe = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    live = torch.from_numpy(run_world(train_and_save, 2, cfg, str(ds_dir), probe, 3)[0])
    save_config(from_dict(cfg), ds_dir / "config.yaml")
    return {"root": root, "ds": ds_dir, "probe": probe, "live": live, "cfg": cfg}


@pytest.fixture(scope="module")
def exported(run):
    from llm_lru.export.cli import main

    out = run["root"] / "export"
    # A small shard limit so that the sharded layout (index + shards) is what gets tested.
    assert main([str(run["ds"]), "--out", str(out), "--max-shard-size", "40KB"]) == 0
    return out


def test_logits_equal_live_zero3_model(run, exported):
    assert (exported / "model.safetensors.index.json").is_file()
    model = _load(exported)
    with torch.no_grad():
        got = model(run["probe"]).logits
    torch.testing.assert_close(got, run["live"], rtol=1e-5, atol=1e-5)


def test_load_hybrid_gives_llm_lru_model(run, exported):
    from llm_lru.export.load import load_hybrid
    from llm_lru.models import HybridLM

    model = load_hybrid(exported)
    assert type(model) is HybridLM
    with torch.no_grad():
        torch.testing.assert_close(model(run["probe"]), run["live"], rtol=1e-5, atol=1e-5)


def test_generate_cache_equals_no_cache(run, exported):
    model = _load(exported)
    prompt = run["probe"][:, :12]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True)
        full = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    assert cached.shape == (2, 28)
    assert torch.equal(cached, full)


def test_cache_is_recurrent_state_plus_kv(exported):
    """Recurrent layers' cache stays the same size as text grows; attention K/V grows (SWA: up to its window)."""
    model = _load(exported)
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        short = model(ids[:, :10], use_cache=True).cache
        long = model(ids, use_cache=True).cache
        kinds = model.config.mixer_kinds()
        kv_len = [layer.keys.shape[2] for layer, k in zip(long.layers, kinds) if k in ("attn", "swa")]
        long_bytes = long.nbytes()
        step = model(ids[:, :1], cache=long).cache  # updates the cache in place
    assert kv_len == [40, 8]  # full attention keeps all 40 positions, swa its window of 8
    assert short.get_seq_length() == 10 and step.get_seq_length() == 41
    assert short.nbytes()["recurrent"] == long_bytes["recurrent"] == step.nbytes()["recurrent"] > 0
    assert step.nbytes()["attention"] > long_bytes["attention"]


def test_left_padded_batch_equals_single_prompts(exported):
    """Left padding becomes a document start: each padded row generates what it does alone."""
    model = _load(exported)
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 5))
    ids = torch.cat([a, torch.cat([torch.full((1, 4), 257), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        both = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=257)
        one_a = model.generate(a, max_new_tokens=6, do_sample=False)
        one_b = model.generate(b, max_new_tokens=6, do_sample=False)
    # A row that hits EOS early is padded to the batch's length afterwards.
    assert torch.equal(both[0, 9:9 + one_a.shape[1] - 9], one_a[0, 9:])
    assert torch.equal(both[1, 9:9 + one_b.shape[1] - 5], one_b[0, 5:])


def _is_pickle(data: bytes) -> bool:
    try:
        pickle.loads(data)
        return True
    except Exception:
        return False


def test_nothing_in_the_folder_is_a_pickle(exported):
    from safetensors import safe_open

    files = [p for p in exported.rglob("*") if p.is_file()]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "modeling_llm_lru.py", "llm_lru_export.json"} <= {p.name for p in files}
    for p in files:
        data = p.read_bytes()
        assert not zipfile.is_zipfile(p), p
        assert not _is_pickle(data), p
    for p in exported.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            assert list(f.keys())


def test_model_card_and_metadata(run, exported):
    card = (exported / "README.md").read_text()
    meta = json.loads((exported / "llm_lru_export.json").read_text())
    assert "bdlru hlru lru glru attn swa" in card
    assert f"{meta['num_params'] / 1e6:.2f}M-parameter" in card
    assert meta["source"]["ds_tag"] == "state" and meta["dtype"] == "fp32"
    tf = meta["transformers"]
    assert (f"Exported with transformers {tf['exported_with']}; its generation cache is verified with transformers "
            f">={tf['supported_min']},<{tf['supported_below']}") in card
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(meta["weights"]) == {"model.safetensors.index.json"} | set(index["weight_map"].values())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_file_fails_naming_it(exported, tmp_path):
    folder = _copy(exported, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"weight file {shard.name} is missing"):
        _load(folder)


def test_altered_weight_file_fails_naming_it(exported, tmp_path):
    folder = _copy(exported, tmp_path / "a")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"weight file {shard.name} does not match the sha256"):
        _load(folder)


def test_consistent_folder_with_a_tensor_removed_fails_naming_it(exported, tmp_path):
    """Checksums re-recorded (no tampering detectable by them): the key check still refuses it."""
    from safetensors.torch import load_file, save_file

    folder = _copy(exported, tmp_path / "k")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name, shard = sorted(index["weight_map"].items())[-1]
    tensors = load_file(str(folder / shard))
    del tensors[name]
    del index["weight_map"][name]
    if tensors:
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    else:
        (folder / shard).unlink()
    index_file.write_text(json.dumps(index))
    meta = json.loads((folder / "llm_lru_export.json").read_text())
    meta["weights"] = {f: {"sha256": hashlib.sha256((folder / f).read_bytes()).hexdigest(),
                           "bytes": (folder / f).stat().st_size}
                       for f in ["model.safetensors.index.json"] + sorted(set(index["weight_map"].values()))}
    (folder / "llm_lru_export.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"missing_keys .*{name}"):
        _load(folder)


def test_bf16_export_loads_and_generates(run, tmp_path):
    from llm_lru.export.cli import main

    out = tmp_path / "bf16"
    assert main([str(run["ds"]), "--out", str(out), "--dtype", "bf16"]) == 0
    assert (out / "model.safetensors").is_file()  # under the default shard limit: one file
    model = _load(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(run["probe"]).logits
        gen = model.generate(run["probe"][:, :8], max_new_tokens=8, do_sample=False)
        nocache = model.generate(run["probe"][:, :8], max_new_tokens=8, do_sample=False, use_cache=False)
    torch.testing.assert_close(logits, run["live"], rtol=0.05, atol=0.05)  # bf16 rounding of the weights
    assert gen.shape == (2, 16) and nocache.shape == (2, 16)


def test_folder_code_imports_no_llm_lru(exported):
    """transformers' own import scan: the folder's code needs torch and transformers only, and
    every .py file is reached from modeling_llm_lru.py (so the modules cache gets all of them)."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    py = sorted(exported.glob("*.py"))
    assert {imp for p in py for imp in get_imports(p)} - set(sys.stdlib_module_names) <= {"torch", "transformers"}
    reached = {Path(f).name for f in get_relative_import_files(exported / "modeling_llm_lru.py")}
    assert reached | {"modeling_llm_lru.py"} == {p.name for p in py}


@pytest.mark.slow
def test_folder_loads_without_llm_lru(exported, tmp_path):
    """The folder carries its own code: loading works where `import llm_lru` fails."""
    code = (
        # any import of llm_lru now raises ImportError (the lm-eval .pth hook loaded two modules already)
        "import sys\nfor k in [k for k in sys.modules if k.split('.')[0] == 'llm_lru'] + ['llm_lru']:\n"
        "    sys.modules[k] = None\n"
        "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(exported)!r}, trust_remote_code=True)\n"
        "ids = t('hello', return_tensors='pt').input_ids\n"
        "print(m.generate(ids, max_new_tokens=3, do_sample=False).shape)\n"
        "print([k for k, v in sys.modules.items() if k.split('.')[0] == 'llm_lru' and v is not None])\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[-2:] == ["torch.Size([1, 8])", "[]"]


def test_generate_cli_streams_greedy_text(exported, capsys):
    from transformers import AutoTokenizer

    from llm_lru.export.generate import main

    assert main([str(exported), "--prompt", "ab", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
    ids = tok("ab", return_tensors="pt").input_ids
    with torch.no_grad():
        want = _load(exported).generate(ids, max_new_tokens=5, do_sample=False)
    assert printed.rstrip("\n") == "ab" + tok.decode(want[0, 2:], skip_special_tokens=True)


def test_checkpoint_of_another_model_is_refused(run, tmp_path):
    from llm_lru.config import from_dict, save_config
    from llm_lru.export.cli import main

    other = dict(run["cfg"], model=dict(MODEL, n_layers=5))
    save_config(from_dict(other), tmp_path / "other.yaml")
    with pytest.raises(ValueError, match=r"missing \[\].*unexpected \['layers\.5\."):
        from llm_lru.export.exporter import export
        export(run["ds"], tmp_path / "o", config=str(tmp_path / "other.yaml"))
    assert main([str(run["ds"]), "--out", str(tmp_path / "o2"), "--config", str(tmp_path / "other.yaml")]) == 2


def test_run_dir_resolves_to_latest_complete_checkpoint(run, tmp_path):
    """The trainer's layout: RUN/checkpoints/step_N/{ds, config.yaml, meta.json, COMPLETE} + latest.
    A newer checkpoint without COMPLETE (a save that died) is skipped; metrics and an eval report
    found with the run go into the model card."""
    from llm_lru.config import from_dict, save_config
    from llm_lru.export.cli import main
    from llm_lru.train import checkpoint as ckpt_lib

    run_dir = tmp_path / "run"
    cfg = from_dict(dict(run["cfg"], out_dir=str(run_dir)))
    save_config(cfg, run_dir.mkdir() or run_dir / "config.yaml")
    done = run_dir / "checkpoints" / ckpt_lib.checkpoint_name(2)
    shutil.copytree(run["ds"], done / "ds")
    save_config(cfg, done / "config.yaml")
    (done / "meta.json").write_text(json.dumps({"step": 2, "tokens": 64, "zero_stage": 3, "world_size": 2,
                                                "ds_dir": "ds", "ds_tag": "state"}))
    ckpt_lib.mark_complete(done, 2)
    dead = run_dir / "checkpoints" / ckpt_lib.checkpoint_name(3)
    shutil.copytree(done, dead)
    (dead / "COMPLETE").unlink()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 5.5 - s, "tokens": 32 * s})
                                                     for s in (1, 2, 3)) + "\n")
    (run_dir / "report.json").write_text(json.dumps({"suites": {"recall": {"accuracy": 0.625}}}))
    out = tmp_path / "export"
    with pytest.warns(UserWarning, match="step_00000003"):
        assert main([str(run_dir), "--out", str(out)]) == 0
    meta = json.loads((out / "llm_lru_export.json").read_text())
    assert meta["source"]["checkpoint"] == str(done.resolve()) and meta["training"]["step"] == 2
    assert meta["training"]["tokens"] == 64 and meta["training"]["loss"] == 3.5
    card = (out / "README.md").read_text()
    assert "- step: 2" in card and "- tokens: 64" in card and "| suites.recall.accuracy | 0.625 |" in card
    with torch.no_grad():
        torch.testing.assert_close(_load(out)(run["probe"]).logits, run["live"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_other_zero_stages_round_trip(run, tmp_path, stage):
    """ZeRO 1/2 go through DeepSpeed's zero_to_fp32 like stage 3; stage 0 reads the full module
    DeepSpeed saved in mp_rank_00_model_states.pt."""
    from llm_lru.config import from_dict, save_config
    from llm_lru.export.cli import main

    ds_dir = tmp_path / "ds"
    live = torch.from_numpy(run_world(train_and_save, 2, run["cfg"], str(ds_dir), run["probe"], stage)[0])
    save_config(from_dict(run["cfg"]), ds_dir / "config.yaml")
    assert main([str(ds_dir / "state"), "--out", str(tmp_path / "export")]) == 0  # the tag folder itself
    with torch.no_grad():
        got = _load(tmp_path / "export")(run["probe"]).logits
    torch.testing.assert_close(got, live, rtol=1e-5, atol=1e-5)


def test_checkpoint_config_without_a_new_key_reads_as_then(tmp_path):
    """The config.yaml beside a DeepSpeed tag folder, written before model.hlru_readout existed,
    resolves with the 'last' readout that code had (the export must build the model it trained)."""
    from llm_lru.export.source import resolve_source

    tag = tmp_path / "ds" / "step"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "ds" / "config.yaml").write_text("data:\n  source: random\nmodel:\n  pattern: HA\n  vocab_size: 64\n")
    assert resolve_source(tag).config.model.hlru_readout == "last"
