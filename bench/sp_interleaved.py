"""Sequence-parallel step time on CPU with every variant interleaved step by step in the same processes.

    .venv/bin/python bench/sp_interleaved.py [--tokens 16384] [--sp 2] [--cycles 15] [--pattern BHGL]
                                             [--name sp_interleaved]

bench/sp.py starts a fresh world per variant, so the variants it compares run tens of seconds
apart; on a shared machine whose speed drifts by tens of percent over that time the ratios then
measure the drift. Here one world of --sp processes (one thread each, gloo) holds every variant
at once and runs them in turn, one training step (forward + backward) each, for --cycles cycles,
rotating the order every cycle; each cycle's ratios are taken between steps seconds apart:
- sp1: the unsplit model on the whole sequence, on rank 0 alone (the other ranks wait at a barrier);
- independent: every rank trains the unsplit model on its own T/sp tokens, no exchange: the
  machine's ceiling for sp concurrent processes (see bench/sp.py);
- ring, allgather: the SP model (parallel.carry), training mode (final_state=False).
Times are wall clock, the slowest rank's, each step started after a barrier. Baseline: sp1 in
the same cycle. Writes bench/results/NAME.json and NAME.md. Memory: see bench/sp.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sp import add_model_args, batch, model_config  # noqa: E402  (bench/ is on sys.path when run as a script)
from tests.distributed import run_world  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VARIANTS = ("sp1", "independent", "ring", "allgather")


def _worker(rank, world, cfg_kw, tokens, cycles):
    import torch.distributed as dist

    from llm_lru.config import ModelConfig, ParallelConfig
    from llm_lru.models import HybridLM
    from llm_lru.parallel import build_mesh, parallelize, sp_dp_loss

    torch.set_num_threads(1)
    mesh = build_mesh(sp=world)

    def fresh():
        torch.manual_seed(0)
        return HybridLM(ModelConfig(**cfg_kw))

    models = {"sp1": fresh(), "independent": fresh(),
              "ring": parallelize(fresh(), mesh, ParallelConfig(carry="ring"), final_state=False),
              "allgather": parallelize(fresh(), mesh, ParallelConfig(carry="allgather"), final_state=False)}
    ids, labels, docs = batch(cfg_kw, tokens)
    t_local = mesh.check_length(tokens, "--tokens")
    local = [mesh.local_slice(x) for x in (ids, labels, docs)]
    ce = torch.nn.functional.cross_entropy

    def step(name):
        model = models[name]
        model.zero_grad(set_to_none=True)
        if name == "sp1":
            if rank == 0:
                ce(model(ids, docs).flatten(0, 1).float(), labels.flatten()).backward()
            return
        i, y, d = local
        logits = model(i, d, pos_offset=mesh.pos_offset(t_local))
        if name == "independent":
            ce(logits.flatten(0, 1).float(), y.flatten()).backward()
        else:
            sp_dp_loss(logits, y, mesh)[0].backward()

    for name in VARIANTS:  # warm-up
        dist.barrier()
        step(name)
    times = {name: [] for name in VARIANTS}
    for cycle in range(cycles):
        order = VARIANTS[cycle % len(VARIANTS):] + VARIANTS[:cycle % len(VARIANTS)]
        for name in order:
            dist.barrier()
            t = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t)
    return times


def _median_range(xs):
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs),
                q1=statistics.quantiles(xs, n=4)[0], q3=statistics.quantiles(xs, n=4)[2])


def run(tokens: int, sp: int, cycles: int, cfg_kw: dict) -> dict:
    per_rank = run_world(_worker, sp, cfg_kw, tokens, cycles, timeout=3600)
    step = {name: [per_rank[0][name][c] if name == "sp1" else max(r[name][c] for r in per_rank)
                   for c in range(cycles)] for name in VARIANTS}
    rows = []
    for name in VARIANTS:
        speedup = [b / s for b, s in zip(step["sp1"], step[name])]
        of_ceiling = [c / s for c, s in zip(step["independent"], step[name])]
        rows.append(dict(variant=name, step_s=_median_range(step[name]), speedup_vs_sp1=_median_range(speedup),
                         of_ceiling=None if name == "sp1" else _median_range(of_ceiling), steps=step[name]))
    return dict(rows=rows)


def _fmt(d, digits=2) -> str:
    return (f"{d['median']:.{digits}f} (IQR {d['q1']:.{digits}f}-{d['q3']:.{digits}f}, "
            f"min-max {d['min']:.{digits}f}-{d['max']:.{digits}f})")


def write(out: dict, meta: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(dict(meta=meta, **out), indent=2) + "\n")
    lines = [f"# Sequence parallelism on CPU, variants interleaved step by step ({meta['tokens']} tokens, "
             f"sp = {meta['sp']}, model {meta['model']})", "",
             f"Baseline: sp1 (the unsplit model, one process) in the same cycle. {meta['note']}", "",
             "| variant | step s (wall) | speedup vs sp1 | of ceiling (independent / this) |",
             "|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['variant']} | {_fmt(r['step_s'], 3)} | {_fmt(r['speedup_vs_sp1'])} | "
                     f"{'-' if r['of_ceiling'] is None else _fmt(r['of_ceiling'])} |")
    lines += ["", "Each cell: the median over cycles of that cycle's value (a ratio is taken within one cycle), "
              "its interquartile range and its extremes. independent: every rank trains the unsplit model on "
              "its own slice with no exchange, the most any SP scheme can reach on this machine."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--cycles", type=int, default=15)
    ap.add_argument("--name", default="sp_interleaved", help="results file stem under bench/results/")
    args = ap.parse_args(argv)
    if args.sp < 2:
        ap.error("--sp: at least 2 (sp1 is the baseline every cycle)")
    if args.cycles < 2:
        ap.error("--cycles: at least 2")
    cfg_kw = model_config(args)
    out = run(args.tokens, args.sp, args.cycles, cfg_kw)
    load = os.getloadavg()
    meta = dict(tokens=args.tokens, sp=args.sp, cycles=args.cycles, model=cfg_kw, cpus=os.cpu_count(),
                loadavg=load, torch=torch.__version__,
                note=(f"{os.cpu_count()} CPU cores, one thread per rank, gloo; {args.cycles} cycles of one "
                      f"training step per variant, order rotated every cycle; load average {load[0]:.1f} at the end."))
    write(out, meta, args.name)
    for r in out["rows"]:
        print(f"{r['variant']:>12}: step {r['step_s']['median']:.3f} s, speedup {_fmt(r['speedup_vs_sp1'])}"
              + ("" if r["of_ceiling"] is None else f", of ceiling {_fmt(r['of_ceiling'])}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
