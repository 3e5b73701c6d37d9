"""Passkey and NIAH from 1K to 64K tokens on a trained checkpoint, through the real `llm-lru eval`
command: one eval process per (suite, length), so that each process's peak resident memory
(wait4 ru_maxrss) says what that length costs. Writes bench/results/eval_long.{json,md} (rewritten
after every cell, so a cut-short run still leaves its partial table) and bench/results/eval_long_passkey.png
(the passkey heatmap over all lengths, drawn with the suite's own heatmap function).

    python bench/eval_long.py [--target runs/demo] [--lengths 1024,...,65536] [--depths 0,0.5,1]
                              [--passkey-trials 1] [--niah-tasks single,...] [--niah-trials 1]
                              [--chunk-size 1024] [--threads 1] [--work runs/eval_long]

Memory: recurrent and sliding-window layers carry constant-size states from chunk to chunk; a
full-attention layer keeps a KV cache of 2 x n_kv_heads x head_dim floats per token read. The
table gives that cache's size beside the measured peak, so the growth of the peak can be checked
against it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLM_LRU = [sys.executable, "-m", "llm_lru"]
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
NIAH_TASKS = ["single", "multikey", "multivalue", "multiquery", "vt", "cwe"]


def run_cell(target: str, suite: str, length: int, args, work: Path) -> dict:
    """One `llm-lru eval` process for one suite at one length: its metrics, wall seconds, the
    suite's own seconds and the process's peak RSS (MiB)."""
    out = work / f"{suite}_{length}"
    over = [f"chunk_size={args.chunk_size}", f"seed={args.seed}"]
    if suite == "passkey":
        over += [f"passkey_lengths=[{length}]", f"passkey_depths=[{','.join(map(str, args.depths))}]",
                 f"passkey_trials={args.passkey_trials}"]
    else:
        over += [f"niah_lengths=[{length}]", f"niah_tasks=[{','.join(args.niah_tasks)}]",
                 f"niah_trials={args.niah_trials}"]
    cmd = ["nice", "-n", "19"] + LLM_LRU + ["eval", target, "--suite", suite, "--out", str(out), "--no-progress"] + over
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    with open(work / f"{suite}_{length}.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all children);
        # `nice` execs the eval, so the pid is the eval process itself
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t0
    cell = {"suite": suite, "length": length, "wall_s": round(wall, 2), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
            "exit": os.waitstatus_to_exitcode(status), "cmd": " ".join(cmd[3:])}
    rep = out / "report.json"
    if rep.is_file():
        res = next((r for r in json.loads(rep.read_text())["suites"] if r["suite"] == suite), {})
        cell.update({"suite_s": res.get("seconds"), "metrics": res.get("metrics"), "error": res.get("error"),
                     "tables": res.get("tables")})
    else:
        cell["error"] = f"no report.json (exit {cell['exit']}); see {work / f'{suite}_{length}.log'}"
    return cell


def model_facts(target: str) -> dict:
    """Width and layer kinds from the run config: what a full-attention KV cache costs per token."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / target / "config.yaml").model
    pattern = (cfg.pattern * cfg.n_layers)[:cfg.n_layers]
    n_full = pattern.count("A")
    n_kv = cfg.n_kv_heads or cfg.n_heads
    head_dim = cfg.d_model // cfg.n_heads
    return {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "pattern": pattern, "window": cfg.window,
            "full_attention_layers": n_full, "swa_layers": pattern.count("S"),
            "kv_bytes_per_token": n_full * 2 * n_kv * head_dim * 4}  # float32 k and v


def accuracy(cell: dict):
    m = cell.get("metrics") or {}
    if cell["suite"] == "passkey":
        return m.get(f"accuracy@{cell['length']}")
    vals = [v for k, v in m.items() if k.endswith(f"@{cell['length']}") and v is not None]
    return sum(vals) / len(vals) if vals else None


def markdown(meta: dict, cells: list) -> str:
    f = meta["model"]
    lines = ["# Passkey and NIAH from 1K to 64K tokens on a trained checkpoint", "",
             "Findings: " + meta.get("findings", "(run in progress)"), "",
             f"- machine: {meta['machine']}; every eval process under `nice -n 19`, "
             f"OMP_NUM_THREADS={meta['threads']}, glibc malloc env {meta.get('malloc_env') or 'default'}, while other jobs shared the 2 cores (timings are upper bounds)",
             f"- checkpoint: {meta['checkpoint']} ({meta['checkpoint_note']})",
             f"- model: d_model {f['d_model']}, {f['n_layers']} layers, pattern {f['pattern']} "
             f"({f['full_attention_layers']} full-attention layer(s), KV cache {f['kv_bytes_per_token']} B/token)",
             f"- settings: chunk_size {meta['chunk_size']}; passkey depths {meta['depths']} x {meta['passkey_trials']} "
             f"trial(s) per length; niah tasks {', '.join(meta['niah_tasks'])} x {meta['niah_trials']} trial(s) per length",
             "- command per cell: `llm-lru eval TARGET --suite S --out DIR --no-progress <length and settings overrides>`; "
             "one process per cell; peak RSS = the process's ru_maxrss (wait4)",
             "- accuracy: passkey = exact 5-digit key; niah = mean RULER string_match_all score over its tasks", "",
             "| suite | length | accuracy | suite s | process wall s | peak RSS MiB | full-attn KV cache MiB | error |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        a = accuracy(c)
        kv = f["kv_bytes_per_token"] * c["length"] / 2 ** 20
        lines.append(f"| {c['suite']} | {c['length']} | {'-' if a is None else f'{a:.3f}'} | {c.get('suite_s') or '-'} | "
                     f"{c['wall_s']} | {c['peak_rss_mib']} | {kv:.1f} | {c.get('error') or ''} |")
    per_task = [c for c in cells if c["suite"] == "niah" and c.get("metrics")]
    if per_task:
        lines += ["", "NIAH score per task:", "", "| length | " + " | ".join(meta["niah_tasks"]) + " |",
                  "|---|" + "---|" * len(meta["niah_tasks"])]
        for c in per_task:
            vals = [c["metrics"].get(f"{t}@{c['length']}") for t in meta["niah_tasks"]]
            lines.append(f"| {c['length']} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    if meta.get("notes"):
        lines += [""] + meta["notes"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="runs/demo")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--suites", default="passkey,niah")
    ap.add_argument("--depths", default="0.0,0.5,1.0")
    ap.add_argument("--passkey-trials", type=int, default=1)
    ap.add_argument("--niah-tasks", default=",".join(NIAH_TASKS))
    ap.add_argument("--niah-trials", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/eval_long", help="eval output folders and logs (not committed)")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--name", default="eval_long")
    ap.add_argument("--redraw", action="store_true", help="rewrite the .md from the existing .json (no evals)")
    ap.add_argument("--findings", default="", help="with --redraw: a text file, the md's Findings paragraph")
    ap.add_argument("--notes", default="", help="with --redraw: a text file of lines appended to the md")
    args = ap.parse_args()
    out = Path(args.out)
    if args.redraw:
        data = json.loads((out / f"{args.name}.json").read_text())
        if args.findings:
            data["meta"]["findings"] = Path(args.findings).read_text().strip()
        if args.notes:
            data["meta"]["notes"] = Path(args.notes).read_text().strip().splitlines()
        (out / f"{args.name}.json").write_text(json.dumps(data, indent=1))
        (out / f"{args.name}.md").write_text(markdown(data["meta"], data["cells"]))
        return 0
    args.depths = [float(d) for d in args.depths.split(",")]
    args.niah_tasks = args.niah_tasks.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    if not (ROOT / args.target / "config.yaml").is_file():
        raise ValueError(f"--target: {args.target} has no config.yaml (run `make demo` for runs/demo)")
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt = (ROOT / args.target / "checkpoints" / "latest")
    meta = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {platform.python_version()}",
            "threads": args.threads, "checkpoint": args.target,
            "checkpoint_note": f"latest = {ckpt.read_text().strip() if ckpt.is_file() else '?'}",
            "model": model_facts(args.target), "chunk_size": args.chunk_size, "depths": args.depths,
            "passkey_trials": args.passkey_trials, "niah_tasks": args.niah_tasks, "niah_trials": args.niah_trials,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, "started": time.ctime()}
    prev = out / f"{args.name}.json"
    if prev.is_file():  # keep a finished run's findings/notes when only redrawing
        old = json.loads(prev.read_text())["meta"]
        meta.update({k: old[k] for k in ("findings", "notes") if k in old})
    cells = []

    def save():
        (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
        (out / f"{args.name}.md").write_text(markdown(meta, cells))

    for L in lengths:
        for suite in args.suites.split(","):
            c = run_cell(args.target, suite, L, args, work)
            cells.append(c)
            print(f"{suite:>8} {L:>6}: acc {accuracy(c)}  suite {c.get('suite_s')} s  wall {c['wall_s']} s  "
                  f"peak {c['peak_rss_mib']} MiB  {c.get('error') or ''}", flush=True)
            save()
    pk = [c for c in cells if c["suite"] == "passkey" and c.get("tables")]
    if pk:
        from llm_lru.eval.common import heatmap

        grid = [[row[3] for row in c["tables"][0]["rows"]] for c in pk]
        heatmap(out / f"{args.name}_passkey.png", grid, [c["length"] for c in pk], args.depths,
                f"passkey accuracy, {args.target}", "depth", "length (tokens)")
    meta["finished"] = time.ctime()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
