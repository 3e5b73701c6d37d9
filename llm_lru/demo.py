"""`llm-lru demo`: the whole pipeline on a CPU in minutes.

1. prep: the python-stdlib corpus (capped, default 4 MB) -> a 2K byte-level BPE -> packed shards
2. train: configs/tiny.yaml (BD-LRU + attention hybrid) for 300 steps on two CPU processes under
   torchrun, with sequence parallelism sp = 2 and ZeRO-2; metrics, TensorBoard, checkpoints
3. report: first vs last losses (the demo fails if the loss did not clearly fall)
4. export: the newest checkpoint -> an HF-format folder (OUT/export), then generate from it

Everything goes under --out (default runs/demo), which is the run dir (config.yaml,
metrics.jsonl, tb/, checkpoints/) and holds the prepared shards in data/. The data is reused
when present; the training artefacts are started afresh.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]


def prep(out: Path, max_bytes: str, vocab: int, seq_len: int) -> Path:
    """Tokenize and shard the capped python-stdlib corpus into out/data (reused if complete)."""
    data = out / "data"
    if (data / "manifest.json").is_file():
        print(f"[demo] reusing prepared data in {data}")
        return data
    if data.exists():
        shutil.rmtree(data)  # an interrupted prep: redo it whole, the corpus is small
    from llm_lru.data_prep.cli import main as prep_main

    print(f"[demo] prep: python-stdlib (first {max_bytes}) -> bpe:{vocab} -> {data}", flush=True)
    rc = prep_main(["--corpus", "python-stdlib", "--tokenizer", f"bpe:{vocab}", "--seq-len", str(seq_len),
                    "--out", str(data), "--max-bytes", max_bytes, "--val-fraction", "0.02",
                    "--workers", "2", "--quiet"])
    if rc:
        raise SystemExit(f"[demo] prep failed (exit {rc})")
    return data


def train(out: Path, data: Path, steps: int, nproc: int, sp: int, stage: int, extra: List[str]) -> Path:
    """Run `llm-lru train configs/tiny.yaml` under torchrun on `nproc` CPU processes."""
    run = out
    for name in ("checkpoints", "tb", "metrics.jsonl", "config.yaml"):  # a fresh run, same data
        p = run / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    config = REPO / "configs" / "tiny.yaml"
    if not config.is_file():
        raise SystemExit(f"[demo] {config} not found: run the demo from a source checkout")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "llm_lru.cli", "train", str(config), f"out_dir={run}", f"data.path={data}",
           f"parallel.sp={sp}", f"deepspeed.zero_stage={stage}", f"train.max_steps={steps}",
           "checkpoint.resume=none", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    print(f"[demo] train: {nproc} processes, sp={sp}, ZeRO-{stage}, {steps} steps -> {run}", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc:
        raise SystemExit(f"[demo] training failed (exit {rc})")
    return run


def report(run: Path) -> bool:
    """Print the loss curve's ends and the checkpoint; True if the loss clearly fell."""
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    k = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    print(f"[demo] loss {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps)"
          + (f"; val loss {vals[0]:.3f} -> {vals[-1]:.3f}" if vals else ""))
    print(f"[demo] checkpoint: {run / 'checkpoints' / latest}; TensorBoard: {run / 'tb'}")
    return last < first - 1.0


def export_and_generate(run: Path, prompt: str, new_tokens: int) -> Path:
    """Export the run's newest checkpoint to run/export and stream a few lines from it."""
    from llm_lru.export.cli import main as export_main
    from llm_lru.export.generate import main as generate_main

    folder = run / "export"
    print(f"[demo] export: {run} -> {folder}", flush=True)
    if export_main([str(run), "--out", str(folder), "--overwrite"]):  # the demo owns its run dir
        raise SystemExit("[demo] export failed")
    print(f"[demo] generate: {prompt!r}", flush=True)
    # Seeded sampling: a model this small repeats itself under greedy decoding.
    if generate_main([str(folder), "--prompt", prompt, "--max-new-tokens", str(new_tokens),
                      "--temperature", "0.8", "--top-k", "40", "--seed", "0"]):
        raise SystemExit("[demo] generation failed")
    return folder


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `llm-lru demo`."""
    ap = argparse.ArgumentParser(prog="llm-lru demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="the run dir; prepared data goes to OUT/data")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-bytes", default="4M", help="cap on the corpus bytes fed to prep")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--prompt", default="import os\n", help="prompt for the generation step")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for training")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    data = prep(out, args.max_bytes, args.vocab, seq_len=256)
    run = train(out, data, args.steps, args.nproc, args.sp, args.zero_stage, args.overrides)
    ok = report(run)
    export_and_generate(run, args.prompt, args.new_tokens)
    print(f"[demo] done in {time.time() - t0:.0f} s" + ("" if ok else " -- but the loss did not fall clearly"))
    return 0 if ok else 1
