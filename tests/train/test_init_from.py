"""checkpoint.init_from: the tiny model trained at T = 256 (dp 2) continues at T = 1024 with sp = 2
and a new rope_theta. Its first loss equals the checkpoint model's loss on that batch, computed here
by a plain one-process HybridLM; an export starts the same run; init_optimizer keeps the moments;
another model key is refused by name."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_world
from tests.train.worlds import metrics, tiny_cfg

WORDS = "the a state block scan carry rank token layer window rope theta gate norm loss".split()


def _prep(root: Path):
    from llm_lru.data_prep.prep import PrepConfig, run_prep

    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for k in range(12):
        (corpus / f"d{k}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(300, 700))))
    for T in (256, 1024):
        run_prep(PrepConfig(inputs=[str(corpus)], tokenizer="bytes", seq_len=T, shard_size=8), root / f"data{T}",
                 progress=False)


def base_over(root):
    return dict(model={"vocab_size": 512}, data={"source": "shards", "path": str(Path(root) / "data256"),
                                                 "num_workers": 1},
                train={"seq_len": 256, "max_steps": 3})


def long_over(root, init_from, **checkpoint):
    return dict(model={"vocab_size": 512, "rope_theta": 500000.0}, parallel={"sp": 2},
                data={"source": "shards", "path": str(Path(root) / "data1024"), "num_workers": 1},
                train={"seq_len": 1024, "global_batch_size": 2, "max_steps": 2, "schedule": "constant",
                       "warmup_steps": 0, "lr": 1e-3},
                checkpoint={"init_from": str(init_from), **checkpoint})


def _optimizer_state(run_dir):
    """AdamW state of a ZeRO-0 fp32 checkpoint: {param index: (step, exp_avg_sq)}."""
    f = Path(run_dir) / "checkpoints" / "latest"
    ckpt = f.parent / f.read_text().strip() / "ds" / "state" / "mp_rank_00_model_states.pt"
    state = torch.load(ckpt, weights_only=False)["optimizer"]["state"]
    return {i: (float(s["step"]), s["exp_avg_sq"].numpy().copy()) for i, s in state.items()}


def _runs(rank, world, root):
    from llm_lru.config import ConfigError
    from llm_lru.export.exporter import export
    from llm_lru.train import trainer

    root = Path(root)
    if rank == 0:
        _prep(root)
    torch.distributed.barrier()
    trainer.train(tiny_cfg(root / "base", **base_over(root)))           # dp 2 x sp 1, T = 256
    if rank == 0:
        export(root / "base", root / "export")
    torch.distributed.barrier()
    long = long_over(root, root / "base")
    trainer.train(tiny_cfg(root / "long", **long))                                      # dp 1 x sp 2, T = 1024
    opt_long = _optimizer_state(root / "long") if rank == 0 else None
    trainer.train(tiny_cfg(root / "long_export", **long_over(root, root / "export")))
    trainer.train(tiny_cfg(root / "long_opt", **long_over(root, root / "base/checkpoints/step_00000003",
                                                          init_optimizer=True)))
    # Run again with more steps: the continuation resumes its own checkpoint, not init_from.
    trainer.train(tiny_cfg(root / "long", **{**long, "train": {**long["train"], "max_steps": 3}}))
    # ZeRO-1: moments kept in the same world (2 ranks) here, and in a world of 1 by _one_rank
    # (DeepSpeed's universal checkpoint): the same second step.
    trainer.train(tiny_cfg(root / "base_z1", **base_over(root), deepspeed={"zero_stage": 1}))
    trainer.train(tiny_cfg(root / "long_z1", **long_over(root, root / "base_z1", init_optimizer=True),
                           deepspeed={"zero_stage": 1}))
    try:
        trainer.train(tiny_cfg(root / "wrong", **{**long_over(root, root / "base"),
                                                  "model": {"vocab_size": 512, "d_model": 48}}))
        error = None
    except ConfigError as e:
        error = str(e)
    if rank:
        return None
    return {name: metrics(root / name) for name in ("base", "long", "long_export", "long_opt", "long_z1")} | {
        "long_superseded": (root / "long" / "metrics.superseded.jsonl").exists(),
        "error": error, "opt_base": _optimizer_state(root / "base"), "opt_long": opt_long,
        "opt_kept": _optimizer_state(root / "long_opt")}


def _one_rank(rank, world, root):
    from llm_lru.train import trainer

    root = Path(root)
    over = {**long_over(root, root / "base_z1", init_optimizer=True), "parallel": {"sp": 1}}
    trainer.train(tiny_cfg(root / "long_z1_w1", **over, deepspeed={"zero_stage": 1}))
    return {"metrics": metrics(root / "long_z1_w1"), "universal": (root / "base_z1/checkpoints/step_00000003/universal").is_dir()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    got = run_world(_runs, 2, str(root), timeout=900)[0]
    got["one_rank"] = run_world(_one_rank, 1, str(root), timeout=600)[0]
    return root, got


def _reference_first_loss(root):
    """The base checkpoint's weights in a plain HybridLM (rope_theta 500000, one process, sp = 1)
    on the continued run's first global batch."""
    from llm_lru.data_prep import build_loader
    from llm_lru.export.source import consolidate, match_keys, resolve_source
    from llm_lru.models import HybridLM

    cfg = tiny_cfg(root / "ref", **long_over(root, root / "base"))
    model = HybridLM(cfg.model)
    model.load_state_dict(match_keys(consolidate(resolve_source(root / "base")), model.state_dict().keys(), "base"))
    batch = next(iter(build_loader(cfg, batch_size=2)))
    with torch.no_grad():
        return model.loss(batch["input_ids"], batch["labels"], batch["doc_start"]).item()


def test_continued_run_starts_from_the_saved_weights(world):
    root, got = world
    long = got["long"]
    assert [m["step"] for m in long[:2]] == [1, 2] and [m["tokens"] for m in long[:2]] == [2048, 4096]
    assert long[0]["loss"] == pytest.approx(_reference_first_loss(root), rel=1e-5)
    assert long[0]["loss"] < got["base"][0]["loss"]      # not a fresh model
    assert got["long_export"][0]["loss"] == pytest.approx(long[0]["loss"], rel=1e-6)


def test_init_optimizer_keeps_the_moments(world):
    _, got = world
    base, fresh, kept = got["opt_base"], got["opt_long"], got["opt_kept"]
    assert {s for s, _ in base.values()} == {3.0}
    assert {s for s, _ in fresh.values()} == {2.0}         # a fresh AdamW: 2 steps of its own
    assert {s for s, _ in kept.values()} == {5.0}          # the base's 3 and 2 more
    beta2 = 0.95
    for i in base:   # v_new = beta2^2 v_base + (1 - beta2)(...) >= beta2^2 v_base, not so for a fresh start
        assert np.all(kept[i][1] >= beta2 ** 2 * base[i][1] * (1 - 1e-6))
    assert any(np.any(fresh[i][1] < beta2 ** 2 * base[i][1] * 0.5) for i in base)
    assert kept[0][1].tolist() != fresh[0][1].tolist()


def test_moments_survive_another_world_through_the_universal_checkpoint(world):
    _, got = world
    same, other = got["long_z1"], got["one_rank"]
    assert other["universal"]                      # world 2 -> 1 under ZeRO-1: converted once
    # dp 1 x sp 2 with the checkpoint's own partitions, and one process from the universal one:
    # the same first step, and the same second (which the loaded moments shape).
    for a, b in zip(same, other["metrics"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    fresh_second = got["long"][1]["loss"]          # the same continuation with a fresh AdamW (ZeRO-0)
    assert abs(same[1]["loss"] - fresh_second) > 1e-4 * abs(fresh_second)


def test_a_continuation_with_checkpoints_of_its_own_resumes_them(world):
    _, got = world
    assert [m["step"] for m in got["long"]] == [1, 2, 3]
    assert not got["long_superseded"]              # started at its step 2, not again from init_from


def test_another_model_is_refused_naming_the_key(world):
    _, got = world
    assert got["error"] and "checkpoint.init_from" in got["error"]
    assert "model.d_model: 32 in" in got["error"] and "48 in this run" in got["error"]


def test_shipped_extension_config_continues_hybrid_350m():
    from llm_lru.config import check_world, load_config
    from llm_lru.train.init_from import check_init_model

    configs = Path(__file__).resolve().parents[2] / "configs"
    base, ext = load_config(configs / "hybrid-350m.yaml"), load_config(configs / "hybrid-350m-extend-128k.yaml")
    check_init_model(base.model, ext.model, "hybrid-350m.yaml")   # raises naming any other key
    assert ext.model.rope_theta != base.model.rope_theta
    assert ext.train.seq_len == 131072 and ext.parallel.sp == 8 and check_world(ext, 16) == 2
    assert Path(ext.checkpoint.init_from) == Path(base.out_dir)
