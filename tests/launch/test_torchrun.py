"""launch/torchrun.sh for real, on real shards from `llm-lru prep` read by a DataLoader worker per
rank: elastic restart after kill -9 of a rank; SIGTERM to the agent, and to every process of the
run at once (SLURM, a node shutdown); two agents as two nodes."""
import json
import re
import signal
import subprocess
import time

import psutil
import pytest

from tests.distributed import free_port
from tests.launch.common import REPO, env, metrics, read_status, reference_metrics, shard_overrides

SCRIPT = str(REPO / "launch" / "torchrun.sh")
TINY = str(REPO / "configs" / "tiny.yaml")


def _workers(agent: subprocess.Popen):
    """The training processes under a torchrun agent (the bash script execs into torchrun): its
    children, not their DataLoader workers (forked, with the same command line)."""
    return [p for p in psutil.Process(agent.pid).children() if "llm_lru.cli" in " ".join(p.cmdline())]


def _logged_steps(run) -> list:
    """Steps in metrics.jsonl, complete lines only (the writer may be stopped mid-line)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _stop_between_checkpoints(agent, run, every: int, deadline: float):
    """SIGSTOP both workers at a moment when 1-3 steps have been logged after the last checkpoint
    step (so a kill now must move those steps aside on resume); returns (workers, steps logged)."""
    while time.time() < deadline:
        assert agent.poll() is None, agent.stdout.read()
        steps = _logged_steps(run)
        if steps and steps[-1] > every and steps[-1] % every in (1, 2, 3):
            workers = _workers(agent)
            assert len(workers) == 2, workers
            for p in workers:
                p.suspend()
            steps = _logged_steps(run)  # what the killed attempt logged, now that it is frozen
            if steps[-1] % every in (1, 2, 3):
                return workers, steps
            for p in workers:  # a checkpoint step slipped in before the stop: try again later
                p.resume()
        time.sleep(0.05)
    raise AssertionError("the run never reached a step between checkpoints")


@pytest.mark.slow
def test_kill_9_one_rank_restarts_and_resumes(tmp_path, stdlib_shards):
    run = tmp_path / "run"
    cmd = [SCRIPT, "--nproc-per-node", "2", "--max-restarts", "2", TINY, *shard_overrides(stdlib_shards(32)),
           f"out_dir={run}", "train.max_steps=24", "checkpoint.every=5", "deepspeed.zero_stage=2"]
    agent = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        workers, logged = _stop_between_checkpoints(agent, run, every=5, deadline=time.time() + 300)
        workers[1].send_signal(signal.SIGKILL)  # one rank dies without a word
        workers[0].resume()  # the other is stopped by torchrun, as after any rank's death
        out, _ = agent.communicate(timeout=400)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, out[-4000:]
    resumed = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", out)
    checkpoint = logged[-1] // 5 * 5  # the newest checkpoint before the kill
    assert resumed and int(resumed.group(2)) == checkpoint, (logged, out[-4000:])
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 25))  # each step once
    # Steps the killed attempt logged after its checkpoint were moved aside on resume (the
    # resumed rank may have logged one more before torchrun stopped it); they must agree exactly
    # with their recomputation: the restarted run retraces the same trajectory.
    final = {r["step"]: r for r in rows}
    superseded = [json.loads(line) for line in (run / "metrics.superseded.jsonl").read_text().splitlines()
                  if line.endswith("}")]
    after = [s for s in logged if s > checkpoint]
    assert after and [r["step"] for r in superseded][:len(after)] == after, (logged, superseded)
    assert len(superseded) <= len(after) + 1, (logged, superseded)
    for r in superseded:
        assert r["loss"] == final[r["step"]]["loss"], r["step"]


@pytest.mark.slow
def test_two_agents_as_two_nodes(tmp_path, stdlib_shards):
    """Two torchrun agents (one process each) meet at one c10d rendezvous on localhost."""
    port = free_port()
    common = [TINY, *shard_overrides(stdlib_shards(32)), "train.max_steps=3", "deepspeed.zero_stage=2"]
    agents = [subprocess.Popen([SCRIPT, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                                "--rdzv", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", *common,
                                f"out_dir={tmp_path / 'two'}"],
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for r in (0, 1)]
    outs = [a.communicate(timeout=400)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "world 2 = dp 2 x sp 1" in "".join(outs)
    # The same world on one agent gives the same numbers.
    one = subprocess.run([SCRIPT, "--nproc-per-node", "2", *common, f"out_dir={tmp_path / 'one'}"],
                         env=env(), capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two, ref = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [m["step"] for m in two] == [1, 2, 3]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in ref], rel=1e-6)


def _signal_every_process(agent, sig):
    """`sig` to the agent, its workers and their loader workers at once, as SLURM signals every
    process of a job step and a node's shutdown every process of the machine."""
    procs = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
    loader_workers = [p for p in procs if p.ppid() in {w.pid for w in _workers(agent)}]
    assert len(loader_workers) == 2, procs   # one per rank: the test must reach them too
    for p in procs:
        p.send_signal(sig)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["agent", "every_process"])
def test_sigterm_saves_the_current_step_and_resumes(tmp_path, stdlib_shards, target):
    """torchrun forwards SIGTERM to its workers' process groups (loader workers included) and, with
    the script's grace, lets them save; the same when every process gets it at once."""
    run = tmp_path / "run"
    args = [*shard_overrides(stdlib_shards(32)), f"out_dir={run}", "train.max_steps=10", "deepspeed.zero_stage=1"]
    agent = subprocess.Popen([SCRIPT, "--nproc-per-node", "2", TINY, *args], env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not _logged_steps(run) and time.time() < deadline:
            assert agent.poll() is None, agent.stdout.read()
            time.sleep(0.05)
        if target == "agent":
            agent.send_signal(signal.SIGTERM)
        else:
            _signal_every_process(agent, signal.SIGTERM)
        out, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert "killed by signal" not in out, out[-4000:]
    status = read_status(run)
    assert status["status"] == "preempted", out[-4000:]
    saved = status["step"]
    assert 1 <= saved < 10 and _logged_steps(run)[-1] == saved, out[-4000:]   # the step it was in
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{saved:08d}"
    assert out.count(f"llm-lru train: preempted at step {saved}") == 2, out[-4000:]   # both ranks, exit 75
    again = subprocess.run([SCRIPT, "--nproc-per-node", "2", TINY, *args], env=env(), capture_output=True,
                           text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{saved:08d}'} at step {saved}" in again.stdout
    assert read_status(run) == {"status": "finished", "step": 10}
    ref = reference_metrics(2, [*shard_overrides(stdlib_shards(32)), f"out_dir={tmp_path / 'ref'}",
                                "train.max_steps=10", "deepspeed.zero_stage=1"])
    got = metrics(run)
    assert [m["step"] for m in got] == list(range(1, 11))
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
