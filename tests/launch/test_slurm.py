"""launch/slurm.sbatch for real, on a one-node SLURM cluster started (and stopped) by the test.

Needs slurm-wlm (Debian): installed with apt-get when missing and possible. The cluster runs from
a temp dir (auth/none, no munge, no systemd); see /work/shared/FACTS.md.
"""
import os
import shutil
import socket
import subprocess
import time

import pytest

from tests.distributed import free_port
from tests.launch.common import REPO, env, metrics, read_status, reference_metrics, shard_overrides


def _ensure_slurm():
    if shutil.which("slurmctld") and shutil.which("sbatch"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("slurm-wlm is not installed and cannot be installed here (needs root + apt-get)")
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm"], check=True, timeout=600,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


@pytest.fixture
def slurm_cluster(tmp_path):
    """slurmctld + slurmd on this machine; yields the env that points SLURM commands at it."""
    _ensure_slurm()
    d = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (d / sub).mkdir(parents=True)
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=llmlrutest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        # cred_expire: how long a requeued job waits before it starts again (default 120 s).
        "AuthType=auth/none", "CredType=cred/none", "AuthInfo=cred_expire=10",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2",
        f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        node, "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    e = {**env(), "SLURM_CONF": str(conf)}
    procs = [subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(conf)], env=e, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    time.sleep(0.5)
    procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=e, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    try:
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=e, capture_output=True, text=True).stdout.strip()
            if state.startswith("idle"):
                break
            time.sleep(0.5)
        assert state.startswith("idle"), f"node state '{state}'; log:\n" + (d / "slurmctld.log").read_text()[-2000:]
        yield e, d
    finally:
        subprocess.run(["scontrol", "shutdown"], env=e, capture_output=True, timeout=60)
        for p in procs:  # only the daemons this test started
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_sbatch_trains_on_local_slurm(slurm_cluster, tmp_path, stdlib_shards):
    e, d = slurm_cluster
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    # CPU "node": 2 processes per node via NPROC_PER_NODE (no GPUs to count).
    job = subprocess.run(["sbatch", "--wait", "--parsable", "--nodes=1", "--ntasks-per-node=1", f"--chdir={REPO}",
                          f"--output={log}", "--export=ALL,NPROC_PER_NODE=2",
                          str(REPO / "launch" / "slurm.sbatch"), str(REPO / "configs" / "tiny.yaml"),
                          *shard_overrides(stdlib_shards(32)), f"out_dir={run}", "train.max_steps=3",
                          "deepspeed.zero_stage=2",
                          "parallel.sp=2"],
                         env=e, capture_output=True, text=True, timeout=600)
    out = log.read_text() if log.exists() else ""
    assert job.returncode == 0, job.stderr + out[-4000:]
    assert "1 node(s) x 2 proc" in out and "world 2 = dp 1 x sp 2" in out, out[-4000:]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def _job_field(e, job, key):
    """A field of `scontrol show job` (e.g. JobState, Restarts), "" once the job is forgotten."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=e, capture_output=True, text=True).stdout
    for item in out.split():
        if item.startswith(key + "="):
            return item.split("=", 1)[1]
    return ""


@pytest.mark.slow
@pytest.mark.parametrize("scancel", [["--signal=USR1"], ["--signal=TERM"]], ids=["usr1", "term"])
def test_signal_saves_requeues_and_finishes(slurm_cluster, tmp_path, stdlib_shards, scancel):
    """`scancel --signal=USR1` (what --signal=USR1@120 sends before the time limit), and SIGTERM to
    every process of every job step (`scancel --signal=TERM`, what preemption's grace period sends
    the tasks): the job saves at its current step, requeues itself, resumes and finishes with the
    uninterrupted run's losses. Real shards, one loader worker per rank: they get the signal too.
    (SIGTERM to the batch step itself, `--full`, reaches srun, which by SLURM's design answers it
    by SIGKILLing its step; see launch/slurm.sbatch.)"""
    e, d = slurm_cluster
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    args = [*shard_overrides(stdlib_shards(32)), f"out_dir={run}", "train.max_steps=12", "deepspeed.zero_stage=1"]
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", f"--chdir={REPO}",
                          f"--output={log}", "--export=ALL,NPROC_PER_NODE=2",
                          str(REPO / "launch" / "slurm.sbatch"), str(REPO / "configs" / "tiny.yaml"), *args],
                         env=e, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    deadline = time.time() + 600
    while not metrics(run) and time.time() < deadline:
        assert _job_field(e, job_id, "JobState") in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        time.sleep(0.1)
    subprocess.run(["scancel", *scancel, job_id], env=e, check=True, timeout=60)
    state = ""
    while time.time() < deadline:
        state = _job_field(e, job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.5)
    out = log.read_text() if log.exists() else ""
    assert state == "COMPLETED" and _job_field(e, job_id, "Restarts") == "1", (state, out[-4000:])
    assert "run status: preempted" in out and "requeueing job" in out, out[-4000:]
    saved = int(out.split("llm-lru train: preempted at step ")[1].split(";")[0])
    assert 1 <= saved < 12 and f"at step {saved}" in out.split("attempt 2")[1], out[-4000:]  # resumed there
    assert read_status(run) == {"status": "finished", "step": 12}
    got = metrics(run)
    assert [m["step"] for m in got] == list(range(1, 13))
    assert "killed by signal" not in out, out[-4000:]
    ref = reference_metrics(2, [*shard_overrides(stdlib_shards(32)), f"out_dir={tmp_path / 'ref'}", "train.max_steps=12",
                                "deepspeed.zero_stage=1"])
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
