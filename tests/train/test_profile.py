"""train.profile: torch.profiler traces of chosen steps on rank 0 or every rank, read back from the
files a real 2-process CPU run writes."""
import json
from pathlib import Path

import pytest

from tests.distributed import run_world
from tests.train.worlds import tiny_cfg


def _runs(rank, world, root):
    from llm_lru.train import trainer

    root = Path(root)
    trainer.train(tiny_cfg(root / "every", train={"profile": {"start_step": 2, "steps": 2, "all_ranks": True}}))
    trainer.train(tiny_cfg(root / "rank0", train={"profile": {"start_step": 1, "steps": 1,
                                                              "out": str(root / "traces")}}))
    # Resumed at step 4 with a window that has passed: nothing recorded.
    trainer.train(tiny_cfg(root / "every", train={"max_steps": 6, "profile": {"start_step": 2, "steps": 2,
                                                                              "out": str(root / "late")}}))
    return None


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    run_world(_runs, 2, str(root), timeout=600)
    return root


def _events(path):
    trace = json.loads(Path(path).read_text())
    assert trace["profile_memory"] and trace["record_shapes"]
    return trace["traceEvents"]


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_records_its_steps_with_memory(root, rank):
    files = sorted(p.name for p in (root / "every" / "profile").iterdir())
    assert files == ["rank0.steps2-3.pt.trace.json", "rank1.steps2-3.pt.trace.json"]
    events = _events(root / "every" / "profile" / f"rank{rank}.steps2-3.pt.trace.json")
    steps = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#1", "ProfilerStep#2"]       # the two recorded steps, not the warm-up
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    assert any(e["name"] == "aten::mm" and e["args"].get("Input Dims") for e in ops)
    assert any("allreduce" in e["name"].lower() or "all_reduce" in e["name"].lower() for e in events)
    memory = [e for e in events if e.get("name") == "[memory]"]
    assert memory and all("Total Allocated" in e["args"] for e in memory)
    # The recorded ops lie inside the step marks.
    marks = [e for e in events if e.get("name", "").startswith("ProfilerStep#")]
    lo, hi = min(m["ts"] for m in marks), max(m["ts"] + m["dur"] for m in marks)
    assert all(lo <= e["ts"] <= hi for e in ops)


def test_rank0_only_into_its_folder_and_nothing_once_the_window_has_passed(root):
    assert sorted(p.name for p in (root / "traces").iterdir()) == ["rank0.steps1-1.pt.trace.json"]
    steps = [e["name"] for e in _events(root / "traces" / "rank0.steps1-1.pt.trace.json")
             if e.get("name", "").startswith("ProfilerStep#")]
    assert steps == ["ProfilerStep#0"]      # start_step 1 has no warm-up step before it
    assert not (root / "rank0" / "profile").exists()
    assert not (root / "late").exists()


def test_profile_keys_are_checked():
    from llm_lru.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.profile.steps"):
        load_config(None, ["data.source=random", "model.vocab_size=64", "train.profile.steps=0"])
    with pytest.raises(ConfigError, match="train.profile.strat_step"):
        load_config(None, ["data.source=random", "model.vocab_size=64", "train.profile.strat_step=3"])
