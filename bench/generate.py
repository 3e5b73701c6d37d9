"""Generation from exported models on CPU: per-token cost and memory vs prompt length.

For each model (pure recurrent, hybrid, and an attention-only baseline of the same width and
depth) and prompt length (1K, 16K tokens), a fresh process exports a random-weight model with
`llm_lru.export` and loads it back with transformers (the path users take), reads the prompt
into the cache in chunks of `prefill_chunk_size` (as generate() does), then decodes greedily
token by token from the cache. Reported per run:

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


def worker(pattern: str, T: int, new_tokens: int, d_model: int, chunk: int) -> dict:
    """One (model, prompt length) measurement, in this process."""
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
    ids = torch.randint(0, 256, (1, T))
    rss_before = round(_rss_mb(), 1)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        cache = out.past_key_values
        after_prompt = cache.nbytes()
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        model(tok, past_key_values=cache)  # one warm-up step
        steps = []
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            tok = model(tok, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t0)
        decode = sum(steps)
    grown = sum(cache.nbytes().values()) - sum(after_prompt.values())
    return {"pattern": pattern, "prompt_tokens": T, "new_tokens": new_tokens, "prefill_s": round(prefill, 3),
            "prefill_tok_s": round(T / prefill, 1), "decode_tok_s": round(new_tokens / decode, 2),
            "decode_ms_per_token": round(1000 * decode / new_tokens, 3),
            # The median step is what the ratio uses: other jobs on a shared machine add outliers.
            "decode_ms_per_token_median": round(1000 * statistics.median(steps), 3),
            "rss_before_prefill_mb": rss_before, 
            "cache_bytes": after_prompt, "cache_growth_per_token": grown // (new_tokens + 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "params": model.model.num_params()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,16384")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per forward)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        pattern, T = args.worker.split(":")
        print(json.dumps(worker(pattern, int(T), args.new_tokens, args.d_model, args.chunk)))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, pattern in MODELS.items():
        for T in lengths:
            # A fresh process per run: peak RSS is per process and never goes down.
            cmd = [sys.executable, __file__, "--worker", f"{pattern}:{T}", "--new-tokens", str(args.new_tokens),
                   "--d-model", str(args.d_model), "--chunk", str(args.chunk)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            rec = {"model": name, **json.loads(res.stdout.strip().splitlines()[-1])}
            runs.append(rec)
            cb = rec["cache_bytes"]
            print(f"{name:22s} T={T:6d}  prefill {rec['prefill_s']:7.2f} s  decode {rec['decode_tok_s']:7.2f} tok/s"
                  f"  cache rec {cb['recurrent'] / 1e6:7.3f} MB att {cb['attention'] / 1e6:8.3f} MB"
                  f"  +{rec['cache_growth_per_token']} B/token  peak RSS {rec['peak_rss_mb']:.0f} MB", flush=True)
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
