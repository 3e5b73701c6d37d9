"""The recall / state-tracking lab (DESIGN.md §8): train small models from scratch through the
normal trainer on a synthetic task (llm_lru.data_prep.tasks), then score answer accuracy with the
eval `task` suite's measure (llm_lru.eval.task); sweeps of mixers x tasks x seeds. Run by
bench/recall_sweep.py and `llm-lru eval --sweep`.

    row = train_and_score(run_cfg)          # trainer.train(run_cfg) in a world of one, then score
    table = run_sweep(sweep_dict, out_dir)  # mixers x tasks, one accuracy table
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from llm_lru.eval.common import progress, table
from llm_lru.eval.task import task_accuracy


def ensure_world(cfg) -> None:
    """A torch.distributed world of one (the trainer's own init), unless one is up already."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from llm_lru.parallel import init_mesh

        init_mesh(cfg.parallel)


def train_and_score(cfg, eval_samples: int = 256, seed: int = 0) -> Dict[str, Any]:
    """Train cfg from scratch with llm_lru.train.trainer.train, load its final checkpoint the way
    `llm-lru eval` does, and score it on its task. Returns the trainer summary + accuracy."""
    from llm_lru.eval.load import load_target
    from llm_lru.train.trainer import train

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
