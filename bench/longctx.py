"""Long context on CPU: peak memory per rank and time per token of one training step, against T.

    .venv/bin/python bench/longctx.py [--sp1 4096,...,131072] [--spk 65536,131072,262144]
                                      [--sps 2,4] [--name longctx] [--quick]

One cell = a fresh world of sp gloo processes (sp = 1: one process), one thread each, running
one training step (forward, HybridLM.loss, backward, AdamW step) of a hybrid with BD-LRU, H-LRU,
sliding-window attention and full attention (pattern BSHA, d 64, 4 heads, 2 KV heads, window
512), packed documents (T/8 to 3T/8 tokens each) and a 32K vocabulary, then a timed second step.
- peak: VmHWM over the first step, above the RSS before the model existed (malloc_trim'd), per
  rank; the table gives the largest rank's. growth: peak(T) / peak(T / 2) down the sp = 1 rows;
  the target is peak(4T) <= 4.4 x peak(T) from 16K up.
- time per token: the timed step's wall clock per token of the rank; per layer kind from block
  hooks (forward and backward), so full attention's superlinear share shows separately; the
  per-rank attention times at sp > 1 show the causal imbalance of contiguous slices.
- plan: what `llm-lru plan` predicts for the same step (fp32, no ZeRO, torch AdamW) and its error
  against the measured peak; the planner's two measured constants are fitted here (--refit
  refits them on the rows of an earlier run without measuring again).
Writes bench/results/NAME.json, NAME.md and NAME.png (peak memory against T, one line per sp).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.sp import _peak, _reset_peak, _rss  # noqa: E402
from tests.distributed import run_world  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODEL = dict(vocab_size=32768, d_model=64, n_layers=4, pattern="BSHA", block_size=4, n_heads=4,
             n_kv_heads=2, window=512)
KIND_OF = {"B": "bdlru", "S": "swa", "H": "hlru", "A": "attn"}


def documents(T: int, seed: int = 0) -> torch.Tensor:
    """(1, T) document starts: long documents of T/8 to 3T/8 tokens (a long-context mix, so that
    full attention's work grows as T^2 and shows)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(1, T, dtype=torch.bool)
    t = 0
    while t < T:
        starts[0, t] = True
        t += int(torch.randint(T // 8, 3 * T // 8 + 1, (1,), generator=g))
    return starts


class KindTimer:
    """Seconds spent in forward and backward of the blocks of each mixer kind."""

    def __init__(self, model):
        self.s = {}
        for block in model.layers:
            t0 = {}

            def fpre(mod, args, t0=t0):
                t0["f"] = time.perf_counter()

            def fpost(mod, args, out, t0=t0):
                self.s[mod.kind] = self.s.get(mod.kind, 0.0) + time.perf_counter() - t0["f"]

            def bpre(mod, gout, t0=t0):
                t0["b"] = time.perf_counter()

            def bpost(mod, gin, gout, t0=t0):
                self.s[mod.kind] = self.s.get(mod.kind, 0.0) + time.perf_counter() - t0["b"]

            block.register_forward_pre_hook(fpre)
            block.register_forward_hook(fpost)
            block.register_full_backward_pre_hook(bpre)
            block.register_full_backward_hook(bpost)


def _cell(rank, world, T, model_kw, seed):
    from llm_lru.config import ModelConfig
    from llm_lru.models import HybridLM
    from llm_lru.parallel import build_mesh, parallelize

    torch.set_num_threads(1)
    base = _rss()
    _reset_peak()
    mesh = build_mesh(sp=world)
    torch.manual_seed(seed)
    model = HybridLM(ModelConfig(**model_kw))
    if world > 1:
        model = parallelize(model, mesh, final_state=False)   # the all-gather carry
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model_kw["vocab_size"], (1, T + 1), generator=g)
    docs = documents(T, seed)
    t_local = T // world
    sl = slice(mesh.sp_rank * t_local, (mesh.sp_rank + 1) * t_local)
    x, y, d = ids[:, :-1][:, sl], ids[:, 1:][:, sl], docs[:, sl]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x, y, d, pos_offset=mesh.pos_offset(t_local))
        loss.backward()
        opt.step()
        return float(loss.detach())

    loss = step()
    peak = _peak() - base
    timer = KindTimer(model)
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    return dict(rank=rank, loss=loss, peak=peak, step_s=wall, kinds=timer.s, tokens=t_local)


def measure(sp: int, T: int, seed: int = 0) -> dict:
    t0 = time.time()
    ranks = run_world(_cell, sp, T, MODEL, seed, timeout=3600)
    worst = max(ranks, key=lambda r: r["peak"])
    row = dict(sp=sp, tokens=T, tokens_per_rank=T // sp, peak_mib=worst["peak"] / 2**20,
               peak_mib_by_rank=[r["peak"] / 2**20 for r in ranks],
               step_s=max(r["step_s"] for r in ranks),
               us_per_token=1e6 * max(r["step_s"] for r in ranks) / (T // sp),
               us_per_token_by_kind={k: 1e6 * max(r["kinds"].get(k, 0.0) for r in ranks) / (T // sp)
                                     for k in sorted(ranks[0]["kinds"])},
               attn_s_by_rank=[r["kinds"].get("attn", 0.0) for r in ranks],
               wall_s=time.time() - t0)
    print(json.dumps(row), flush=True)
    return row


def planned(sp: int, T: int, probe: dict) -> float:
    """The planner's prediction for a cell (fp32, no ZeRO: parameters, gradients and AdamW)."""
    from llm_lru import plan as P
    from llm_lru.config import from_dict

    cfg = from_dict({"model": MODEL, "parallel": {"sp": sp}, "data": {"source": "random"},
                     "train": {"seq_len": T, "global_batch_size": 1, "precision": "fp32"},
                     "deepspeed": {"zero_stage": 0}})
    return P.plan(cfg, gpus=sp, gpu_mem=float("inf"), reserve=0, probe=probe).total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sp1", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--spk", default="65536,131072,262144", help="total tokens for sp > 1")
    ap.add_argument("--sps", default="2,4")
    ap.add_argument("--name", default="longctx")
    ap.add_argument("--quick", action="store_true", help="4K and 8K at sp = 1, 8K at sp = 2 (a smoke run)")
    ap.add_argument("--refit", action="store_true", help="reuse the measured rows of NAME.json; refit the planner only")
    args = ap.parse_args(argv)
    if args.quick:
        args.sp1, args.spk, args.sps = "4096,8192", "8192", "2"
    from llm_lru import plan as P
    from llm_lru.config import ModelConfig

    if args.refit:
        rows = json.loads((RESULTS / f"{args.name}.json").read_text())["rows"]
    else:
        rows = [measure(1, int(T)) for T in args.sp1.split(",")]
        rows += [measure(int(sp), int(T)) for sp in args.sps.split(",") for T in args.spk.split(",")]
    probe = {k: P.activation_probe(ModelConfig(**MODEL), k, torch.float32) for k in set(KIND_OF.values())}
    # The planner's two measured constants, least squares over every cell: WORKSPACE (the
    # backward's transient, in units of the largest layer's activations) and the CPU process's
    # own overhead above the pre-model RSS (the role GPU_RESERVE plays on a GPU).
    P.WORKSPACE = 0.0
    base = [planned(r["sp"], r["tokens"], probe) for r in rows]
    largest = [max(probe.values()) * r["tokens_per_rank"] for r in rows]
    A = np.array([[x, 1.0] for x in largest])
    workspace, overhead = np.linalg.lstsq(A, np.array([r["peak_mib"] * 2**20 - b for r, b in zip(rows, base)]),
                                          rcond=None)[0]
    P.WORKSPACE = float(workspace)
    for r in rows:
        r["plan_mib"] = (planned(r["sp"], r["tokens"], probe) + overhead) / 2**20
        r["plan_error"] = r["plan_mib"] / r["peak_mib"] - 1
    by = {(r["sp"], r["tokens"]): r for r in rows}
    for r in rows:
        q = by.get((r["sp"], r["tokens"] // 4))
        r["growth_x4"] = r["peak_mib"] / q["peak_mib"] if q else None
    meta = dict(model=MODEL, threads_per_rank=1, machine=platform.machine(), cpus=os.cpu_count(),
                torch=torch.__version__, workspace_fit=float(workspace), cpu_overhead_mib=float(overhead) / 2**20,
                probe_bytes_per_token=probe,
                date=time.strftime("%Y-%m-%d"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    write_md(RESULTS / f"{args.name}.md", meta, rows)
    plot(RESULTS / f"{args.name}.png", rows)
    return 0


def write_md(path: Path, meta: dict, rows) -> None:
    kinds = sorted({k for r in rows for k in r["us_per_token_by_kind"]})
    lines = [f"# Long-context training step on CPU ({meta['date']}, {meta['cpus']} cores, 1 thread per rank)", "",
             f"Model: {meta['model']}; one step = forward, chunked loss, backward, AdamW. "
             "Peak = VmHWM above the RSS before the model existed, largest rank. "
             f"Planner: `llm-lru plan` (fp32, no ZeRO) with its two constants fitted by least squares "
             f"over every cell: WORKSPACE = {meta['workspace_fit']:.2f} (the backward's transient, in "
             f"largest-layer activations) and {meta['cpu_overhead_mib']:.0f} MiB of process overhead "
             "per rank (GPU_RESERVE's role on a GPU). x4 tokens: peak(T) / peak(T/4), the target "
             "being <= 4.4 from 16K up.", "",
             "| sp | tokens | per rank | peak MiB | x4 tokens | plan MiB | plan error | us/token | "
             + " | ".join(f"{k} us/tok" for k in kinds) + " | attn s by rank |",
             "|---" * (9 + len(kinds)) + "|"]
    for r in rows:
        g4 = f"{r['growth_x4']:.2f}" if r.get("growth_x4") else ""
        lines.append(f"| {r['sp']} | {r['tokens']:,} | {r['tokens_per_rank']:,} | {r['peak_mib']:.0f} | {g4} | "
                     f"{r['plan_mib']:.0f} | {100 * r['plan_error']:+.1f}% | {r['us_per_token']:.1f} | "
                     + " | ".join(f"{r['us_per_token_by_kind'].get(k, 0):.1f}" for k in kinds)
                     + " | " + ", ".join(f"{s:.2f}" for s in r["attn_s_by_rank"]) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sp in sorted({r["sp"] for r in rows}):
        pts = [(r["tokens"], r["peak_mib"]) for r in rows if r["sp"] == sp]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"sp = {sp} (per rank)")
        ax.plot([p[0] for p in pts], [r["plan_mib"] for r in rows if r["sp"] == sp], "x:", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("tokens per sequence (total)")
    ax.set_ylabel("peak memory per rank (MiB)")
    ax.set_title("one training step on CPU (x: llm-lru plan)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
