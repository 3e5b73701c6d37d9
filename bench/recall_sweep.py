"""Recall / state-tracking lab: train every mixer of configs/sweeps/recall.yaml on every task with
the normal trainer (in-process, a world of one), score answer accuracy on fresh samples, and
write one table: bench/results/recall_sweep.{json,md} (rewritten after every run, so a cut-short
sweep still leaves its partial table). A config with `seeds` runs each cell once per seed; the
table then shows the mean, a second one mean / std / min / max and accuracy per parameter, and
NAME.png plots accuracy against parameters per task (configs/sweeps/paper.yaml). Cells with
`eval_lengths` are also scored at those lengths; `match_params: N` sizes every mixer to N
parameters (llm_lru.lab.sweep_runs).

Fast enough to use: `--jobs K` runs K cells at once in worker processes (one thread each); a
cut-short sweep resumes from NAME.json (cells done with the same config are kept; `--fresh`
reruns all); each finished cell prints the time left.

Baseline: the config's `baseline` mixer (default glru, the diagonal gated recurrence) of the same
sweep; each cell prints its ratio to it.

    python bench/recall_sweep.py [--config FILE] [--only-tasks a,b] [--only-mixers x,y]
                                 [--steps N] [--out DIR] [--name STEM] [--jobs K] [--fresh]
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


SOLVED = 0.99  # a seed "solves" a cell at this answer accuracy or more


def cells(results):
    """{(task, mixer): {"n", "mean", "std", "min", "max", "solved", "params", "acc_per_10k_params",
    "by_length": {L: {"mean", "min", "max", "solved"}}}} over seeds."""
    out = {}
    for r in results:
        if "accuracy" in r:
            out.setdefault((r["task"], r["mixer"]), []).append(r)
    stats = {}
    for key, rs in out.items():
        a = [float(r["accuracy"]) for r in rs]
        mean = statistics.fmean(a)
        by_length = {}
        for L in rs[0].get("by_length") or {}:
            la = [float(r["by_length"][L]["accuracy"]) for r in rs if L in (r.get("by_length") or {})]
            by_length[L] = {"mean": statistics.fmean(la), "min": min(la), "max": max(la),
                            "solved": sum(x >= SOLVED for x in la)}
        stats[key] = {"n": len(a), "mean": mean, "std": statistics.stdev(a) if len(a) > 1 else 0.0,
                      "min": min(a), "max": max(a), "solved": sum(x >= SOLVED for x in a), "params": rs[0]["params"],
                      "acc_per_10k_params": mean / rs[0]["params"] * 1e4, "by_length": by_length}
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
        lines += ["", f"Over seeds (accuracy mean / std / min / max; seeds solved (>= {SOLVED}); parameters; mean "
                  "accuracy per 10k parameters; at the eval_lengths: mean (min-max) solved):", "",
                  "| task | mixer | seeds | mean | std | min | max | solved | params | acc / 10k params | by length |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (task, mixer), c in cells(results).items():
            by_len = "; ".join(f"{L}: {b['mean']:.3f} ({b['min']:.2f}-{b['max']:.2f}) {b['solved']}/{c['n']}"
                               for L, b in c["by_length"].items()) or "-"
            lines.append(f"| {task} | {mixer} | {c['n']} | {c['mean']:.3f} | {c['std']:.3f} | {c['min']:.3f} | "
                         f"{c['max']:.3f} | {c['solved']}/{c['n']} | {c['params']} | {c['acc_per_10k_params']:.3f} | {by_len} |")
    lines += ["", "Per run (final train loss, seconds, accuracy by answer context position):", ""]
    for r in results:
        tag = f"{r['task']} / {r['mixer']}" + (f" / seed {r['seed']}" if len(meta["seeds"]) > 1 else "")
        if "error" in r:
            lines.append(f"- {tag}: FAILED {r['error']}")
        else:
            lines.append(f"- {tag}: acc {r['accuracy']:.3f}, seq acc {r['sequence_accuracy']:.3f}, "
                         f"loss {r['final_loss']}, {r['train_seconds']:.0f} s, params {r['params']}, "
                         f"by position {r['accuracy_by_position']}")
            for L, b in (r.get("by_length") or {}).items():
                lines.append(f"  - at length {L}: acc {b['accuracy']:.3f}, by position {b['accuracy_by_position']}")
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


def load_sweep(config: str, only_tasks: str = "", only_mixers: str = "", steps: int = 0) -> dict:
    """The sweep dict of a config file, with the command line's filters and step override."""
    sweep = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    if only_tasks:
        sweep["only_tasks"] = only_tasks.split(",")
    if only_mixers:
        sweep["only_mixers"] = only_mixers.split(",")
    if steps:
        sweep["base"].setdefault("train", {})["max_steps"] = steps
        for t in sweep["tasks"].values():  # a task's own step count too
            if (t or {}).get("train", {}).get("max_steps"):
                t["train"]["max_steps"] = steps
    return sweep


def run(sweep: dict, config: str, out: Path, name: str, runs_dir: str, jobs: int = 1, fresh: bool = False,
        render=markdown, plotter=plot) -> list:
    """Run (or resume) the sweep; write out/NAME.json, NAME.md (render(results, meta)) and, with
    several seeds, NAME.png (plotter(results, path)) after every finished cell. Returns the rows."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": os.path.relpath(config, ROOT), "max_steps": sweep["base"]["train"]["max_steps"],
            "eval_samples": sweep.get("eval_samples", 256), "machine": f"{platform.machine()} CPU, "
            f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, jobs {jobs}",
            "started": time.ctime(), "seeds": sweep.get("seeds") or [sweep["base"]["train"].get("seed", 1234)],
            "baseline": sweep.get("baseline", BASELINE), "base_model": sweep["base"].get("model", {})}
    path = out / f"{name}.json"
    done = []
    if path.is_file() and not fresh:
        prev = json.loads(path.read_text())
        done = prev.get("results", [])
        meta["started"] = prev.get("meta", {}).get("started", meta["started"])
        meta["resumed"] = time.ctime()

    def save(results):
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        (out / f"{name}.md").write_text(render(results, meta))
        if len(meta["seeds"]) > 1:
            plotter(results, out / f"{name}.png")

    res = run_sweep(sweep, Path(runs_dir) / name, meta["eval_samples"], on_result=save, show_progress=False,
                    jobs=jobs, done=done, log=lambda line: print(line, flush=True))
    save(res["results"])
    return res["results"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/sweeps/recall.yaml"))
    ap.add_argument("--only-tasks", default="")
    ap.add_argument("--only-mixers", default="")
    ap.add_argument("--steps", type=int, default=0, help="override train.max_steps of every run")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--runs-dir", default="/tmp/llm_lru_recall_sweep")
    ap.add_argument("--name", default="recall_sweep", help="results file stem under --out")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once, in worker processes of one thread each")
    ap.add_argument("--fresh", action="store_true", help="rerun every cell, even those done in NAME.json")
    args = ap.parse_args()
    sweep = load_sweep(args.config, args.only_tasks, args.only_mixers, args.steps)
    results = run(sweep, args.config, Path(args.out), args.name, args.runs_dir, args.jobs, args.fresh)
    baseline = sweep.get("baseline", BASELINE)
    acc = {(t, m): c["mean"] for (t, m), c in cells(results).items()}
    for (task, mixer), a in acc.items():
        base = acc.get((task, baseline))
        ratio = f"{a / base:.2f}x" if base else "n/a"
        print(f"{task:>16} {mixer:>20}: accuracy {a:.3f}  ratio to {baseline}: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
