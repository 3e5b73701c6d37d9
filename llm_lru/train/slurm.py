"""Derive a torchrun rendezvous from SLURM's environment (used by launch/slurm.sbatch).

    python -m llm_lru.train.slurm        # prints `export KEY=VALUE` lines for the batch script
    python -m llm_lru.train.slurm status CONFIG.yaml [key=value ...]
                                         # prints what the run's last attempt did (RUN/status.json):
                                         # finished | preempted | failed | running | none

Reads SLURM_JOB_NODELIST (expanded with `scontrol show hostnames`, or by `expand_nodelist`
when scontrol is absent), SLURM_JOB_NUM_NODES, SLURM_JOB_ID and the GPUs per node
(SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES). The first
node hosts the c10d rendezvous store.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

DEFAULT_PORT = 29500


def _split_top(s: str) -> List[str]:
    """Split on commas that are not inside brackets: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"SLURM_JOB_NODELIST: unbalanced brackets in '{s}'")
    return parts + ([cur] if cur else [])


def _expand_one(item: str) -> List[str]:
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not m:
        return [item]
    prefix, ranges, rest = m.groups()
    out = []
    for r in ranges.split(","):
        if "-" in r:
            lo, hi = r.split("-", 1)
            out += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(prefix + r)
    # A suffix may hold another bracket group (e.g. rack[1-2]-node[1-3]).
    return [h + tail for h in out for tail in _expand_one(rest)] if rest else out


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM nodelist like 'gpu[001-003,007],cpu5' into hostnames (scontrol's order)."""
    hosts: List[str] = []
    for item in _split_top(nodelist.strip()):
        hosts += _expand_one(item)
    return hosts


def hostnames(nodelist: str) -> List[str]:
    """`scontrol show hostnames NODELIST`, falling back to expand_nodelist without scontrol."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)


def gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs SLURM gave each node (0 when none was requested)."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    per = env.get("SLURM_GPUS_PER_NODE", "")  # '4', 'a100:4', 'gpu:a100:4(IDX:0-3)'
    m = re.search(r"(\d+)(?:\(.*\))?$", per)
    if m:
        return int(m.group(1))
    for key in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        if env.get(key):
            return len([g for g in env[key].split(",") if g.strip()])
    return 0


def rendezvous(env: Optional[Mapping[str, str]] = None, port: Optional[int] = None) -> Dict[str, str]:
    """torchrun settings from SLURM's env: MASTER_ADDR, MASTER_PORT, NNODES, NPROC_PER_NODE, RDZV_ID.

    NPROC_PER_NODE: the env's NPROC_PER_NODE if set, else the GPUs per node, else 1 (CPU).
    """
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is not set: run this inside a SLURM allocation (sbatch/salloc)")
    hosts = hostnames(nodelist)
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    if nnodes != len(hosts):
        raise ValueError(f"SLURM_JOB_NUM_NODES={nnodes} but SLURM_JOB_NODELIST '{nodelist}' has {len(hosts)} hosts")
    job = env.get("SLURM_JOB_ID", "0")
    if port is None:
        # A port per job, so two jobs sharing a first node do not collide.
        if env.get("MASTER_PORT"):
            port = int(env["MASTER_PORT"])
        else:
            port = DEFAULT_PORT + (int(job) % 1000 if job.isdigit() else 0)
    nproc = env.get("NPROC_PER_NODE") or str(gpus_per_node(env) or 1)
    return {"MASTER_ADDR": hosts[0], "MASTER_PORT": str(port), "NNODES": str(nnodes),
            "NPROC_PER_NODE": nproc, "RDZV_ID": f"slurm-{job}"}


def run_status(train_args: List[str]) -> str:
    """The status word of RUN/status.json for `llm-lru train ARGS` (RUN: the resolved out_dir).

    The batch script requeues the job when it is "preempted": torchrun reports any worker's
    exit as 1, so the trainer's exit code (75) does not reach the script.
    """
    from llm_lru.config import load_config
    from llm_lru.train.checkpoint import read_status

    if not train_args:
        raise ValueError("status: give the training arguments, CONFIG.yaml [key=value ...]")
    overrides = [a for a in train_args[1:] if "=" in a and not a.startswith("-")]  # --resume does not move out_dir
    return str(read_status(Path(load_config(train_args[0], overrides).out_dir))["status"])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        print(run_status(argv[1:]))
        return 0
    for k, v in rendezvous().items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
