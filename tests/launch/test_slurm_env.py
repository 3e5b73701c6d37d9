"""Rendezvous from SLURM's environment (llm_lru.train.slurm), without SLURM."""
import pytest

from llm_lru.train import slurm


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
    ("a[1-2],b5,c[09-10]", ["a1", "a2", "b5", "c09", "c10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


def test_unbalanced_nodelist_is_named():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        slurm.expand_nodelist("gpu[1-2")


@pytest.mark.parametrize("env, n", [
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:h100:2(IDX:0-1)"}, 2),
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2),
    ({}, 0),
])
def test_gpus_per_node(env, n):
    assert slurm.gpus_per_node(env) == n


def test_rendezvous_from_env(monkeypatch):
    monkeypatch.setattr(slurm, "hostnames", slurm.expand_nodelist)  # no scontrol needed
    env = {"SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_GPUS_ON_NODE": "8"}
    r = slurm.rendezvous(env)
    assert r == {"MASTER_ADDR": "gpu003", "MASTER_PORT": str(29500 + 242), "NNODES": "2",
                 "NPROC_PER_NODE": "8", "RDZV_ID": "slurm-4242"}
    assert slurm.rendezvous({**env, "MASTER_PORT": "1234", "NPROC_PER_NODE": "2"})["MASTER_PORT"] == "1234"
    assert slurm.rendezvous({**env, "SLURM_GPUS_ON_NODE": "0"})["NPROC_PER_NODE"] == "1"  # CPU nodes
    with pytest.raises(ValueError, match="SLURM_JOB_NUM_NODES"):
        slurm.rendezvous({**env, "SLURM_JOB_NUM_NODES": "3"})
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        slurm.rendezvous({})


def test_slurm_status_reads_the_runs_out_dir(tmp_path):
    from llm_lru.train import checkpoint as ck

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: random}\nmodel: {vocab_size: 8}\n")
    assert slurm.run_status([str(cfg), f"out_dir={tmp_path / 'r'}", "--resume", "auto"]) == "none"
    (tmp_path / "r").mkdir()
    ck.write_status(tmp_path / "r", "preempted", 5)
    assert slurm.run_status([str(cfg), f"out_dir={tmp_path / 'r'}"]) == "preempted"
