"""Training throughput on CPU: `llm-lru train` under torchrun, tokens/s per configuration.

    python bench/train.py [--steps N] [--quick]

Models: the tiny demo hybrid (configs/tiny.yaml, ~1M params at a 2K vocabulary) and a ~20M
hybrid (d 512, 6 layers BBBA). For each: one process (the named baseline), then two processes
with sp = 1 (dp = 2) and sp = 2 (dp = 1), each at ZeRO stage 0, 2 and 3. Random tokens (data
source "random", vocab 2048), seq_len 256, 8 sequences per step, fp32, one thread per process.
Tokens/s is the median over the steps after the first two (start-up and first-step costs out),
read from each run's metrics.jsonl. Results: bench/results/train.json and train.md.

Unmeasured here (no GPU on this machine): GPU tokens/s and MFU of the ~125M hybrid
(configs/hybrid-125m.yaml); the trainer logs `mfu` per step on a GPU when run there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

MODELS = {
    "tiny": [],  # configs/tiny.yaml as is
    "20m": ["model.d_model=512", "model.n_layers=6", "model.n_heads=8"],
}
COMMON = ["model.vocab_size=2048", "data.source=random", "data.path=''", "train.seq_len=256",
          "train.global_batch_size=8", "train.val_every=0", "checkpoint.every=0", "logging.tensorboard=false",
          "logging.progress=lines", "train.warmup_steps=2"]


def run_one(model: str, nproc: int, sp: int, stage: int, steps: int, tmp: Path) -> dict:
    """One torchrun job; returns tokens/s (median of steps 3..N) and the step times."""
    out = tmp / f"{model}-n{nproc}-sp{sp}-z{stage}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "llm_lru.cli", "train", str(REPO / "configs" / "tiny.yaml"), *COMMON, *MODELS[model],
           f"out_dir={out}", f"parallel.sp={sp}", f"deepspeed.zero_stage={stage}", f"train.max_steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    rates = [r["tokens_per_s"] for r in rows[2:]] or [r["tokens_per_s"] for r in rows]
    return {"model": model, "nproc": nproc, "sp": sp, "dp": nproc // sp, "zero_stage": stage,
            "tokens_per_s": statistics.median(rates), "step_time_s": statistics.median(r["step_time"] for r in rows[2:] or rows),
            "final_loss": rows[-1]["loss"], "wall_s": time.time() - t0}


def n_params(model: str) -> int:
    import torch

    from llm_lru.config import load_config
    from llm_lru.models import HybridLM

    cfg = load_config(REPO / "configs" / "tiny.yaml", COMMON + MODELS[model])
    with torch.device("meta"):
        return sum(p.numel() for p in HybridLM(cfg.model).parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in (["tiny"] if args.quick else list(MODELS)):
            base = run_one(model, 1, 1, 0, args.steps, Path(tmp))
            base["ratio_vs_1proc"] = 1.0
            rows.append(base)
            print(f"{model}: 1 process, ZeRO-0: {base['tokens_per_s']:.0f} tok/s (baseline)", flush=True)
            for sp in (1, 2):
                for stage in (0, 2, 3):
                    r = run_one(model, 2, sp, stage, args.steps, Path(tmp))
                    r["ratio_vs_1proc"] = r["tokens_per_s"] / base["tokens_per_s"]
                    rows.append(r)
                    print(f"{model}: 2 processes, sp={sp} (dp={r['dp']}), ZeRO-{stage}: {r['tokens_per_s']:.0f} tok/s, "
                          f"{r['ratio_vs_1proc']:.2f}x the 1-process baseline", flush=True)
    result = {
        "bench": "train", "what": "tokens/s of llm-lru train on CPU (torchrun, gloo, fp32, 1 thread/process)",
        "baseline": "the same model on 1 process, ZeRO-0",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "params": {m: n_params(m) for m in (["tiny"] if args.quick else MODELS)},
        "settings": {"seq_len": 256, "global_batch_size": 8, "vocab": 2048, "steps": args.steps},
        "rows": rows,
        "unmeasured": "GPU tokens/s and MFU of the ~125M hybrid (configs/hybrid-125m.yaml): no GPU here",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(result, indent=1))
    lines = ["| model | procs | sp | dp | ZeRO | tokens/s | x 1-proc |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['nproc']} | {r['sp']} | {r['dp']} | {r['zero_stage']} | {r['tokens_per_s']:.0f} | "
              f"{r['ratio_vs_1proc']:.2f} |" for r in rows]
    lines += ["", f"Params: {result['params']}. Load average at the end: {result['machine']['loadavg']}.",
              "Unmeasured: " + result["unmeasured"] + "."]
    (RESULTS / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
