"""Generation from exported models on CPU: per-token cost and memory vs prompt length.

For each model (pure recurrent, hybrid, and an attention-only baseline of the same width and
depth) a fresh process exports a random-weight model with `llm_lru.export` and loads it back
with transformers (the path users take); for each prompt length (1K, 16K tokens) it reads the
prompt into a cache in chunks of `prefill_chunk_size` (as generate() does), then decodes
greedily token by token from the caches, one step of each length in turn. Reported per run:

  prefill_s, decode_tok_s   wall time of the chunked prefill; new tokens per second afterwards
  cache_bytes               bytes held by the cache after the prompt (recurrent / attention)
  cache_growth_per_token    bytes the cache grows by per decoded token
  peak_rss_mb               the process's peak resident memory (prefill included), and its
                            resident memory before the prefill (torch + transformers + model)

Ratios printed: 16K / 1K per-token decode time and cache bytes, per model. The baseline named
in the ratio is each model's own 1K run; the attention-only model shows what grows when every
layer keeps K/V. One torch thread (a shared 2-core machine). GPU numbers are not measured here.

    python bench/generate.py [--lengths 1024,16384] [--new-tokens 64] [--d-model 128]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"recurrent": "BBBB", "hybrid": "BBBA", "attention (baseline)": "AAAA"}
RESULTS = Path(__file__).parent / "results"


def _rss_mb() -> float:
    """Current resident memory of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def worker(pattern: str, lengths: list, new_tokens: int, d_model: int, chunk: int) -> list:
    """One model, every prompt length, in this process.

    Prompts are read shortest first, so the peak RSS after each prefill is that prefill's (the
    shorter prompts' caches stay alive: a few MB at most). Decoding then alternates one step of
    each length, so that other jobs on the machine slow every length alike.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from llm_lru.config import ModelConfig
    from llm_lru.export.exporter import write_folder
    from llm_lru.models import HybridLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, d_model=d_model, n_layers=len(pattern), pattern=pattern, n_heads=4,
                      block_size=4)
    with tempfile.TemporaryDirectory() as d:
        write_folder(Path(d), cfg, HybridLM(cfg).state_dict())
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    model.config.prefill_chunk_size = chunk
    recs, caches, toks = [], [], []
    with torch.no_grad():
        for T in sorted(lengths):
            ids = torch.randint(0, 256, (1, T))
            rss_before = _rss_mb()
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            recs.append({"pattern": pattern, "prompt_tokens": T, "new_tokens": new_tokens,
                         "prefill_s": round(prefill, 3), "prefill_tok_s": round(T / prefill, 1),
                         "cache_bytes": out.cache.nbytes(), "rss_before_prefill_mb": round(rss_before, 1),
                         "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                         "params": model.model.num_params()})
            caches.append(out.cache)
            toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
        for i, cache in enumerate(caches):  # one warm-up step each
            toks[i] = model(toks[i], cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        steps = [[] for _ in caches]
        for _ in range(new_tokens):
            for i, cache in enumerate(caches):
                t0 = time.perf_counter()
                toks[i] = model(toks[i], cache=cache).logits[:, -1].argmax(-1, keepdim=True)
                steps[i].append(time.perf_counter() - t0)
    for rec, cache, st in zip(recs, caches, steps):
        grown = sum(cache.nbytes().values()) - sum(rec["cache_bytes"].values())
        rec.update({"decode_tok_s": round(len(st) / sum(st), 2), "decode_ms_per_token": round(1000 * sum(st) / len(st), 3),
                    # The median step is what the ratio uses: other jobs on a shared machine add outliers.
                    "decode_ms_per_token_median": round(1000 * statistics.median(st), 3),
                    "cache_growth_per_token": grown // (new_tokens + 1)})
    return recs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,16384")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per forward)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, lengths, args.new_tokens, args.d_model, args.chunk)))
        return 0
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, pattern in MODELS.items():
        # A fresh process per model: peak RSS is per process and never goes down.
        cmd = [sys.executable, __file__, "--worker", pattern, "--lengths", args.lengths, "--new-tokens",
               str(args.new_tokens), "--d-model", str(args.d_model), "--chunk", str(args.chunk)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        for rec in json.loads(res.stdout.strip().splitlines()[-1]):
            rec = {"model": name, **rec}
            runs.append(rec)
            cb = rec["cache_bytes"]
            print(f"{name:22s} T={rec['prompt_tokens']:6d}  prefill {rec['prefill_s']:7.2f} s  decode "
                  f"{rec['decode_ms_per_token_median']:7.2f} ms/token (median)  cache rec {cb['recurrent'] / 1e6:6.3f} MB "
                  f"att {cb['attention'] / 1e6:7.3f} MB  +{rec['cache_growth_per_token']} B/token  "
                  f"peak RSS {rec['peak_rss_mb']:.0f} MB", flush=True)
    lo, hi = min(lengths), max(lengths)
    ratios = {}
    for name in MODELS:
        a = next(r for r in runs if r["model"] == name and r["prompt_tokens"] == lo)
        b = next(r for r in runs if r["model"] == name and r["prompt_tokens"] == hi)
        ratios[name] = {"decode_time_per_token": round(b["decode_ms_per_token_median"] / a["decode_ms_per_token_median"], 3),
                        "cache_bytes": round(sum(b["cache_bytes"].values()) / sum(a["cache_bytes"].values()), 3),
                        "peak_rss": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)}
        print(f"{name:22s} {hi}/{lo} prompt: decode time/token x{ratios[name]['decode_time_per_token']:.2f}, "
              f"cache bytes x{ratios[name]['cache_bytes']:.2f}, peak RSS x{ratios[name]['peak_rss']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"bench": "generate", "device": "cpu", "threads": 1, "machine": platform.platform(),
           "d_model": args.d_model, "prefill_chunk": args.chunk, "models": MODELS,
           "baseline": f"each model's own {lo}-token prompt run", "runs": runs, f"ratio_{hi}_over_{lo}": ratios,
           "not_measured": "GPU (no GPU on this machine); Triton kernels are not bundled in exports"}
    (RESULTS / "generate.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'generate.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
