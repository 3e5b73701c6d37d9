"""Recall / state-tracking lab: train every mixer of configs/sweeps/recall.yaml on every task with
the normal trainer (in-process, a world of one), score answer accuracy on fresh samples, and
write one table: bench/results/recall_sweep.{json,md} (rewritten after every run, so a cut-short
sweep still leaves its partial table). A config with `seeds` runs each cell once per seed; the
table then shows the mean, a second one mean / std / min / max and accuracy per parameter, and
NAME.png plots accuracy against parameters per task (configs/sweeps/paper.yaml).

Baseline: the config's `baseline` mixer (default glru, the diagonal gated recurrence) of the same
sweep; each cell prints its ratio to it.

    python bench/recall_sweep.py [--config FILE] [--only-tasks a,b] [--only-mixers x,y]
                                 [--steps N] [--out DIR] [--name STEM]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from omegaconf import OmegaConf  # noqa: E402

from llm_lru.lab import run_sweep, sweep_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "glru"


def cells(results):
    """{(task, mixer): {"n", "mean", "std", "min", "max", "params", "acc_per_10k_params"}} over seeds."""
    out = {}
    for r in results:
        if "accuracy" in r:
            out.setdefault((r["task"], r["mixer"]), []).append(r)
    stats = {}
    for key, rs in out.items():
        a = [float(r["accuracy"]) for r in rs]
        mean = statistics.fmean(a)
        stats[key] = {"n": len(a), "mean": mean, "std": statistics.stdev(a) if len(a) > 1 else 0.0,
                      "min": min(a), "max": max(a), "params": rs[0]["params"],
                      "acc_per_10k_params": mean / rs[0]["params"] * 1e4}
    return stats


def markdown(results, meta) -> str:
    t = sweep_table(results)
    base = meta["base_model"]
    lines = ["# Recall / state-tracking sweep", "",
             f"- config: {meta['config']}, {meta['max_steps']} steps per run, seeds {meta['seeds']}, "
             f"machine: {meta['machine']}",
             f"- every model: d_model {base.get('d_model')}, {base.get('n_layers')} layers (per-mixer overrides in "
             f"the config), trained from scratch by llm_lru.train on the task; accuracy = greedy answers right / "
             f"answers on {meta['eval_samples']} fresh samples" + ("; cells: mean over seeds" if len(meta["seeds"]) > 1 else ""),
             f"- baseline for the ratios: {meta['baseline']}", "",
             "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    for row in t["rows"]:
        lines.append("| " + " | ".join("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row) + " |")
    if len(meta["seeds"]) > 1:
        lines += ["", "Over seeds (accuracy mean / std / min / max; parameters; mean accuracy per 10k parameters):", "",
                  "| task | mixer | seeds | mean | std | min | max | params | acc / 10k params |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (task, mixer), c in cells(results).items():
            lines.append(f"| {task} | {mixer} | {c['n']} | {c['mean']:.3f} | {c['std']:.3f} | {c['min']:.3f} | "
                         f"{c['max']:.3f} | {c['params']} | {c['acc_per_10k_params']:.3f} |")
    lines += ["", "Per run (final train loss, seconds, accuracy by answer context position):", ""]
    for r in results:
        tag = f"{r['task']} / {r['mixer']}" + (f" / seed {r['seed']}" if len(meta["seeds"]) > 1 else "")
        if "error" in r:
            lines.append(f"- {tag}: FAILED {r['error']}")
        else:
            lines.append(f"- {tag}: acc {r['accuracy']:.3f}, seq acc {r['sequence_accuracy']:.3f}, "
                         f"loss {r['final_loss']}, {r['train_seconds']:.0f} s, params {r['params']}, "
                         f"by position {r['accuracy_by_position']}")
    return "\n".join(lines) + "\n"


def plot(results, path: Path) -> None:
    """Accuracy (mean over seeds, min-max bars) against parameters, one panel per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = cells(results)
    tasks = list(dict.fromkeys(t for t, _ in stats))
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, mixer), c in stats.items():
            if t != task:
                continue
            ax.errorbar([c["params"]], [c["mean"]], yerr=[[c["mean"] - c["min"]], [c["max"] - c["mean"]]],
                        fmt="o", capsize=3, label=mixer)
        ax.set_title(task)
        ax.set_xlabel("parameters")
        ax.set_ylabel("answer accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    baseline = sweep.get("baseline", BASELINE)
    meta = {"config": os.path.relpath(args.config, ROOT), "max_steps": sweep["base"]["train"]["max_steps"],
            "eval_samples": sweep.get("eval_samples", 256), "machine": f"{platform.machine()} CPU, "
            f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", "started": time.ctime(),
            "seeds": sweep.get("seeds") or [sweep["base"]["train"].get("seed", 1234)], "baseline": baseline,
            "base_model": sweep["base"].get("model", {})}

    def save(results):
        (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        (out / f"{args.name}.md").write_text(markdown(results, meta))
        if len(meta["seeds"]) > 1:
            plot(results, out / f"{args.name}.png")

    res = run_sweep(sweep, Path(args.runs_dir) / args.name, meta["eval_samples"], on_result=save)
    save(res["results"])
    acc = {(t, m): c["mean"] for (t, m), c in cells(res["results"]).items()}
    for (task, mixer), a in acc.items():
        base = acc.get((task, baseline))
        ratio = f"{a / base:.2f}x" if base else "n/a"
        print(f"{task:>16} {mixer:>20}: accuracy {a:.3f}  ratio to {baseline}: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
