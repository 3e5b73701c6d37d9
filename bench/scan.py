"""Scan benchmark: the Triton kernels (each op's triton.py in llm_lru.kernels) against the memory floor and named
baselines, forward and forward+backward. Writes bench/results/scan.json and scan.md.

    .venv/bin/python bench/scan.py [--quick] [--dtype bf16|fp32] [--out JSON] [--resume] [--smoke]

On CUDA, for m in {1, 2, 4, 8}, T in {2K, 8K, 32K}, B x N in {1K, 8K}: median time (CUDA events,
after warm-up) of
  m = 1  diag_scan_triton      vs fla fused_recurrent_hgrn (log-gates, bf16 output)
  m > 1  bdlru_scan_triton (fused gates), hlru_scan_triton, block_scan_triton (A given)
         vs a PyTorch associative (log-depth doubling) scan
  all    the PyTorch chunked path (our CPU path, each op's op.py) on the same device
with the bytes of the byte model (each input read once, each output written once), achieved
GB/s and the fraction of the measured device-to-device copy bandwidth (2 x bytes / copy time).
Targets (issue 6): forward >= 0.85 of copy bandwidth for m <= 4, forward+backward >= 0.65.

scan.json (and scan.md) are rewritten after every row, so a run killed at its time budget keeps the
rows it measured; --resume keeps the measured rows of an existing --out and measures the rest.
--quick runs every Triton row at one chunk length (QUICK_CHUNK): the automatic choice differs with
B x N (256 at 1K rows, 410 at 8K on an H100) and each length is a Triton specialisation of its own,
so the quick rows would compile every kernel twice.

Without CUDA, every GPU row is written with status "unmeasured" (its byte model only, nothing
estimated), and the CPU rows time the PyTorch chunked path and the associative baseline at small
sizes against the measured CPU copy bandwidth. The Triton kernels on CPU run only under the
interpreter, whose timings say nothing about a GPU: they are not reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from llm_lru import kernels
from llm_lru.kernels import normalize_rows

HERE = Path(__file__).resolve().parent
MS = [1, 2, 4, 8]
TS = [2048, 8192, 32768]
BNS = [1024, 8192]
DT = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUICK_CHUNK = 256  # steps per chunk for every --quick Triton row: 8 chunks of T = 2K, one compile
# --smoke: every kind and implementation at m = 1 (diag, bdlru) and 2 (bdlru, hlru, block), T = 12
# in 3 chunks (so the carry and fold passes run too), one call per row: the interpreter is slow
SMOKE_MS, SMOKE_T, SMOKE_CHUNK = [1, 2], 12, 4


# ---- timing -------------------------------------------------------------------------------------

def median_time(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of fn() after warm-up: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy: read + write of nbytes, median of several."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device, 3, 10)
    return 2 * nbytes / t


# ---- byte model ---------------------------------------------------------------------------------

def byte_model(kind: str, m: int, rows: int, T: int, in_bytes: int, out_bytes: int = 4) -> Dict[str, int]:
    """Bytes a pass must move at least: every input read once, every output written once.

    Per step and row: diag reads a, u; block reads A (m^2), u (m); bdlru reads logits m(m+1), v (m);
    hlru reads logits (m+1), v (1); all write the state/output (m, or 1 for hlru) in fp32.
    The backward reads the inputs, the saved output and its gradient, and writes input gradients.
    """
    n_in = {"diag": 2, "block": m * m + m, "bdlru": m * (m + 1) + m, "hlru": m + 2}[kind]
    n_out = {"diag": 1, "block": m, "bdlru": m, "hlru": 1}[kind]
    fwd = rows * T * (n_in * in_bytes + n_out * out_bytes)
    bwd = rows * T * (n_in * in_bytes + 2 * n_out * out_bytes + n_in * in_bytes)
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}


# ---- inputs and runners -------------------------------------------------------------------------

def make_inputs(kind: str, m: int, B: int, T: int, N: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    if kind == "diag":
        return [torch.rand(B, T, N, generator=g).mul(0.2).add(0.79).to(device, dtype), r(B, T, N)]
    if kind == "block":
        A = torch.rand(B, T, N, m, m, generator=g)
        return [(A / A.sum(-1, keepdim=True) * 0.98).to(device, dtype), r(B, T, N, m)]
    if kind == "bdlru":
        return [r(B, T, N, m, m + 1), r(B, T, N, m)]
    return [r(B, T, N, m + 1), r(B, T, N)]  # hlru


def torch_assoc_block_scan(A: torch.Tensor, u: torch.Tensor):
    """Baseline: log-depth (Hillis-Steele) associative scan in PyTorch, (A_t, u_t) pairs composed
    by doubling. A: (B, T, N, m, m), u: (B, T, N, m) -> h (B, T, N, m) fp32."""
    A, u = A.float(), u.float()
    T = A.shape[1]
    d = 1
    while d < T:
        A_prev, u_prev = A[:, :-d], u[:, :-d]
        u = torch.cat([u[:, :d], torch.einsum("btnij,btnj->btni", A[:, d:], u_prev) + u[:, d:]], 1)
        A = torch.cat([A[:, :d], A[:, d:] @ A_prev], 1)
        d *= 2
    return u, u[:, -1]


def runners(kind: str, device: torch.device, smoke: bool = False, chunk: Optional[int] = None) -> Dict[str, Callable]:
    """name -> scan(*inputs) -> (out, last) for this kind, on this device (smoke: the Triton
    kernels under the interpreter on CPU, to exercise the GPU code path; chunk: the Triton
    kernels' chunk length, None for their automatic choice)."""
    out: Dict[str, Callable] = {}
    if device.type == "cuda" or smoke:
        from llm_lru.kernels.block.triton import bdlru_scan_triton, block_scan_triton
        from llm_lru.kernels.companion.triton import hlru_scan_triton
        from llm_lru.kernels.diag.triton import diag_scan_triton
        fn = {"diag": diag_scan_triton, "block": block_scan_triton,
              "bdlru": bdlru_scan_triton, "hlru": hlru_scan_triton}[kind]
        out["triton"] = fn if chunk is None else (lambda *x, fn=fn: fn(*x, chunk=chunk))
        if kind == "diag" and not smoke:  # fla's kernels need interpreter patches on CPU
            from fla.ops.hgrn import fused_recurrent_hgrn  # ~12 s import: only here
            # fla takes log-gates: the log is taken once, outside the timed call
            out["fla_hgrn"] = lambda x, g: fused_recurrent_hgrn(x, g, output_final_state=True)
    if kind in ("block", "bdlru"):
        def split(G, v):
            P = normalize_rows(G)
            return P[..., :-1], P[..., -1] * v.float()
        pre = (lambda A, u: (A, u)) if kind == "block" else split
        out["torch_assoc"] = lambda G, v: torch_assoc_block_scan(*pre(G, v))
        out["torch_chunked"] = lambda G, v: kernels.block_scan_chunked(*pre(G, v))
    elif kind == "hlru":
        def hl(G, v):
            P = normalize_rows(G)
            return kernels.companion_scan_chunked(P[..., :-1], P[..., -1] * v.float())
        out["torch_chunked"] = hl
    else:
        out["torch_chunked"] = kernels.diag_scan_chunked
    return out


def own_inputs(name: str, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """The inputs in the form an implementation takes (fla: x and log-gates)."""
    if name == "fla_hgrn":
        a, u = inputs
        return [u, a.float().log().to(a.dtype)]
    return inputs


def step(scan: Callable, inputs: List[torch.Tensor], mode: str) -> Callable[[], None]:
    if mode == "fwd":
        def run():
            with torch.no_grad():
                scan(*inputs)
        return run
    leaves = [x.detach().requires_grad_() for x in inputs]

    def run_bwd():
        for x in leaves:
            x.grad = None
        h, last = scan(*leaves)
        torch.autograd.backward([h, last], [torch.ones_like(h), torch.ones_like(last)])
    return run_bwd


def memory_needed(kind: str, name: str, m: int, rows: int, T: int, in_bytes: int, mode: str) -> int:
    """Rough peak bytes, to skip shapes that cannot fit (never used as a result)."""
    io = byte_model(kind, m, rows, T, in_bytes)["fwd+bwd"]
    if name == "torch_assoc":
        level = rows * T * (m * m + m) * 4
        return level * (2 * math.ceil(math.log2(T)) + 4 if mode != "fwd" else 6)
    if name == "torch_chunked":
        return rows * T * (m * (m + 1) + 2 * m) * 4 * (8 if mode != "fwd" else 3)
    return 2 * io


# ---- main ---------------------------------------------------------------------------------------

def kinds_for(m: int) -> List[str]:
    return ["diag", "bdlru"] if m == 1 else ["bdlru", "hlru", "block"]


def row_key(r: dict) -> tuple:
    return (r["kind"], r["impl"], r["mode"], r["m"], r["T"], r["BN"])


def gpu_rows(dtype, quick: bool, smoke: bool = False, sink: Optional[Callable[[dict], None]] = None,
             done: frozenset = frozenset()) -> List[dict]:
    """Every GPU row, measured; each handed to sink as it is made, and rows whose key is in done
    (a resumed run's measured rows) left out. smoke (no CUDA): the same code path on CPU with the
    Triton interpreter at tiny sizes, rows labelled as a smoke run, no bandwidth reported."""
    device = torch.device("cpu" if smoke else "cuda")
    chunk = SMOKE_CHUNK if smoke else QUICK_CHUNK if quick else None
    rows: List[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if sink is not None:
            sink(row)

    copy_bw = copy_bandwidth(device, 1 << (24 if smoke else 30))
    print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.1f} GB/s")
    free = (8 << 30) if smoke else torch.cuda.mem_get_info(device)[0]
    dev_name = "cpu (Triton interpreter smoke run)" if smoke else torch.cuda.get_device_name(device)
    in_bytes = torch.finfo(dtype).bits // 8
    for m in (SMOKE_MS if smoke else MS):
        for T in ([SMOKE_T] if smoke else TS[:1] if quick else TS):
            for BN in ([8] if smoke else BNS):
                N = min(BN, 4 if smoke else 64 * m)
                B = BN // N
                for kind in kinds_for(m):
                    inputs = None
                    for name, scan in runners(kind, device, smoke, chunk).items():
                        for mode in ("fwd", "fwd+bwd"):
                            row = dict(device=dev_name, kind=kind, impl=name, mode=mode,
                                       m=m, T=T, BN=BN, B=B, N=N, dtype=str(dtype).replace("torch.", ""),
                                       bytes=byte_model(kind, m, BN, T, in_bytes,
                                                        in_bytes if name == "fla_hgrn" else 4)[mode],
                                       copy_GBps=copy_bw / 1e9)
                            if name == "fla_hgrn":
                                row["note"] = "fla writes its output in the input dtype"
                            if name == "triton":
                                row["chunk"] = chunk or "auto"
                            if row_key(row) in done:
                                continue
                            if memory_needed(kind, name, m, BN, T, in_bytes, mode) > 0.8 * free:
                                row["status"] = "skipped: does not fit in GPU memory"
                                add(row)
                                continue
                            if inputs is None:
                                inputs = make_inputs(kind, m, B, T, N, dtype, device)
                            try:
                                t = median_time(step(scan, own_inputs(name, inputs), mode), device,
                                                0 if smoke else 3, 1 if smoke else 10 if quick else 20)
                            except torch.cuda.OutOfMemoryError:
                                torch.cuda.empty_cache()
                                row["status"] = "skipped: out of GPU memory"
                                add(row)
                                continue
                            if smoke:
                                row.update(status="smoke: ran, not a timing")
                                add(row)
                                continue
                            gbps = row["bytes"] / t / 1e9
                            row.update(status="measured", time_s=t, GBps=gbps, frac_copy=gbps / (copy_bw / 1e9))
                            add(row)
                            print(f"{kind:6s} {name:14s} {mode:8s} m={m} T={T:6d} BN={BN:5d} "
                                  f"{t * 1e3:9.3f} ms {gbps:8.1f} GB/s {row['frac_copy']:6.1%}")
                    del inputs
                    if not smoke:
                        torch.cuda.empty_cache()
    return rows


def unmeasured_gpu_rows(dtype) -> List[dict]:
    in_bytes = torch.finfo(dtype).bits // 8
    rows = []
    for m in MS:
        for T in TS:
            for BN in BNS:
                for kind in kinds_for(m):
                    impls = ["triton", "torch_chunked"] + (["fla_hgrn"] if kind == "diag" else []) + \
                        (["torch_assoc"] if kind in ("block", "bdlru") else [])
                    for name in impls:
                        for mode in ("fwd", "fwd+bwd"):
                            rows.append(dict(device="cuda", kind=kind, impl=name, mode=mode, m=m, T=T, BN=BN,
                                             dtype=str(dtype).replace("torch.", ""),
                                             bytes=byte_model(kind, m, BN, T, in_bytes)[mode],
                                             status="unmeasured: no CUDA device on this machine"))
    return rows


def cpu_rows(quick: bool) -> List[dict]:
    """The PyTorch paths on this CPU at small sizes (fp32), against the CPU copy bandwidth."""
    device = torch.device("cpu")
    copy_bw = copy_bandwidth(device, 1 << 28)
    print(f"CPU copy bandwidth: {copy_bw / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")
    T, BN = (512, 128) if quick else (1024, 256)
    rows = []
    for m in MS:
        N = min(BN, 16 * m)
        B = BN // N
        for kind in kinds_for(m):
            inputs = make_inputs(kind, m, B, T, N, torch.float32, device)
            for name, scan in runners(kind, device).items():
                for mode in ("fwd", "fwd+bwd"):
                    nbytes = byte_model(kind, m, BN, T, 4)[mode]
                    row = dict(device="cpu", kind=kind, impl=name, mode=mode, m=m, T=T, BN=BN, B=B, N=N,
                               dtype="float32", bytes=nbytes, copy_GBps=copy_bw / 1e9)
                    if memory_needed(kind, name, m, BN, T, 4, mode) > (4 << 30):
                        row["status"] = "skipped: over the 4 GiB CPU budget"
                        rows.append(row)
                        continue
                    t = median_time(step(scan, own_inputs(name, inputs), mode), device, 1, 3)
                    gbps = nbytes / t / 1e9
                    row.update(status="measured", time_s=t, GBps=gbps, frac_copy=gbps / (copy_bw / 1e9))
                    rows.append(row)
                    print(f"cpu {kind:6s} {name:14s} {mode:8s} m={m} T={T} BN={BN} {t * 1e3:9.2f} ms "
                          f"{gbps:6.2f} GB/s {row['frac_copy']:6.1%}")
    return rows


def ratios(rows: List[dict]) -> List[dict]:
    """Time of every other implementation over ours, per shape and mode (triton where it was
    measured, else the chunked PyTorch path): > 1 means ours is faster."""
    out = []
    groups: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r.get("status") == "measured":
            groups.setdefault((r["device"], r["kind"], r["m"], r["T"], r["BN"], r["mode"]), {})[r["impl"]] = r["time_s"]
    for (dev, kind, m, T, BN, mode), t in groups.items():
        ours = "triton" if "triton" in t else "torch_chunked"
        for name, tn in t.items():
            if name != ours:
                out.append(dict(device=dev, kind=kind, m=m, T=T, BN=BN, mode=mode,
                                ratio=f"{name} / {ours} time", value=tn / t[ours]))
                print(f"{dev} {kind:6s} {mode:8s} m={m} T={T} BN={BN}: {name} / {ours} time = {tn / t[ours]:.2f}")
    return out


def write_markdown(path: Path, result: dict) -> None:
    lines = ["# Scan benchmark (bench/scan.py)", "", f"meta: `{json.dumps(result['meta'])}`", ""]
    gpu = [r for r in result["rows"] if r.get("device") != "cpu" and "ratio" not in r]
    if gpu and all(r["status"].startswith("unmeasured") for r in gpu):
        lines += ["## GPU: unmeasured", "",
                  f"No CUDA device here: all {len(gpu)} GPU rows (m in {MS}, T in {TS}, B x N in {BNS}; "
                  "triton, fla_hgrn at m = 1, torch_assoc, torch_chunked; fwd and fwd+bwd) are unmeasured. "
                  "Their byte model is in scan.json; no time or bandwidth is estimated. The targets "
                  "(fwd >= 85% of copy bandwidth for m <= 4, fwd+bwd >= 65%) are unverified.", ""]
    else:
        lines += ["## GPU", "", "| kind | impl | mode | m | T | BxN | ms | GB/s | of copy | status |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in gpu:
            if r["status"] != "measured":
                lines.append(f"| {r['kind']} | {r['impl']} | {r['mode']} | {r['m']} | {r['T']} | {r['BN']} "
                             f"| | | | {r['status']} |")
                continue
            lines.append(f"| {r['kind']} | {r['impl']} | {r['mode']} | {r['m']} | {r['T']} | {r['BN']} | "
                         f"{r.get('time_s', float('nan')) * 1e3:.3f} | {r.get('GBps', float('nan')):.0f} | "
                         f"{r.get('frac_copy', float('nan')):.0%} | {r['status']} |")
        lines += ["", "Ratios (same run): " + "; ".join(
            f"{r['kind']} m={r['m']} T={r['T']} BxN={r['BN']} {r['mode']}: {r['ratio']} = {r['value']:.2f}"
            for r in result["rows"] if "ratio" in r and r["device"] != "cpu"), ""]
    cpu = [r for r in result["rows"] if r.get("device") == "cpu"]
    if cpu:
        lines += ["## CPU (PyTorch paths; the Triton kernels are not timed under the interpreter)", "",
                  f"fp32, {result['meta']['threads']} thread(s); 1-minute load average at the end of the run: "
                  f"{result['meta']['loadavg_1m']:.1f} (a shared machine: expect noise).", "",
                  "| kind | impl | mode | m | T | BxN | ms | GB/s | of copy | status |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in cpu:
            if "ratio" in r:
                continue
            if r["status"] != "measured":
                lines.append(f"| {r['kind']} | {r['impl']} | {r['mode']} | {r['m']} | {r['T']} | {r['BN']} "
                             f"| | | | {r['status']} |")
                continue
            lines.append(f"| {r['kind']} | {r['impl']} | {r['mode']} | {r['m']} | {r['T']} | {r['BN']} | "
                         f"{r.get('time_s', float('nan')) * 1e3:.2f} | {r.get('GBps', float('nan')):.2f} | "
                         f"{r.get('frac_copy', float('nan')):.1%} | {r['status']} |")
        lines += ["", "Ratios (same run): " + "; ".join(f"{r['kind']} m={r['m']} {r['mode']}: "
                                                        f"{r['ratio']} = {r['value']:.2f}"
                                                        for r in cpu if "ratio" in r), ""]
    path.write_text("\n".join(lines))


class ResultFile:
    """scan.json and scan.md, rewritten (atomically) after every row."""

    def __init__(self, path: Path, meta: dict, rows: List[dict]):
        self.path, self.meta, self.rows = path, meta, rows
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        result = {"meta": self.meta, "rows": self.rows}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, self.path)
        write_markdown(self.path.with_suffix(".md"), result)


def resumed_rows(path: Path) -> List[dict]:
    """The measured GPU rows of an earlier run's file (none if it is missing or torn)."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []
    return [r for r in rows if "ratio" not in r and r.get("device") != "cpu"
            and r.get("status", "").startswith(("measured", "smoke", "skipped"))]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"T = 2K only on GPU, one chunk length ({QUICK_CHUNK}) for the Triton rows, smaller CPU sizes")
    ap.add_argument("--dtype", choices=sorted(DT), default="bf16", help="input dtype on GPU (state is fp32)")
    ap.add_argument("--smoke", action="store_true",
                    help="no CUDA: run the GPU code path on CPU under the Triton interpreter at tiny sizes "
                         "(checks the benchmark runs; not a timing); writes only where --out is given")
    ap.add_argument("--out", help="JSON results, and a .md beside it (default bench/results/scan.json)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the measured GPU rows of an existing --out and measure only the others")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dtype = DT[args.dtype]
    has_cuda = torch.cuda.is_available()
    smoke = args.smoke and not has_cuda
    meta = dict(torch=torch.__version__, cuda=has_cuda, machine=platform.machine(), threads=torch.get_num_threads(),
                quick=args.quick or smoke, gpu_dtype=args.dtype, smoke=smoke,
                triton_chunk=SMOKE_CHUNK if smoke else QUICK_CHUNK if args.quick else "auto",
                note="byte model: inputs read once, outputs written once",
                loadavg_1m=os.getloadavg()[0])  # CPU timings on a shared machine: say how busy it was
    if smoke and args.out is None:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported (lazily)
        rows = gpu_rows(dtype, True, smoke=True)
        print(f"smoke run: {len(rows)} rows ran through the GPU code path; nothing written")
        return 0
    out = Path(args.out or HERE / "results" / "scan.json")
    kept = resumed_rows(out) if args.resume else []
    if kept:
        print(f"--resume: {len(kept)} rows kept from {out}")
    result = ResultFile(out, meta, list(kept))
    done = frozenset(row_key(r) for r in kept)
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        gpu_rows(dtype, True, smoke=True, sink=result.add, done=done)
    elif has_cuda:
        gpu_rows(dtype, args.quick, sink=result.add, done=done)
    else:
        for row in unmeasured_gpu_rows(dtype):
            result.rows.append(row)
        print(f"no CUDA device: {len(result.rows)} GPU rows written as unmeasured")
        for row in cpu_rows(args.quick):
            result.add(row)
    result.meta["loadavg_1m"] = os.getloadavg()[0]
    result.rows += ratios(result.rows)
    result.save()
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
