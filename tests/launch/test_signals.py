"""Save signals on the path users take: real shards from `llm-lru prep`, DataLoader worker
processes, and the signal delivered to a whole process group (as torchrun's agent and SLURM do).

The torchrun and SLURM versions of these scenarios are the slow tests of test_torchrun.py and
test_slurm.py; here are the fast parts: the loader worker itself, and one `llm-lru train` process
whose whole process group gets SIGTERM.
"""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.launch.common import PYTHON, REPO, env, metrics, read_status, shard_overrides

TINY = str(REPO / "configs" / "tiny.yaml")


def _batches(loader, n):
    out = []
    for _, b in zip(range(n), loader):
        out.append({k: v.clone() for k, v in b.items()})
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_loader_workers_ignore_the_save_signals(stdlib_shards, sig):
    """A loader worker that gets a save signal (or SIGINT) keeps serving the same batches; before,
    SIGTERM killed it and the trainer raised 'DataLoader worker ... is killed by signal'."""
    from llm_lru.config import from_dict
    from llm_lru.data_prep import build_loader

    def cfg(workers):
        return from_dict({"data": {"source": "shards", "path": str(stdlib_shards(32)), "num_workers": workers,
                                   "shuffle_buffer": 64},
                          "model": {"vocab_size": 512}, "train": {"seq_len": 32, "global_batch_size": 4}})

    expected = _batches(build_loader(cfg(0)), 6)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    it = iter(build_loader(cfg(1)))
    got = [next(it) for _ in range(2)]
    workers = [p for p in me.children(recursive=True) if p.pid not in before]
    assert len(workers) == 1, workers
    os.kill(workers[0].pid, sig)
    time.sleep(0.5)           # the default action (or PyTorch's handler) would have killed it by now
    assert workers[0].is_running() and workers[0].status() != psutil.STATUS_ZOMBIE
    got += [next(it) for _ in range(4)]
    for a, b in zip(expected, got):
        for k in a:
            assert (a[k] == b[k]).all(), k
    it.close()                # the trainer's shutdown ends the worker, not the signal
    workers[0].wait(timeout=30)


def _logged_steps(run):
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _train(args, **kw):
    return subprocess.Popen([PYTHON, "-m", "llm_lru.cli", "train", TINY, *args], env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_to_the_process_group_saves_the_step_in_progress_and_resumes(stdlib_shards, tmp_path):
    """What SLURM and a node shutdown do: SIGTERM to the trainer and its loader worker at once."""
    run = tmp_path / "run"
    args = [*shard_overrides(stdlib_shards(32)), "train.max_steps=30", "deepspeed.zero_stage=2"]
    proc = _train([*args, f"out_dir={run}"], start_new_session=True)    # its own process group
    try:
        deadline = time.time() + 300
        while len(_logged_steps(run)) < 2 and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.02)
        loader_workers = psutil.Process(proc.pid).children(recursive=True)
        assert loader_workers, "no DataLoader worker process: the test would not exercise it"
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-4000:]
    assert "killed by signal" not in out, out[-4000:]
    status = read_status(run)
    saved = status["step"]
    assert status["status"] == "preempted" and 2 <= saved < 30, (status, out[-4000:])
    assert _logged_steps(run)[-1] == saved                      # the step in progress, not an older one
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{saved:08d}"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in loader_workers)

    again = _train([*args, f"out_dir={run}"])
    out2, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out2[-4000:]
    assert f"at step {saved}" in out2 and read_status(run) == {"status": "finished", "step": 30}
    ref = _train([*args, f"out_dir={tmp_path / 'ref'}"])
    out3, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out3[-4000:]
    got, want = metrics(run), metrics(tmp_path / "ref")
    assert [m["step"] for m in got] == list(range(1, 31))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]    # same data order, exactly
