"""The recall / state-tracking lab: train small models from scratch through the normal trainer on
a synthetic task (llm_lru.eval.tasks), then measure answer accuracy; and the `task` suite that
measures a checkpoint on its own synthetic task.

    acc = task_accuracy(model, "mqar", {"num_kv_pairs": 8}, seq_len=128, n=256)
    row = train_and_score(run_cfg)          # trainer.train(run_cfg) in a world of one, then score
    table = run_sweep(sweep_dict, out_dir)  # mixers x tasks, one accuracy table
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import tasks as _tasks  # noqa: F401  (registers the synthetic tasks)
from .common import progress, table
from .ppl import context_positions
from .prefill import token_logprobs

SPLIT_SEED = 9_999  # eval samples: seeded apart from the training stream


@torch.no_grad()
def task_accuracy(model, task: str, task_args: Dict[str, Any], seq_len: int, n: int = 256, seed: int = 0,
                  chunk_size: int = 0, batch_size: int = 64) -> Dict[str, Any]:
    """Greedy accuracy on the scored (answer) positions of n fresh samples of `task`.

    Returns {"accuracy": answers right / answers, "sequence_accuracy": samples with every answer
    right / samples, "answers": count, "accuracy_by_position": {"[lo, hi)": accuracy} over the
    answers' context positions}. chunk_size 0 reads each batch in one forward.
    """
    was_training = model.training
    model.eval()
    data = _tasks.task_batch(task, task_args, seq_len, n, seed + SPLIT_SEED, model.cfg.vocab_size)
    device = model.embed.weight.device
    right = total = seq_right = 0
    by_pos: Dict[int, List[int]] = {}
    for s in range(0, n, batch_size):
        tok = torch.from_numpy(data["tokens"][s:s + batch_size]).to(device)
        mask = torch.from_numpy(data["mask"][s:s + batch_size]).to(device)
        starts = torch.from_numpy(data["starts"][s:s + batch_size]).to(device)
        labels = torch.from_numpy(data["targets"][s:s + batch_size]).to(device)
        ids = tok[:, :-1]
        targets = torch.where(mask, labels, torch.full_like(ids, -100))
        _, greedy = token_logprobs(model, ids, chunk_size or ids.shape[1], doc_start=starts, targets=targets)
        m = mask.cpu()
        right += int(greedy[m].sum())
        total += int(m.sum())
        seq_right += int(((greedy | ~m).all(1)).sum())
        # context position of each answer (tokens since its document began): for s3/s5 it is
        # the episode length, for mqar the query's offset
        pos = context_positions(starts.cpu())[m]
        for p_, g in zip(pos.tolist(), greedy[m].tolist()):
            b = 1 << max(0, int(p_)).bit_length() - 1 if p_ > 0 else 0
            by_pos.setdefault(b, [0, 0])
            by_pos[b][0] += int(g)
            by_pos[b][1] += 1
    model.train(was_training)
    bins = {f"[{b}, {2 * b if b else 1})": round(r / c, 4) for b, (r, c) in sorted(by_pos.items())}
    return {"accuracy": right / max(total, 1), "sequence_accuracy": seq_right / n, "answers": total,
            "accuracy_by_position": bins}


def run_suite(target, ecfg, out: Path, suite: str = "task", accept=None) -> Dict[str, Any]:
    """`task` suite: accuracy of a checkpoint trained on a synthetic task, on that task.
    (`mqar`, `state-tracking`, `selective-copy`: the same, checking the run's task is one of them.)"""
    cfg = target.cfg
    if cfg is None or cfg.data.source != "synthetic" or not cfg.data.task:
        raise ValueError(f"suite '{suite}': the target's run config has no synthetic data.task (mqar, s3, s5, ...)")
    if accept and cfg.data.task not in accept:
        raise ValueError(f"suite '{suite}': the run was trained on data.task '{cfg.data.task}', not {' or '.join(accept)}")
    res = task_accuracy(target.model, cfg.data.task, dict(cfg.data.task_args), cfg.train.seq_len,
                        ecfg.task_samples, ecfg.seed, ecfg.chunk_size)
    rows = [[cfg.data.task, json.dumps(dict(cfg.data.task_args)), cfg.train.seq_len, res["answers"],
             res["accuracy"], res["sequence_accuracy"]]]
    return {"suite": suite, "metrics": res,
            "tables": [table("synthetic task accuracy", ["task", "args", "seq_len", "answers", "accuracy", "seq_accuracy"], rows)],
            "plots": [], "settings": {"samples": ecfg.task_samples, "seed": ecfg.seed}}


def run_mqar(target, ecfg, out: Path) -> Dict[str, Any]:
    return run_suite(target, ecfg, out, "mqar", ("mqar",))


def run_state_tracking(target, ecfg, out: Path) -> Dict[str, Any]:
    return run_suite(target, ecfg, out, "state-tracking", ("s3", "s5", "word_problem"))


def run_selective_copy(target, ecfg, out: Path) -> Dict[str, Any]:
    return run_suite(target, ecfg, out, "selective-copy", ("selective_copy",))


# ---- training through the normal trainer -------------------------------------------------

def ensure_world(cfg) -> None:
    """A torch.distributed world of one (the trainer's own init), unless one is up already."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from llm_lru.parallel import init_mesh

        init_mesh(cfg.parallel)


def train_and_score(cfg, eval_samples: int = 256, seed: int = 0) -> Dict[str, Any]:
    """Train cfg from scratch with llm_lru.train.trainer.train, load its final checkpoint the way
    `llm-lru eval` does, and score it on its task. Returns the trainer summary + accuracy."""
    from llm_lru.train.trainer import train

    from .load import load_target

    ensure_world(cfg)
    t0 = time.time()
    summary = train(cfg)
    train_s = time.time() - t0
    target = load_target(cfg.out_dir)
    res = task_accuracy(target.model, cfg.data.task, dict(cfg.data.task_args), cfg.train.seq_len, eval_samples, seed)
    last = _last_metrics(Path(cfg.out_dir))
    return {**res, "train_seconds": train_s, "steps": summary["step"], "final_loss": last.get("loss"),
            "params": target.model.num_params()}


def _last_metrics(run_dir: Path) -> Dict[str, Any]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return {}
    lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def _merge(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def sweep_runs(sweep: Dict[str, Any], out_dir: Path) -> List[Dict[str, Any]]:
    """The runs of a sweep dict {base, mixers: {name: overrides}, tasks: {name: overrides},
    seeds: [int, ...] (optional: each run once per seed, as train.seed)}:
    [{"mixer", "task", "seed", "config": RunConfig}], tasks x mixers x seeds, each its own out_dir."""
    from llm_lru.config import from_dict

    for key in ("base", "mixers", "tasks"):
        if key not in sweep:
            raise ValueError(f"sweep config: missing key '{key}'")
    seeds = sweep.get("seeds") or [None]
    if not all(s is None or isinstance(s, int) for s in seeds):
        raise ValueError(f"sweep config: 'seeds' must be a list of ints, got {seeds}")
    only_m, only_t = sweep.get("only_mixers"), sweep.get("only_tasks")
    runs = []
    for tname, tover in sweep["tasks"].items():
        if only_t and tname not in only_t:
            continue
        for mname, mover in sweep["mixers"].items():
            if only_m and mname not in only_m:
                continue
            for seed in seeds:
                d = _merge(_merge(sweep["base"], tover), mover)
                d["out_dir"] = str(out_dir / (f"{tname}__{mname}" + ("" if seed is None else f"__s{seed}")))
                if seed is not None:
                    d.setdefault("train", {})["seed"] = seed
                try:
                    cfg = from_dict(d)
                except ValueError as e:
                    raise ValueError(f"sweep config: task '{tname}' x mixer '{mname}': {e}") from None
                runs.append({"mixer": mname, "task": tname, "seed": cfg.train.seed, "config": cfg})
    return runs


def run_sweep(sweep: Dict[str, Any], out_dir: Path, eval_samples: int = 256,
              on_result=None, show_progress: bool = True) -> Dict[str, Any]:
    """Train and score every run of the sweep; returns {"results": [...], "table": Table}.
    on_result(row) is called after each run (e.g. to write partial results)."""
    runs = sweep_runs(sweep, out_dir)
    bar = progress(len(runs), "recall sweep", show_progress)
    results = []
    for r in runs:
        cfg = r["config"]
        row = {"task": r["task"], "mixer": r["mixer"], "seed": r["seed"], "pattern": cfg.model.pattern,
               "d_model": cfg.model.d_model,
               "block_size": cfg.model.block_size, "seq_len": cfg.train.seq_len,
               "task_args": dict(cfg.data.task_args), "max_steps": cfg.train.max_steps}
        try:
            row.update(train_and_score(cfg, eval_samples))
        except Exception as e:  # a failed run is a row of the table, not the end of the sweep
            row["error"] = f"{type(e).__name__}: {e}"
        results.append(row)
        bar.update(1)
        if on_result:
            on_result(results)
    bar.close()
    return {"results": results, "table": sweep_table(results)}


def sweep_table(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One table: a row per task, a column per mixer, cells = answer accuracy (the mean over
    the seeds that ran without error)."""
    mixers = list(dict.fromkeys(r["mixer"] for r in results))
    tasks_ = list(dict.fromkeys(r["task"] for r in results))
    cell: Dict[Any, List[float]] = {}
    for r in results:
        if "accuracy" in r:
            cell.setdefault((r["task"], r["mixer"]), []).append(float(r["accuracy"]))
    rows = []
    for t in tasks_:
        row: List[Any] = [t]
        for m in mixers:
            accs = cell.get((t, m))
            row.append(round(sum(accs) / len(accs), 4) if accs else None)
        rows.append(row)
    return table("answer accuracy (rows: task, columns: mixer)", ["task"] + mixers, rows)
