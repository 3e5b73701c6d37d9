"""Slow training checks: dp 2 x sp 2 (4 processes) against one process; the CPU demo end to end."""
import json
import os
import subprocess
import sys

import pytest

from tests.distributed import run_world
from tests.train.worlds import train_runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_dp2_sp2_matches_single_process(tmp_path, stage):
    """The synthetic copy task numbers samples globally, so any dp split sees the same global batch;
    its labels mask the prompt (-100), which exercises the global token count."""
    over = {"data": {"source": "synthetic", "task": "copy"}, "deepspeed": {"zero_stage": stage},
            "train": {"global_batch_size": 4, "micro_batch_size": 1, "val_every": 0}}
    four = run_world(train_runs, 4, [(str(tmp_path / "four"), {**over, "parallel": {"sp": 2}})], timeout=600)[0]
    one = run_world(train_runs, 1, [(str(tmp_path / "one"), over)], timeout=600)[0]
    ref, got = one[0]["metrics"], four[0]["metrics"]
    assert [m["step"] for m in got] == [m["step"] for m in ref] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """`llm-lru demo`, shortened: prep, torchrun sp=2 ZeRO-2, loss falls, checkpoint written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "llm_lru", "demo", "--out", str(tmp_path), "--steps", "80",
                        "--max-bytes", "1M"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world 2 = dp 1 x sp 2, ZeRO-2" in p.stdout
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["step"] == 80 and rows[-1]["loss"] < rows[0]["loss"] - 1.0
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000080"
    assert (tmp_path / "checkpoints" / latest / "COMPLETE").is_file()
