"""CPU gate normalisation: llm_lru's softmax over short rows against torch.softmax (the baseline),
forward and forward+backward, at the gate shapes of BD-LRU (rows of m + 1 per block row) and
H-LRU (m + 1 per channel), one thread. Writes bench/results/gates_cpu.json and .md.

    .venv/bin/python bench/gates_cpu.py [--tokens 8192] [--d-model 64] [--repeats 7]

torch's CPU softmax vectorises along the row, so rows of fewer than 8 entries leave most of each
vector idle; llm_lru.kernels.normalize_rows takes such rows through elementwise ops instead. Times are
medians of --repeats after a warm-up, the two paths interleaved so that load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llm_lru.kernels import normalize_rows  # noqa: E402
from scan_cpu import interleaved_times  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = ROOT / "bench" / "results"


def _case(shape, repeats: int) -> dict:
    g = torch.randn(shape, requires_grad=True)
    go = torch.randn(shape)

    def fwd(f):
        return lambda: f(g.detach())

    def fwd_bwd(f):
        def run():
            g.grad = None
            f(g).backward(go)
        return run

    ours = lambda x: normalize_rows(x, "softmax")  # noqa: E731
    base = lambda x: torch.softmax(x, -1)  # noqa: E731
    f_base, f_ours, fb_base, fb_ours = interleaved_times([fwd(base), fwd(ours), fwd_bwd(base), fwd_bwd(ours)],
                                                        repeats, statistics.median)
    return dict(shape=list(shape), fwd_torch_s=f_base, fwd_ours_s=f_ours, fwd_speedup=f_base / f_ours,
                fwd_bwd_torch_s=fb_base, fwd_bwd_ours_s=fb_ours, fwd_bwd_speedup=fb_base / fb_ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T, D = args.tokens, args.d_model
    rows = []
    for m in (1, 2, 4, 6, 8):
        rows.append(dict(layer="bdlru", m=m, **_case((1, T, D // m, m, m + 1), args.repeats)))
        rows.append(dict(layer="hlru", m=m, **_case((1, T, D, m + 1), args.repeats)))
        print(rows[-2], rows[-1], flush=True)
    meta = dict(tokens=T, d_model=D, threads=1, repeats=args.repeats, machine=platform.processor() or platform.machine(),
                torch=torch.__version__, baseline="torch.softmax(x, -1)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gates_cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Gate softmax on CPU ({T} tokens, d_model {D}, 1 thread, median of {args.repeats})", "",
             "Baseline: torch.softmax over the last axis, in the same run. Ours: llm_lru.kernels.normalize_rows"
             " (elementwise path for rows shorter than 8; torch.softmax from 8 on).", "",
             "| layer | m | row | fwd torch ms | fwd ours ms | x | fwd+bwd torch ms | fwd+bwd ours ms | x |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['m']} | {r['m'] + 1} | {r['fwd_torch_s'] * 1e3:.1f} | {r['fwd_ours_s'] * 1e3:.1f}"
                     f" | {r['fwd_speedup']:.2f} | {r['fwd_bwd_torch_s'] * 1e3:.1f} | {r['fwd_bwd_ours_s'] * 1e3:.1f}"
                     f" | {r['fwd_bwd_speedup']:.2f} |")
    (RESULTS / "gates_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
