"""Training on 2 real gloo processes: ZeRO stages, NaN skipping, exact resume (one world, many runs)."""
import math

import pytest
import numpy as np

from tests.distributed import run_world
from tests.train.worlds import scenarios, single_runs


@pytest.fixture(scope="module")
def world(tmp_path_factory, stdlib_shards):
    root = tmp_path_factory.mktemp("train_world")
    out = run_world(scenarios, 2, str(root), str(stdlib_shards(16)), timeout=600)[0]
    out.update(run_world(single_runs, 1, str(root), timeout=600)[0])
    return out


def _losses(run):
    return [m["loss"] for m in run["metrics"]]


def _same_curve(ref, got):
    """Train loss, grad norm and the periodic validation loss agree step by step."""
    assert [m["step"] for m in got] == [m["step"] for m in ref] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert ("val_loss" in b) == ("val_loss" in a) == (a["step"] % 2 == 0)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_stage0(world, stage):
    _same_curve(world["stage0"]["metrics"], world[f"stage{stage}"]["metrics"])
    assert _losses(world["stage0"])[-1] < _losses(world["stage0"])[0]  # it learns


def test_activation_checkpointing_matches(world):
    _same_curve(world["stage0"]["metrics"], world["act_ckpt"]["metrics"])


@pytest.mark.parametrize("stage", [2, 3])
def test_sp2_matches_single_process(world, stage):
    """dp 1 x sp 2 (ZeRO-2/3) against one process on the same global batches."""
    _same_curve(world["single"]["metrics"], world[f"sp2_stage{stage}"]["metrics"])


def test_validation_reads_the_same_sequences_at_any_layout(world):
    """train.val_batches counts global batches: dp 2 x micro 1, dp 1 x micro 2 and dp 1 x micro 1
    (4 accumulation steps) validate on the same sequences, so the same weights score the same
    val_loss (and the runs, on the same global batches, train the same weights)."""
    _same_curve(world["single"]["metrics"], world["stage0"]["metrics"])
    _same_curve(world["single"]["metrics"], world["single_micro1"]["metrics"])


def test_metrics_have_required_fields(world):
    for m in world["stage0"]["metrics"]:
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
            assert m[key] is not None, key
    assert [m["tokens"] for m in world["stage0"]["metrics"]] == [64, 128, 192, 256]
    first, *rest = world["stage0"]["metrics"]
    # The baseline once; every step's peak above it fits inside the process's peak RSS.
    assert 0 < first["memory_baseline_gb"] < first["memory_gb"]
    assert not any("memory_baseline_gb" in m for m in rest)
    for m in world["stage0"]["metrics"]:
        assert 0 < m["memory_step_gb"] <= m["memory_gb"] - first["memory_baseline_gb"] + 1e-6


def test_nan_step_is_skipped_and_counted(world):
    m = world["nan"]["metrics"]
    assert m[1]["skipped"] is True and m[1]["loss"] is None and m[1]["bad_steps"] == 1
    # Weights after the skipped step 2 equal the weights after step 1 (nothing was applied).
    sd = world["nan_sd"]
    assert sd["after_skip"].keys() == sd["before"].keys()
    for k in sd["before"]:
        np.testing.assert_array_equal(sd["after_skip"][k], sd["before"][k])


def test_too_many_bad_steps_stop_with_last_good_checkpoint(world):
    assert "TooManyBadSteps" in world["nan_stop"]["summary"]["error"]
    assert [m["step"] for m in world["nan_stop"]["metrics"]] == [1, 2, 3]
    # step 1 was the last good one: no checkpoint was written during the bad streak.
    assert world["nan_stop_ckpts"] == {"dirs": ["latest", "step_00000001"], "latest": "step_00000001"}


def test_resume_reproduces_uninterrupted_losses(world):
    ref = {m["step"]: m for m in world["uninterrupted"]["metrics"]}
    # steps 1-4, crash, then 4-6 again from step 3: the first attempt's step 4 was superseded
    assert [m["step"] for m in world["resumed"]["metrics"]] == [1, 2, 3, 4, 5, 6]
    got = {m["step"]: m for m in world["resumed"]["metrics"]}
    for s in range(1, 7):
        assert got[s]["loss"] == ref[s]["loss"], s  # exact on CPU fp32
        assert got[s]["grad_norm"] == ref[s]["grad_norm"], s
    assert all(math.isfinite(ref[s]["loss"]) for s in ref)


def test_partial_checkpoint_is_skipped_on_resume(world):
    assert any("step_00000004" in w for w in world["resume_warnings"]), world["resume_warnings"]


def test_training_without_validation_data_runs_with_validation_off(tmp_path):
    from tests.train.worlds import no_val_run

    got = run_world(no_val_run, 1, str(tmp_path), timeout=300)[0]
    assert [m["step"] for m in got["metrics"]] == [1, 2, 3, 4]
    assert not any("val_loss" in m for m in got["metrics"])
    assert got["printed"].count("has no 'val' split") == 1


def test_small_validation_split_is_read_whole_once(tmp_path):
    """A val split of fewer sequences than train.val_batches x global_batch_size (4 x 4): each
    validation reads all of it (here the one sequence prep moves to val), and the run says so."""
    import functools

    from tests.train.worlds import no_val_run

    got = run_world(functools.partial(no_val_run, val_fraction=1e-9), 1, str(tmp_path), timeout=300)[0]
    assert [m["step"] for m in got["metrics"] if "val_loss" in m] == [2, 4]
    assert got["printed"].count("each validation reads the whole val split") == 1
    assert ("the whole val split, 1 sequences in whole micro steps: fewer than train.val_batches x "
            "train.global_batch_size = 16") in got["printed"]


def test_resume_with_another_model_is_refused_naming_the_key(tmp_path, stdlib_shards):
    from tests.train.worlds import changed_model_resume

    got = run_world(changed_model_resume, 1, str(tmp_path), str(stdlib_shards(16)), timeout=300)[0]
    assert got["error"] and "model.d_model: 32 in" in got["error"] and "48 in this run" in got["error"]
    assert got["config_kept"]
