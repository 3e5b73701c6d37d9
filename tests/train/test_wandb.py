"""logging.wandb in offline mode (no network): a real run's offline W&B folder read back (metrics
equal to metrics.jsonl, the config, the hardware); a missing client is an error naming the extra."""
import json
import struct
import sys
from pathlib import Path

import pytest

from tests.distributed import run_world
from tests.train.worlds import metrics, tiny_cfg


def read_records(path):
    """The protobuf records of a .wandb file: a W&B header, then LevelDB log blocks (32 KiB; each
    chunk a 7-byte header crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:   # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += 7
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _run(rank, world, root):
    from llm_lru.train import trainer

    out = Path(root) / "run"
    over = dict(logging={"wandb": {"project": "llm-lru-tests", "name": "tiny", "mode": "offline", "tags": ["ci"]}},
                train={"val_every": 2})
    trainer.train(tiny_cfg(out, **over))
    first = metrics(out) if rank == 0 else None
    # Resumed for 2 more steps: the same W&B run (id), which gets steps 5 and 6 only.
    trainer.train(tiny_cfg(Path(root) / "run", **{**over, "train": {"val_every": 2, "max_steps": 6}}))
    return first


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    got = run_world(_run, 2, str(root), timeout=600)[0]
    runs = sorted((root / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs      # the run and its resumption
    first, second = (read_records(next(r.glob("*.wandb"))) for r in runs)
    if not _by_type(first, "history") or min(_steps(first)) > 1:
        first, second = second, first
    return got, first, second, (root / "run" / "wandb" / "run_id").read_text().strip()


def _by_type(records, kind):
    return [r for r in records if r.WhichOneof("record_type") == kind]


def _history(records):
    """{step: {metric: value}} of a run's history records."""
    out = {}
    for r in _by_type(records, "history"):
        items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        out[items["_step"]] = items
    return out


def _steps(records):
    return sorted(_history(records))


def test_offline_run_holds_the_metrics_of_metrics_jsonl(offline):
    jsonl, records, _, _ = offline
    history = _history(records)
    assert sorted(history) == [1, 2, 3, 4]
    for m in jsonl:
        h = history[m["step"]]
        for key in ("loss", "lr", "grad_norm", "tokens"):
            assert h[f"train/{key}"] == pytest.approx(m[key], rel=1e-12), key
        assert ("val/val_loss" in h) == ("val_loss" in m)
        if "val_loss" in m:
            assert h["val/val_loss"] == pytest.approx(m["val_loss"], rel=1e-12)


def test_offline_run_holds_the_config_and_hardware(offline):
    _, records, _, _ = offline
    (run,) = _by_type(records, "run")
    assert (run.run.project, run.run.display_name, list(run.run.tags)) == ("llm-lru-tests", "tiny", ["ci"])
    config = {i.key: json.loads(i.value_json) for i in run.run.config.update}
    assert config["train"]["seq_len"] == 16 and config["model"]["pattern"] == "BA"
    assert config["logging"]["wandb"]["mode"] == "offline"
    hw = config["hardware"]
    assert (hw["world_size"], hw["dp"], hw["sp"], hw["device"]) == (2, 2, 1, "cpu")
    env = [r.environment for r in _by_type(records, "environment")]
    assert any(e.cpu_count >= 1 for e in env) and any(e.python for e in env)


def test_a_resumed_run_continues_the_same_wandb_run(offline):
    _, first, second, run_id = offline
    ids = [r.run.run_id for recs in (first, second) for r in _by_type(recs, "run")]
    assert ids == [run_id, run_id]
    assert _steps(second) == [5, 6]


def test_without_the_client_the_config_names_the_extra(monkeypatch, tmp_path):
    from llm_lru.config import ConfigError
    from llm_lru.train.cli import parse

    (tmp_path / "run.yaml").write_text("data: {source: random}\nmodel: {vocab_size: 64}\n"
                                       "logging:\n  wandb: {project: p, mode: offline}\n")
    monkeypatch.setitem(sys.modules, "wandb", None)   # import wandb now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'llm_lru\[wandb\]'"):
        parse([str(tmp_path / "run.yaml")])
    monkeypatch.undo()
    assert parse([str(tmp_path / "run.yaml")]).logging.wandb.project == "p"
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        parse([str(tmp_path / "run.yaml"), "logging.wandb.mode=cloud"])
