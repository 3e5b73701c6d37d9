"""`llm-lru eval` under sequence parallelism: the suites' report at sp = 2 (two gloo processes
calling the eval CLI with the environment torchrun sets) equals the one-process report on the
same tiny checkpoint; suites that cannot run split fail at once with a clear error."""
import json
import math

import pytest

from llm_lru.cli import main as llm_lru_main
from llm_lru.config import ConfigError
from llm_lru.eval import cli as eval_cli
from tests.distributed import run_world

from .helpers import fake_run

# Recurrence, sliding window (smaller than a slice) and full attention.
MODEL = {"vocab_size": 258, "d_model": 32, "n_layers": 3, "pattern": "BSA", "n_heads": 2, "block_size": 2,
         "window": 8}
# Chunks of 50 (25 per rank); lengths 97 and 301 leave a 47- and a 1-token last chunk, whose odd
# tail is read replicated.
ARGS = ["--suite", "ppl,passkey,niah", "--tokenizer", "bytes", "--chunk-size", "50", "--no-progress",
        "ppl_batches=2", "ppl_length=97", "passkey_lengths=[301]", "passkey_depths=[0.0,1.0]", "passkey_trials=1",
        "niah_lengths=[400]", "niah_tasks=[single,vt]", "niah_trials=1"]


def _eval_rank(rank, world, run_dir, out):
    return eval_cli.main([str(run_dir), "--out", str(out), *ARGS])


def _metrics(out):
    rep = json.loads((out / "report.json").read_text())
    assert not any(r.get("error") for r in rep["suites"]), rep["suites"]
    return rep, {r["suite"]: r["metrics"] for r in rep["suites"]}


def test_sp2_report_equals_one_process(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir, {"model": MODEL, "data": {"source": "random"}, "train": {"seq_len": 24}})
    assert eval_cli.main([str(run_dir), "--out", str(tmp_path / "one"), *ARGS]) == 0
    assert run_world(_eval_rank, 2, run_dir, tmp_path / "sp2") == [0, 0]
    one, want = _metrics(tmp_path / "one")
    sp2, got = _metrics(tmp_path / "sp2")
    assert sp2["model"]["sp"] == 2 and one["model"]["sp"] == 1
    assert set(got) == set(want) == {"ppl", "passkey", "niah"}
    for suite in want:
        assert set(got[suite]) == set(want[suite])
        for key, w in want[suite].items():
            g = got[suite][key]
            if isinstance(w, float):
                assert math.isclose(g, w, rel_tol=1e-5, abs_tol=1e-6), (suite, key, g, w)
            else:
                assert g == w, (suite, key, g, w)
    assert want["ppl"]["tokens"] == 2 * 97
    for png in ("ppl_by_position.png", "passkey.png", "niah.png"):
        assert (tmp_path / "sp2" / png).is_file()


def test_suites_that_cannot_split_fail_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    # Refused before any process group or collective: no hang, the suite named.
    with pytest.raises(ConfigError, match=r"lm-eval cannot run under sequence parallelism.*ppl, passkey, niah"):
        eval_cli.main([str(tmp_path), "--suite", "ppl,lm-eval", "--out", str(tmp_path / "o")])
    assert llm_lru_main(["eval", str(tmp_path), "--suite", "mqar", "--out", str(tmp_path / "o")]) == 2
    assert "mqar cannot run under sequence parallelism" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--sp 4: .*sp = WORLD_SIZE = 2, dp = 1"):
        eval_cli.main([str(tmp_path), "--sp", "4", "--suite", "ppl", "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--sweep"):
        eval_cli.main(["--sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")])


@pytest.mark.slow
def test_real_torchrun_sp2_ppl_equals_one_process(tmp_path):
    """The whole launch path: torchrun starts 2 processes that join through init_mesh, as the trainer's do."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "run"
    fake_run(run_dir, {"model": MODEL, "data": {"source": "random"}, "train": {"seq_len": 24}})
    args = [str(run_dir), "--suite", "ppl", "--chunk-size", "50", "--no-progress", "ppl_batches=2", "ppl_length=97"]
    assert eval_cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "llm_lru.cli", "eval", *args, "--out", str(tmp_path / "sp2")],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("llm-lru eval: wrote") == 1  # rank 0 alone reports
    (_, want), (sp2, got) = _metrics(tmp_path / "one"), _metrics(tmp_path / "sp2")
    assert sp2["model"]["sp"] == 2
    assert got["ppl"]["tokens"] == want["ppl"]["tokens"] == 194
    assert math.isclose(got["ppl"]["val_loss"], want["ppl"]["val_loss"], rel_tol=1e-5)
