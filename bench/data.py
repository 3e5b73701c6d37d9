"""Data benchmark: prep throughput and loader throughput on the python-stdlib corpus.

    python bench/data.py [--quick]       # writes bench/results/data.json

Baselines measured in the same run:
- prep: reading the corpus files raw (no tokenizing, packing or writing) and prep with 1 worker;
- loader: the tiny model's training step (HybridLM, model defaults, B=8, T=256, AdamW, fp32, CPU)
  in tokens/s; the loader must outrun it.
CPU only (this machine has 2 cores, shared); GPU-side numbers are not measured here.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llm_lru.data_prep import corpus  # noqa: E402
from llm_lru.data_prep.prep import PrepConfig, run_prep  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "data.json"


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children: on a shared machine, throughput per
    CPU-second says more about the code than wall time does."""
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def raw_read(max_bytes: int) -> dict:
    files = corpus.stdlib_files()
    t, n = time.perf_counter(), 0
    for f in files:
        n += len(Path(f).read_bytes())
        if max_bytes and n >= max_bytes:
            break
    dt = time.perf_counter() - t
    return {"bytes": n, "seconds": dt, "MB_per_s": n / dt / 1e6}


def prep_run(tmp: Path, name: str, workers: int, **cfg) -> dict:
    out = tmp / name
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), cpu_seconds()
    m = run_prep(PrepConfig(corpus="python-stdlib", **cfg), out, workers=workers, progress=False)
    dt, cpu = time.perf_counter() - t, cpu_seconds() - c
    st = m["stats"]
    tokens = sum(s["tokens"] for s in m["splits"].values()) + st["dropped_tokens"]
    return {"workers": workers, "tokenizer": cfg.get("tokenizer", "bytes"), "seq_len": cfg["seq_len"],
            "bytes": st["bytes"], "tokens": tokens, "seconds": dt, "MB_per_s": st["bytes"] / dt / 1e6,
            "tokens_per_s": tokens / dt, "cpu_seconds": cpu, "MB_per_cpu_s": st["bytes"] / cpu / 1e6,
            "shards": len(m["splits"]["train"]["shards"])}


def loader_run(path: Path, workers: int, seconds: float, seq_len: int = 256, batch: int = 8) -> dict:
    from llm_lru.config import from_dict
    from llm_lru.data_prep import build_loader

    cfg = from_dict({"data": {"source": "shards", "path": str(path), "num_workers": workers},
                     "train": {"seq_len": seq_len, "global_batch_size": batch}})
    ld = build_loader(cfg)
    it = iter(ld)
    next(it)                                   # worker start-up and first window, not throughput
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        b = next(it)
        n += b["input_ids"].numel()
    dt = time.perf_counter() - t
    it.close()
    return {"workers": workers, "tokens": n, "seconds": dt, "tokens_per_s": n / dt}


def model_step_run(seconds: float, seq_len: int = 256, batch: int = 8) -> dict:
    import torch

    from llm_lru.config import ModelConfig
    from llm_lru.models.hybrid import HybridLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=258))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 258, (batch, seq_len + 1))

    def step():
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 258), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds or n == 0:
        step()
        n += 1
    dt = time.perf_counter() - t
    return {"model": "HybridLM(ModelConfig defaults: d_model 128, 4 layers BBBA, vocab 258)", "batch": batch,
            "seq_len": seq_len, "steps": n, "seconds": dt, "tokens_per_s": n * batch * seq_len / dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 MB of corpus, short timings")
    args = ap.parse_args(argv)
    cap = 4 << 20 if args.quick else 0
    secs = 2.0 if args.quick else 6.0
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), no GPU",
           "load_average_at_start": os.getloadavg()[0], "max_bytes": cap}
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    import webdataset  # noqa: F401  (imports torch: seconds that belong to no throughput)
    try:
        res["raw_read"] = raw_read(cap)
        print(f"raw read: {res['raw_read']['MB_per_s']:.1f} MB/s", flush=True)
        rows = []
        for w in (1, 2):
            rows.append(prep_run(tmp, f"bytes{w}", w, tokenizer="bytes", seq_len=2048, shard_size=1000, max_bytes=cap))
            print(f"prep bytes seq 2048, {w} worker(s): {rows[-1]['MB_per_s']:.2f} MB/s, "
                  f"{rows[-1]['tokens_per_s'] / 1e6:.2f} Mtok/s, {rows[-1]['MB_per_cpu_s']:.2f} MB/cpu-s", flush=True)
        # bpe:4096 trained once on 8 MB (timed apart), then prep with that tokenizer file.
        bcap = cap or 8 << 20
        t = time.perf_counter()
        first = prep_run(tmp, "bpe_train", 1, tokenizer="bpe:4096", seq_len=2048, max_bytes=bcap,
                         bpe_train_bytes=bcap)
        res["bpe_train_and_prep_seconds"] = time.perf_counter() - t
        tok_file = str(tmp / "bpe_train" / "tokenizer.json")
        for w in (1, 2):
            rows.append(prep_run(tmp, f"bpe{w}", w, tokenizer=tok_file, seq_len=2048, shard_size=1000, max_bytes=bcap))
            rows[-1]["tokenizer"] = "bpe:4096 (trained)"
            print(f"prep bpe:4096 seq 2048, {w} worker(s): {rows[-1]['MB_per_s']:.2f} MB/s, "
                  f"{rows[-1]['tokens_per_s'] / 1e6:.2f} Mtok/s, {rows[-1]['MB_per_cpu_s']:.2f} MB/cpu-s", flush=True)
        res["prep"] = rows
        for kind in ("bytes", "bpe:4096 (trained)"):
            r = [x for x in rows if x["tokenizer"] == kind]
            res[f"prep_speedup_2_workers_{kind.split()[0]}"] = r[1]["tokens_per_s"] / r[0]["tokens_per_s"]
        res["prep_bytes_1_worker_vs_raw_read"] = rows[0]["MB_per_s"] / res["raw_read"]["MB_per_s"]
        print(f"ratios: prep/raw read {res['prep_bytes_1_worker_vs_raw_read']:.3f}; "
              f"2 workers / 1: bytes {res['prep_speedup_2_workers_bytes']:.2f}, "
              f"bpe {res['prep_speedup_2_workers_bpe:4096']:.2f}", flush=True)

        loader_prep = prep_run(tmp, "loader", 2, tokenizer="bytes", seq_len=256, shard_size=1000, max_bytes=cap)
        res["loader_prep"] = loader_prep
        res["model_step"] = model_step_run(secs)
        print(f"tiny model train step: {res['model_step']['tokens_per_s']:.0f} tok/s", flush=True)
        res["loader"] = [loader_run(tmp / "loader", w, secs) for w in (0, 1, 2)]
        for r in res["loader"]:
            r["ratio_vs_model_step"] = r["tokens_per_s"] / res["model_step"]["tokens_per_s"]
            print(f"loader, {r['workers']} workers: {r['tokens_per_s'] / 1e6:.2f} Mtok/s = "
                  f"{r['ratio_vs_model_step']:.1f}x the tiny model's step", flush=True)
        res["unmeasured"] = ("GPU-side: no CUDA here, so the model-step baseline on a GPU (where a tiny "
                             "model steps far faster) and pinned-memory host-to-device copies are not measured")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
