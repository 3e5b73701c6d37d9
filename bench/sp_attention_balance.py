"""Zigzag-balanced vs contiguous full causal attention under SP: CPU time per rank.

    .venv/bin/python bench/sp_attention_balance.py [--tokens 16384] [--sp 2,4] [--steps 2]
                                                   [--heads 2] [--kv-heads 1] [--head-dim 64]

One full causal attention layer's attend (SPAttention over the model's local_attention, the CPU
tiled route whose cost follows the visible pairs), forward + backward, on one sequence of
--tokens tokens split over sp gloo processes of one thread each. Baseline: balance=False (the
contiguous slices; rank r's queries see r*T + ~T/2 keys), measured in the same world, the two
modes alternating step by step after one warm-up step each. Per rank: process CPU time of the
step (the work that rank does; gloo waits block, they cost no CPU), the least disturbed (min) of
--steps; also wall time and the causal (query, key) pairs its inner attend was handed.
The step waits for the slowest rank, so the number that matters is max over ranks of the CPU
time: `speedup` = contiguous max / balanced max (ideal: the contiguous pairs' max/mean, ~2 - 1/sp).
On a shared 2-core machine wall times mostly measure the other tenants; CPU time per rank is the
meaningful number. Writes bench/results/sp_attention_balance.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llm_lru.kernels import local_attention  # noqa: E402
from llm_lru.parallel.attention import SPAttention  # noqa: E402
from tests.distributed import run_world  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _pairs(tq: int, tk: int) -> int:
    """Causal pairs of tq queries that are the last of tk keys."""
    return tq * (tk - tq) + tq * (tq + 1) // 2


def _world(rank, world, tokens, heads, kv_heads, hd, steps):
    T = tokens // world
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, h, tokens, hd, generator=gen) for h in (heads, kv_heads, kv_heads)]
    x = [t[:, :, rank * T:(rank + 1) * T].clone().requires_grad_() for t in full]
    g = torch.randn(1, heads, tokens, hd, generator=gen)[:, :, rank * T:(rank + 1) * T]
    pairs = [0]

    def counted(q, k, v, doc_start=None, window=0, causal=True):
        pairs[0] += _pairs(q.shape[2], k.shape[2])
        return local_attention(q, k, v, doc_start, window, causal)

    out = {b: {"cpu_s": [], "wall_s": [], "pairs": 0} for b in ("contiguous", "balanced")}
    ys = {}
    for step in range(steps + 1):  # step 0 warms up
        for name in ("contiguous", "balanced"):
            att = SPAttention(counted, dist.group.WORLD, balance=name == "balanced")
            for t in x:
                t.grad = None
            pairs[0] = 0
            dist.barrier()
            c0, w0 = time.process_time(), time.perf_counter()
            y = att(*x)
            y.backward(g)
            c1, w1 = time.process_time(), time.perf_counter()
            if step:
                out[name]["cpu_s"].append(c1 - c0)
                out[name]["wall_s"].append(w1 - w0)
            out[name]["pairs"] = pairs[0]
            ys[name] = (y.detach(), x[0].grad.clone())
    out["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(ys["contiguous"], ys["balanced"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--sp", default="2,4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    rows = []
    for sp in [int(s) for s in args.sp.split(",")]:
        t0 = time.perf_counter()
        res = run_world(_world, sp, args.tokens, args.heads, args.kv_heads, args.head_dim, args.steps, timeout=900)
        row = {"sp": sp, "tokens": args.tokens, "heads": args.heads, "kv_heads": args.kv_heads,
               "head_dim": args.head_dim, "steps": args.steps, "max_abs_diff": max(r["max_abs_diff"] for r in res)}
        for name in ("contiguous", "balanced"):
            cpu = [min(r[name]["cpu_s"]) for r in res]
            pairs = [r[name]["pairs"] for r in res]
            row[name] = {"cpu_s_per_rank": cpu, "wall_s_per_rank": [min(r[name]["wall_s"]) for r in res],
                         "pairs_per_rank": pairs, "cpu_max_over_mean": max(cpu) / (sum(cpu) / sp),
                         "pairs_max_over_mean": max(pairs) / (sum(pairs) / sp)}
        row["speedup_max_rank_cpu"] = max(row["contiguous"]["cpu_s_per_rank"]) / max(row["balanced"]["cpu_s_per_rank"])
        row["run_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sp_attention_balance.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Zigzag-balanced vs contiguous causal attention under SP (CPU, gloo, 1 thread per rank)", "",
             f"One full-attention attend, forward + backward, {args.tokens} tokens, {args.heads} heads "
             f"({args.kv_heads} KV) x {args.head_dim}; CPU seconds per rank, min of {args.steps} steps.",
             "Baseline: contiguous (balance=False) in the same world. "
             "speedup = contiguous max rank / balanced max rank.",
             "", "| sp | mode | CPU s per rank | max/mean CPU | max/mean pairs | speedup (max rank) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for name in ("contiguous", "balanced"):
            m = row[name]
            cpu = " ".join(f"{c:.2f}" for c in m["cpu_s_per_rank"])
            sp_cell = f"{row['speedup_max_rank_cpu']:.2f}x" if name == "balanced" else "1 (baseline)"
            lines.append(f"| {row['sp']} | {name} | {cpu} | {m['cpu_max_over_mean']:.2f} | "
                         f"{m['pairs_max_over_mean']:.2f} | {sp_cell} |")
    lines += ["", "Values agree between the modes (max abs difference of output and dq: "
              + ", ".join(f"sp={r['sp']}: {r['max_abs_diff']:.1e}" for r in rows) + ")."]
    (RESULTS / "sp_attention_balance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
