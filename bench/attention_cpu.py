"""Attention on CPU without a Tq x Tk mask: llm_lru's route (`local_attention`: flash-kernel tiles
joined by log-sum-exp, empty tiles skipped) against the dense-mask reference (`dense_attention`,
the route before issue 17) and SDPA `is_causal=True` with no documents and no window (the floor).
One forward + backward, 4 heads x 16 dims (GQA 4:2), one thread, packed documents, at 4K and 16K
tokens, with a sliding window (512) and with full causal attention. Each case runs in a fresh
subprocess that reports its peak RSS above the RSS it had once its inputs existed, and its CPU
time (one thread, so the shared machine's load barely moves it; wall time is kept as well).
Writes bench/results/attention_cpu.json and .md.

    .venv/bin/python bench/attention_cpu.py [--tokens 4096 16384] [--window 512]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
H, HKV, HD = 4, 2, 16


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _doc_starts(T: int):
    """Packed documents of 256 to 4095 tokens (seeded), as the loader marks them."""
    import torch
    gen = torch.Generator().manual_seed(0)
    starts = torch.zeros(1, T, dtype=torch.bool)
    pos = 0
    while pos < T:
        starts[0, pos] = True
        pos += int(torch.randint(256, 4096, (1,), generator=gen))
    return starts


def child(route: str, T: int, window: int) -> dict:
    """One case in this process: build inputs, note RSS, run fwd + bwd, report the peak above it."""
    import torch
    sys.path.insert(0, str(ROOT))
    from llm_lru.kernels import dense_attention, local_attention
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, T, HD, generator=gen).requires_grad_()
    k = torch.randn(1, HKV, T, HD, generator=gen).requires_grad_()
    v = torch.randn(1, HKV, T, HD, generator=gen).requires_grad_()
    g = torch.randn(1, H, T, HD, generator=gen)
    docs = _doc_starts(T)
    if route == "sdpa_is_causal":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fn = lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    else:
        attend = local_attention if route == "ours" else dense_attention
        fn = lambda: attend(q, k, v, docs, window, True)  # noqa: E731
    base = _rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    fn().backward(g)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(route=route, tokens=T, window=window, cpu_s=cpu_s, wall_s=seconds, peak_extra_mib=peak - base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--child", nargs=3, metavar=("ROUTE", "T", "WINDOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    rows = []
    for T in args.tokens:
        cases = [("sdpa_is_causal", 0)] + [(r, w) for w in (args.window, 0) for r in ("ours", "dense")]
        for route, window in cases:
            out = subprocess.run([sys.executable, __file__, "--child", route, str(T), str(window)], env=env,
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=platform.machine(), cpu_threads=1, heads=H, kv_heads=HKV, head_dim=HD,
                python=platform.python_version())
    (RESULTS / "attention_cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    find = {(r["route"], r["tokens"], r["window"]): r for r in rows}
    lines = ["# Attention fwd+bwd on CPU (1 thread, 4 heads x 16 dims, GQA 4:2, packed documents of 256-4095 tokens)",
             "",
             "Peak RSS above the inputs, in a fresh process per case. Baselines in the same run: `dense` = SDPA with "
             "the dense document/window mask (the route before issue 17); `sdpa_is_causal` = SDPA's flash kernel "
             "with no documents and no window (the floor: the same shapes with nothing to mask).", "",
             "| tokens | window | route | peak extra MiB | CPU s | MiB vs dense | CPU s vs dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = find.get(("dense", r["tokens"], r["window"]))
        ratio = (f"{r['peak_extra_mib'] / d['peak_extra_mib']:.3f} | {r['cpu_s'] / d['cpu_s']:.2f}"
                 if d and r["route"] != "sdpa_is_causal" else "- | -")
        lines.append(f"| {r['tokens']} | {r['window'] or 'full'} | {r['route']} | {r['peak_extra_mib']:.0f} | "
                     f"{r['cpu_s']:.2f} | {ratio} |")
    if len(args.tokens) >= 2:
        lo, hi = min(args.tokens), max(args.tokens)
        lines += ["", f"Growth {lo} -> {hi} tokens (x{hi / lo:.0f}): peak extra memory"]
        for route, window in [("ours", args.window), ("ours", 0), ("dense", args.window), ("dense", 0),
                              ("sdpa_is_causal", 0)]:
            a, b = find.get((route, lo, window)), find.get((route, hi, window))
            if a and b:
                grow = b["peak_extra_mib"] / max(a["peak_extra_mib"], 1e-9)
                time_x = b["cpu_s"] / a["cpu_s"]
                lines.append(f"- {route}, window {window or 'full'}: x{grow:.2f}, CPU time x{time_x:.2f}")
    (RESULTS / "attention_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
