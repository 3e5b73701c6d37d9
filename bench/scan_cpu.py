"""CPU scan benchmark: the chunked PyTorch path (each op's op.py in llm_lru.kernels) against the sequential
reference (each op's reference.py), forward and forward+backward, and the block path with m = 1
against the diagonal specialisation. Prints ratios, writes bench/results/scan_cpu.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scan_cpu.py [--quick] [--threads N]

Times are the best of a few repeats after a warm-up, on this machine's CPU only; GPU (Triton)
timings are bench/scan.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from llm_lru import kernels


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved_times(fns, repeats: int, pick=min):
    """pick (best by default) of the times of several functions run in turn after a warm-up, so
    that load on a shared machine hits all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [pick(ts) for ts in times]


def _fwd(scan, inputs):
    def run():
        with torch.no_grad():
            scan(*inputs)
    return run


def _fwd_bwd(scan, inputs):
    def run():
        leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
        h, last = scan(*leaves)
        (h.sum() + last.sum()).backward()
    return run


def _stable(*shape):
    """Random transitions with row sums of |A| below 1 (spectral radius < 1)."""
    A = torch.rand(*shape)
    return A / A.sum(-1, keepdim=True) * 0.98


def cases(quick: bool):
    B = 2 if quick else 4
    T = 256 if quick else 1024
    # a small model's layer (d_state 64), where the reference is bound by per-step overhead
    yield (f"block m=4 B=1 T={2 * T} N=16", kernels.block_scan_chunked, kernels.block_scan_ref,
           (_stable(1, 2 * T, 16, 4, 4), torch.randn(1, 2 * T, 16, 4), torch.randn(1, 16, 4)))
    for m in (2, 4, 8):
        N = 128 // m
        yield (f"block m={m} B={B} T={T} N={N}", kernels.block_scan_chunked, kernels.block_scan_ref,
               (_stable(B, T, N, m, m), torch.randn(B, T, N, m), torch.randn(B, N, m)))
    N = 256
    yield (f"diag B={B} T={T} N={N}", kernels.diag_scan_chunked, kernels.diag_scan_ref,
           (_stable(B, T, N, 1)[..., 0], torch.randn(B, T, N), torch.randn(B, N)))
    for m in (2, 4):
        N = 64
        reset = torch.rand(B, T) < 0.01
        comp = lambda a, x, h0, r: kernels.companion_scan_chunked(a, x, h0, False, r)  # noqa: E731
        ref = lambda a, x, h0, r: kernels.companion_scan_ref(a, x, h0, False, r)  # noqa: E731
        yield (f"companion m={m} B={B} T={T} N={N} (1% resets)", comp, ref,
               (_stable(B, T, N, m), torch.randn(B, T, N), torch.randn(B, N, m), reset))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scan_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, fast, ref, inputs in cases(args.quick):
        for mode, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
            t_fast = _best(wrap(fast, inputs), args.repeats)
            t_ref = _best(wrap(ref, inputs), 1 if mode == "fwd+bwd" else args.repeats)
            rows.append({"case": name, "mode": mode, "chunked_s": t_fast, "reference_s": t_ref,
                         "speedup_vs_reference": t_ref / t_fast})
            print(f"{name:45s} {mode:8s} chunked {t_fast * 1e3:9.2f} ms  reference {t_ref * 1e3:9.2f} ms"
                  f"  x{t_ref / t_fast:6.1f}")
    # The diagonal specialisation against the block path with m = 1 on the same recurrence.
    B, T, N = (2, 256, 256) if args.quick else (4, 1024, 256)
    a, u, h0 = _stable(B, T, N, 1)[..., 0], torch.randn(B, T, N), torch.randn(B, N)
    block1 = lambda a, u, h0: kernels.block_scan_chunked(a[..., None, None], u[..., None], h0[..., None])  # noqa: E731
    for mode, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
        t_diag, t_block = interleaved_times([wrap(kernels.diag_scan_chunked, (a, u, h0)), wrap(block1, (a, u, h0))],
                                            3 * args.repeats)
        rows.append({"case": f"diag vs block m=1 B={B} T={T} N={N}", "mode": mode, "diag_s": t_diag,
                     "block_m1_s": t_block, "speedup_vs_block_m1": t_block / t_diag})
        print(f"{'diag vs block m=1':45s} {mode:8s} diag {t_diag * 1e3:9.2f} ms  block m=1 {t_block * 1e3:9.2f} ms"
              f"  x{t_block / t_diag:6.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "quick": args.quick,
            # a shared machine: a high load average makes every time here noisy
            "loadavg_at_end": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
