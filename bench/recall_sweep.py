"""Recall / state-tracking lab: train every mixer of configs/sweeps/recall.yaml on every task with
the normal trainer (in-process, a world of one), score answer accuracy on fresh samples, and
write one table: bench/results/recall_sweep.{json,md} (rewritten after every run, so a cut-short
sweep still leaves its partial table).

Baseline: the diagonal gated recurrence (glru) of the same run; each cell prints its ratio to it.

    python bench/recall_sweep.py [--config FILE] [--only-tasks a,b] [--only-mixers x,y]
                                 [--steps N] [--out DIR] [--name STEM]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from omegaconf import OmegaConf  # noqa: E402

from llm_lru.eval.recall import run_sweep, sweep_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "glru"


def markdown(results, meta) -> str:
    t = sweep_table(results)
    lines = ["# Recall / state-tracking sweep", "",
             f"- config: {meta['config']}, {meta['max_steps']} steps per run, machine: {meta['machine']}",
             f"- every model: d_model 64, 2 layers, trained from scratch by llm_lru.train on the task; "
             f"accuracy = greedy answers right / answers on {meta['eval_samples']} fresh samples",
             f"- baseline for the ratios: {BASELINE} (diagonal gated recurrence)", "",
             "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    for row in t["rows"]:
        lines.append("| " + " | ".join("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row) + " |")
    lines += ["", "Per run (final train loss, seconds, accuracy by answer context position):", ""]
    for r in results:
        if "error" in r:
            lines.append(f"- {r['task']} / {r['mixer']}: FAILED {r['error']}")
        else:
            lines.append(f"- {r['task']} / {r['mixer']}: acc {r['accuracy']:.3f}, seq acc {r['sequence_accuracy']:.3f}, "
                         f"loss {r['final_loss']}, {r['train_seconds']:.0f} s, params {r['params']}, "
                         f"by position {r['accuracy_by_position']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/sweeps/recall.yaml"))
    ap.add_argument("--only-tasks", default="")
    ap.add_argument("--only-mixers", default="")
    ap.add_argument("--steps", type=int, default=0, help="override train.max_steps of every run")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--runs-dir", default="/tmp/llm_lru_recall_sweep")
    ap.add_argument("--name", default="recall_sweep", help="results file stem under --out")
    args = ap.parse_args()
    sweep = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)
    if args.only_tasks:
        sweep["only_tasks"] = args.only_tasks.split(",")
    if args.only_mixers:
        sweep["only_mixers"] = args.only_mixers.split(",")
    if args.steps:
        sweep["base"].setdefault("train", {})["max_steps"] = args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": os.path.relpath(args.config, ROOT), "max_steps": sweep["base"]["train"]["max_steps"],
            "eval_samples": sweep.get("eval_samples", 256), "machine": f"{platform.machine()} CPU, "
            f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", "started": time.ctime()}

    def save(results):
        (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        (out / f"{args.name}.md").write_text(markdown(results, meta))

    res = run_sweep(sweep, Path(args.runs_dir) / args.name, meta["eval_samples"], on_result=save)
    save(res["results"])
    acc = {(r["task"], r["mixer"]): r.get("accuracy") for r in res["results"]}
    for (task, mixer), a in acc.items():
        base = acc.get((task, BASELINE))
        ratio = f"{a / base:.2f}x" if a is not None and base else "n/a"
        print(f"{task:>16} {mixer:>20}: accuracy {a if a is None else round(a, 3)}  ratio to {BASELINE}: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
