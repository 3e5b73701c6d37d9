"""The recall / state-tracking lab (DESIGN.md §8): train small models from scratch through the
normal trainer on a synthetic task (llm_lru.data_prep.tasks), then score answer accuracy with the
eval `task` suite's measure (llm_lru.eval.task); sweeps of mixers x tasks x seeds. Run by
bench/recall_sweep.py and `llm-lru eval --sweep`.

    row = train_and_score(run_cfg)          # trainer.train(run_cfg) in a world of one, then score
    table = run_sweep(sweep_dict, out_dir)  # mixers x tasks, one accuracy table
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
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


def length_scores(model, task: str, task_args: Dict[str, Any], lengths: List[int], n: int = 256,
                  seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """Length generalisation: task_accuracy of `model` at each sequence length in `lengths`
    (e.g. the training length and 4x it), on fresh samples of that length.
    Returns {str(length): {"accuracy", "sequence_accuracy", "answers", "accuracy_by_position"}}."""
    out = {}
    for L in lengths:
        if not isinstance(L, int) or L < 2:
            raise ValueError(f"sweep config: eval_lengths must be ints >= 2, got {L!r}")
        out[str(L)] = task_accuracy(model, task, task_args, L, n, seed)
    return out


def train_and_score(cfg, eval_samples: int = 256, seed: int = 0,
                    eval_lengths: Optional[List[int]] = None) -> Dict[str, Any]:
    """Train cfg from scratch with llm_lru.train.trainer.train, load its final checkpoint the way
    `llm-lru eval` does, and score it on its task (at train.seq_len, and with eval_lengths also at
    each of those lengths: `by_length`). Returns the trainer summary + accuracy."""
    from llm_lru.eval.load import load_target
    from llm_lru.train.trainer import train

    ensure_world(cfg)
    t0 = time.time()
    summary = train(cfg)
    train_s = time.time() - t0
    target = load_target(cfg.out_dir)
    args = dict(cfg.data.task_args)
    res = task_accuracy(target.model, cfg.data.task, args, cfg.train.seq_len, eval_samples, seed)
    if eval_lengths:
        res["by_length"] = length_scores(target.model, cfg.data.task, args, list(eval_lengths), eval_samples, seed)
    last = _last_metrics(Path(cfg.out_dir))
    return {**res, "train_seconds": train_s, "steps": summary["step"], "final_loss": last.get("loss"),
            "params": target.model.num_params(), "seconds": time.time() - t0,
            "preempted": bool(summary.get("preempted"))}


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


# Keys of a sweep's task entry (or top level, for match_params) that are no run config keys.
TASK_KEYS = ("eval_lengths", "mixers", "match_params")
MATCH_TOLERANCE = 0.05


def count_params(model_cfg) -> int:
    """Parameters of HybridLM(model_cfg), built on the meta device (no memory, no init cost)."""
    import torch

    from llm_lru.models.hybrid import HybridLM

    with torch.device("meta"):
        return HybridLM(model_cfg).num_params()


def match_params(cfg, target: int, tolerance: float = MATCH_TOLERANCE):
    """cfg with its width set so that the model has within `tolerance` of `target` parameters:
    the recurrent state width model.d_state for a stack with recurrent layers (in steps the
    layers allow: the block size of bdlru, n_heads of deltanet, 2 of lru / blur), else model.d_model
    (attention only, in steps of 2 n_heads). Returns (cfg, params); ValueError when no width fits."""
    from llm_lru.config import layer_kinds, validate_model

    m = cfg.model
    kinds = set(layer_kinds(m))
    if kinds <= {"attn", "swa"}:
        field, step = "d_model", 2 * m.n_heads
    else:
        field, step = "d_state", 1
        if "bdlru" in kinds:
            step = math.lcm(step, m.block_size)
        if "deltanet" in kinds:
            step = math.lcm(step, m.n_heads)
        if kinds & {"lru", "blur"}:
            step = math.lcm(step, 2)
    best = None
    width = step
    while width <= 64 * max(m.d_model, target ** 0.5):
        cand = dataclasses.replace(m, **{field: width})
        validate_model(cand)
        n = count_params(cand)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (cand, n)
        if n > target:
            break
        width += step
    if best is None or abs(best[1] - target) > tolerance * target:
        got = "none" if best is None else f"{best[1]} at {field} {getattr(best[0], field)}"
        raise ValueError(f"sweep config: match_params {target}: no {field} in steps of {step} gives a model within "
                         f"{tolerance:.0%} (closest: {got})")
    return dataclasses.replace(cfg, model=best[0]), best[1]


def config_hash(cfg) -> str:
    """A short hash of a run's resolved config without its out_dir: a resumed sweep reruns a cell
    whose config changed."""
    from llm_lru.config import to_dict

    d = to_dict(cfg)
    d.pop("out_dir", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sweep_runs(sweep: Dict[str, Any], out_dir: Path) -> List[Dict[str, Any]]:
    """The runs of a sweep dict {base, mixers: {name: overrides}, tasks: {name: overrides},
    seeds: [int, ...] (optional: each run once per seed, as train.seed), match_params: N (optional)}:
    [{"mixer", "task", "seed", "config": RunConfig, "eval_lengths", "params", "hash"}], tasks x
    mixers x seeds, each its own out_dir.

    A task entry may also hold `eval_lengths: [L, ...]` (score each run also at these lengths),
    `mixers: [name, ...]` (only these mixers on this task) and `match_params: N` (size every
    mixer to N parameters, see match_params; overrides the top-level one)."""
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
        tover = dict(tover or {})
        extra = {k: tover.pop(k) for k in TASK_KEYS if k in tover}
        names = extra.get("mixers") or list(sweep["mixers"])
        unknown = [n for n in names if n not in sweep["mixers"]]
        if unknown:
            raise ValueError(f"sweep config: task '{tname}': mixers {unknown} are not under 'mixers'")
        target = extra.get("match_params", sweep.get("match_params"))
        for mname in names:
            if only_m and mname not in only_m:
                continue
            for seed in seeds:
                d = _merge(_merge(sweep["base"], tover), sweep["mixers"][mname])
                d["out_dir"] = str(out_dir / (f"{tname}__{mname}" + ("" if seed is None else f"__s{seed}")))
                if seed is not None:
                    d.setdefault("train", {})["seed"] = seed
                try:
                    cfg = from_dict(d)
                    params = None
                    if target:
                        cfg, params = match_params(cfg, int(target))
                except ValueError as e:
                    raise ValueError(f"sweep config: task '{tname}' x mixer '{mname}': {e}") from None
                runs.append({"mixer": mname, "task": tname, "seed": cfg.train.seed, "config": cfg,
                             "eval_lengths": list(extra.get("eval_lengths") or []), "params": params,
                             "hash": config_hash(cfg)})
    return runs


def _row_head(r: Dict[str, Any]) -> Dict[str, Any]:
    cfg = r["config"]
    return {"task": r["task"], "mixer": r["mixer"], "seed": r["seed"], "pattern": cfg.model.pattern,
            "d_model": cfg.model.d_model, "d_state": cfg.model.d_state, "block_size": cfg.model.block_size,
            "seq_len": cfg.train.seq_len, "task_args": dict(cfg.data.task_args), "max_steps": cfg.train.max_steps,
            "eval_lengths": r["eval_lengths"], "config_hash": r["hash"]}


def _run_one(r: Dict[str, Any], eval_samples: int) -> Dict[str, Any]:
    """One cell: its row, with the scores or the error (a failed run is a row, not the end)."""
    row = _row_head(r)
    # A run directory left by an earlier sweep would be resumed by the trainer: start clean.
    shutil.rmtree(r["config"].out_dir, ignore_errors=True)
    try:
        row.update(train_and_score(r["config"], eval_samples, eval_lengths=r["eval_lengths"]))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    if row.get("preempted"):  # a save signal stopped training: not a result (a resume reruns it)
        row["error"] = f"stopped by a save signal at step {row['steps']} of {row['max_steps']}"
    return row


def _one_thread() -> None:
    # Each worker process of a parallel sweep: one thread, so `--jobs` processes share the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # Each worker starts its own world of one on a free port: not the parent's (inherited env).
    if os.environ.get("WORLD_SIZE") == "1":
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)


def _key(row: Dict[str, Any]):
    return (row["task"], row["mixer"], row["seed"])


def run_sweep(sweep: Dict[str, Any], out_dir: Path, eval_samples: int = 256,
              on_result=None, show_progress: bool = True, jobs: int = 1,
              done: Optional[List[Dict[str, Any]]] = None, log=print) -> Dict[str, Any]:
    """Train and score every run of the sweep; returns {"results": [...], "table": Table}.

    jobs > 1 runs cells in that many worker processes (one thread each; each its own world of
    one). done: rows of an earlier, cut-short run of the same sweep (its JSON): a cell whose row
    has no error and the same config hash is kept, not rerun. Cells run seed by seed (every
    cell's first seed before any second), so a partial table covers every cell. on_result(rows)
    is called after each run with the rows so far in sweep order; log gets a line per run with
    an estimate of the time left. A save signal (SIGTERM, SIGUSR1: the trainer's) stops the sweep
    after the cell it cut short, which is recorded as an error and rerun on resume.
    """
    runs = sweep_runs(sweep, out_dir)
    order = {_key(_row_head(r)): i for i, r in enumerate(runs)}
    prior = {_key(row): row for row in (done or []) if "error" not in row and _key(row) in order}
    rows: Dict[Any, Dict[str, Any]] = {}
    for r in runs:
        k = _key(_row_head(r))
        if k in prior and prior[k].get("config_hash") == r["hash"]:
            rows[k] = prior[k]
    seeds = sweep.get("seeds") or [None]
    seed_rank = {s: i for i, s in enumerate(seeds)}
    todo = sorted((r for r in runs if _key(_row_head(r)) not in rows),
                  key=lambda r: (seed_rank.get(r["seed"], 0), order[_key(_row_head(r))]))
    if rows:
        log(f"recall sweep: {len(rows)} of {len(runs)} runs already done (kept), {len(todo)} to run")
    bar = progress(len(todo), "recall sweep", show_progress)
    t0 = time.time()

    def finished(row, n_done):
        rows[_key(row)] = row
        bar.update(1)
        elapsed = time.time() - t0
        left = (len(todo) - n_done) * elapsed / n_done
        what = f"acc {row['accuracy']:.3f}" if "accuracy" in row else row.get("error", "?")
        log(f"[{n_done}/{len(todo)}] {row['task']} / {row['mixer']} / seed {row['seed']}: {what} "
            f"({row.get('seconds', 0):.0f} s); elapsed {elapsed / 60:.1f} min, ETA {left / 60:.1f} min")
        if on_result:
            on_result(in_order())

    def in_order():
        return sorted(rows.values(), key=lambda row: order[_key(row)])

    if jobs <= 1:
        for i, r in enumerate(todo, 1):
            row = _run_one(r, eval_samples)
            finished(row, i)
            if row.get("preempted"):
                log("recall sweep: stopped by a signal; rerun the same command to resume")
                break
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
            futures = [pool.submit(_run_one, r, eval_samples) for r in todo]
            for i, f in enumerate(as_completed(futures), 1):
                finished(f.result(), i)
    bar.close()
    results = in_order()
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
