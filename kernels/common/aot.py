"""Compile every Triton scan kernel variant for sm_80 / sm_90 without a GPU and read its resources.

    python -m llm_lru.kernels.common.aot [--arch 80,90] [--full] [--out CSV] [--md MD] [--jobs J]
                                         [--strict] [--before CSV]

Run it WITHOUT TRITON_INTERPRET (with it the kernels are interpreter functions and cannot be
compiled; the command refuses). Every variant the launchers can launch (kernel, m, norm, scan
direction, reset, h0, input dtype; BLOCK_R = 128 rows on 4 warps, what they choose at real sizes)
is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and read
back with the cuobjdump that ships with triton:

  regs, stack / local bytes (spill_bytes = both), shared_bytes, occupancy (resident warps / 64,
  from registers, warps and shared memory of that arch), and, from the SASS of the time loop
  (the widest backward branch), per iteration: instructions, SHFL, BAR, LDG and local accesses
  (where the compiler unrolls a short body, one iteration is several time steps).

One CSV row per variant and arch, written as it comes (--only, --m, --norm, --dtype narrow the set). Exit status 1 on any compile failure, and with --strict also
when a variant misses the targets of issue 18 (`target_violations`). Without --full a
representative subset (every kernel, all m, two norms, bf16; all norms and fp32 at m = 4).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

MS = (1, 2, 3, 4, 8, 16)
NORMS = (None, "softmax", "sigmoid", "relu", "tanh", "lin_l1")
# Per SM, both archs: 64K registers, 64 warps, 32 blocks; usable shared memory differs.
SM = {80: dict(regs=65536, warps=64, blocks=32, smem=167936), 90: dict(regs=65536, warps=64, blocks=32, smem=233472)}
BLOCK_R = 128
FIELDS = ["kernel", "m", "W", "norm", "dtype", "reverse", "reset", "h0", "ncol", "num_warps", "arch", "ok", "regs",
          "stack_bytes", "local_bytes", "spill_bytes", "shared_bytes", "occupancy", "loop_instrs", "loop_shuffles",
          "loop_barriers", "loop_global_loads", "loop_local", "compile_s", "error"]

# pointer arguments: "in" = the input dtype, "acc" = fp32 state, "i8"/"i32" = reset codes
_PTRS = {
    "_block_fwd_kernel": dict(G="in", U="in", INIT="acc", H="acc", LAST="acc", PROD="acc", RST="i8"),
    "_block_bwd_kernel": dict(G="in", U="in", H="acc", H0="acc", DH="acc", LAMIN="acc", DG="in", DU="in",
                              LAMOUT="acc", RST="i8"),
    "_fold_kernel": dict(P="acc", S="acc", X0="acc", OUT="acc"),
    "_comp_fwd_kernel": dict(G="in", X="in", INIT="acc", Y="acc", LAST="acc", PROD="acc", RST="i8"),
    "_comp_bwd_kernel": dict(G="in", X="in", Y="acc", H0="acc", LR="i32", DY="acc", LAMIN="acc", DG="in", DX="in",
                             LAMOUT="acc", RST="i8"),
}
_TY = {"bf16": "*bf16", "fp32": "*fp32", "acc": "*fp32", "i8": "*i8", "i32": "*i32"}


@dataclass
class Variant:
    """One launchable specialisation: `kernel` names the pass (block_fwd, block_carry, block_bwd,
    block_bwd_carry, fold, comp_fwd, comp_carry, comp_bwd, comp_bwd_carry)."""
    kernel: str
    m: int
    norm: Optional[str] = None
    dtype: str = "bf16"
    reverse: bool = False
    reset: bool = False
    h0: bool = False
    backward: bool = False  # fold only
    extra: Dict = field(default_factory=dict)

    @property
    def W(self) -> int:
        return self.m + 1 if self.norm else self.m


def _subset_resets(norm: Optional[str]) -> tuple:
    """The subset's reset flags: the fused gates always run with their document cuts; the plain
    scans both without (block_scan, diag_scan: A_t = 0 is their cut) and with (the native split's
    cut variants, common.triton.TritonLocal, where 8 B of stack once hid)."""
    return (False, True) if norm is None else (True,)


def variants(full: bool) -> List[Variant]:
    """Every variant (full) or a representative subset of them."""
    out: List[Variant] = []
    scans = ["block_fwd", "block_carry", "block_bwd", "block_bwd_carry",
             "comp_fwd", "comp_carry", "comp_bwd", "comp_bwd_carry"]
    for kernel in scans:
        bwd = kernel.endswith(("bwd", "bwd_carry"))
        for m, norm, dtype, reverse, reset, h0 in itertools.product(
                MS, NORMS, ("bf16", "fp32"), (False, True), (False, True), (False, True) if bwd else (False,)):
            if not full:
                # forward scan order, h0 in the backward, resets as _subset_resets
                if reverse or h0 != bwd or reset not in _subset_resets(norm):
                    continue
                if not ((dtype == "bf16" and (norm in (None, "softmax") or m == 4))
                        or (dtype == "fp32" and m == 4 and norm == "softmax")):
                    continue
            out.append(Variant(kernel, m, norm, dtype, reverse, reset, h0))
    for m, backward in itertools.product(MS, (False, True)):
        out.append(Variant("fold", m, dtype="fp32", backward=backward))
    return out


def kernel_spec(v: Variant):
    """(jit function, constexprs, num_warps) for a variant, built from what the launchers use."""
    import torch
    from ..block import triton as block
    from ..companion import triton as companion
    from .triton import _fold_kernel, acc_triton_dtype, norm_code, num_warps_for, p_columns, scan_meta

    class _L:  # the launch a real-size problem gets (Launch without a device)
        BLOCK_R = BLOCK_R
        NCOL = p_columns(v.m, companion=v.kernel.startswith("comp"))

    nw = num_warps_for(BLOCK_R)
    if v.kernel == "fold":
        return _fold_kernel, dict(M=v.m, BACKWARD=v.backward, ACC=acc_triton_dtype(torch.float32),
                                        BLOCK_R=BLOCK_R), nw
    meta = scan_meta(v.m, v.W, norm_code(v.norm), v.reverse, v.reset, torch.float32, _L)
    comp = v.kernel.startswith("comp")
    if v.kernel.endswith("_fwd"):
        fn = companion._comp_fwd_kernel if comp else block._block_fwd_kernel
        meta.update({"STORE_Y" if comp else "STORE_H": True, "WANT_P": False, "NCOL": 1})
    elif v.kernel.endswith("_carry") and "bwd" not in v.kernel:
        fn = companion._comp_fwd_kernel if comp else block._block_fwd_kernel
        meta.update({"STORE_Y" if comp else "STORE_H": False, "WANT_P": True, "NCOL": _L.NCOL})
    else:
        fn = companion._comp_bwd_kernel if comp else block._block_bwd_kernel
        meta.update(HAS_H0=v.h0, CARRY_ONLY=v.kernel.endswith("carry"))
    return fn, meta, nw


def _signature(fn, constexprs: Dict, dtype: str):
    ptrs = _PTRS[fn.__name__]
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            kind = ptrs[name]
            sig[name] = _TY[dtype if kind == "in" else kind]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            sig[name] = "i32"
    return sig, attrs


def compile_cubin(fn, constexprs: Dict, dtype: str, arch: int, num_warps: int):
    """-> (cubin bytes, dynamic shared bytes). Needs a compiling (not interpreted) `fn`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1: run without it")
    sig, attrs = _signature(fn, constexprs, dtype)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    opts = backend.parse_options({"num_warps": num_warps})
    ck = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=opts.__dict__)
    return ck.asm["cubin"], int(getattr(ck.metadata, "shared", 0) or 0)


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin_path: str) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in a cubin, from cuobjdump."""
    out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path], check=True,
                         capture_output=True, text=True).stdout
    res = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        hits = re.findall(rf"\b{key}:(\d+)", out)
        res[key] = int(hits[-1]) if hits else 0
    return res


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")


def parse_sass(sass: str):
    """[(address, opcode, operands)] of every instruction in cuobjdump -sass output."""
    out = []
    for line in sass.splitlines():
        mt = _INSTR.search(line)
        if not mt:
            continue
        text = _PRED.sub("", mt.group(2).strip())
        parts = text.split(None, 1)
        if parts:
            out.append((int(mt.group(1), 16), parts[0], parts[1] if len(parts) > 1 else ""))
    return out


def loop_counts(sass: str) -> Optional[Dict[str, int]]:
    """Instruction counts in the body of the widest loop (target .. backward branch), the time loop
    of our kernels; None when the code has no loop. Static counts: one iteration's instructions."""
    ins = parse_sass(sass)
    best = None
    for addr, op, args in ins:
        if op.startswith(("BRA", "JMP")):
            hit = re.search(r"0x([0-9a-f]+)", args)
            if hit and int(hit.group(1), 16) < addr:
                lo = int(hit.group(1), 16)
                if best is None or addr - lo > best[1] - best[0]:
                    best = (lo, addr)
    if best is None:
        return None
    body = [op for addr, op, _ in ins if best[0] <= addr <= best[1]]
    return dict(instrs=len(body), shuffles=sum(op.startswith("SHFL") for op in body),
                barriers=sum(op.startswith("BAR") for op in body),
                global_loads=sum(op.startswith("LDG") for op in body),
                local=sum(op.startswith(("LDL", "STL")) for op in body))


def occupancy(arch: int, regs: int, num_warps: int, shared: int) -> float:
    """Resident warps / max warps per SM: registers allocated per warp in 256-register units,
    shared memory per block plus the 1 KiB the driver reserves."""
    sm = SM[arch]
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    blocks = min(sm["blocks"], sm["warps"] // num_warps, sm["regs"] // (warp_regs * num_warps))
    if shared:
        blocks = min(blocks, sm["smem"] // (shared + 1024))
    return blocks * num_warps / sm["warps"]


def measure(fn, constexprs: Dict, dtype: str, arch: int, num_warps: int) -> Dict:
    """Compile one variant for one arch and read its resources (the CSV columns after `ok`)."""
    t0 = time.time()
    cubin, dyn_shared = compile_cubin(fn, constexprs, dtype, arch, num_warps)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        res = resource_usage(path)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], check=True, capture_output=True, text=True).stdout
    loop = loop_counts(sass) or {}
    shared = max(res["SHARED"], dyn_shared)
    return dict(ok=True, regs=res["REG"], stack_bytes=res["STACK"], local_bytes=res["LOCAL"],
                spill_bytes=res["STACK"] + res["LOCAL"], shared_bytes=shared,
                occupancy=round(occupancy(arch, res["REG"], num_warps, shared), 4),
                loop_instrs=loop.get("instrs"), loop_shuffles=loop.get("shuffles"),
                loop_barriers=loop.get("barriers"), loop_global_loads=loop.get("global_loads"),
                loop_local=loop.get("local"), compile_s=round(time.time() - t0, 2), error="")


def _row(job) -> Dict:
    v, arch = job
    row = dict(kernel=v.kernel + ("_bwd" if v.backward else ""), m=v.m, W=v.W, norm=v.norm or "none",
               dtype=v.dtype, reverse=int(v.reverse), reset=int(v.reset), h0=int(v.h0), arch=arch)
    try:
        fn, meta, nw = kernel_spec(v)
        row.update(ncol=meta.get("NCOL", ""), num_warps=nw)
        row.update(measure(fn, meta, v.dtype, arch, nw))
    except Exception as e:  # one failure must not hide the others: reported per row, exit 1
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    return row


def target_violations(rows: Iterable[Dict]) -> List[str]:
    """Issue 18's static targets: no spill for m <= 8; for m <= 4 at most 128 registers and no
    shuffle or barrier in the time loop."""
    bad = []
    for r in rows:
        if r.get("ok") not in (True, "True"):
            continue
        name = f"{r['kernel']} m={r['m']} norm={r['norm']} {r['dtype']} sm_{r['arch']}"
        m = int(r["m"])
        if m <= 8 and int(r["spill_bytes"]) > 0:
            bad.append(f"{name}: spills {r['spill_bytes']} B")
        if m <= 4 and int(r["regs"]) > 128:
            bad.append(f"{name}: {r['regs']} registers")
        if m <= 4 and (int(r["loop_shuffles"] or 0) or int(r["loop_barriers"] or 0)):
            bad.append(f"{name}: {r['loop_shuffles']} shuffles, {r['loop_barriers']} barriers per step")
    return bad


def summary_md(rows: List[Dict], before: Optional[List[Dict]] = None) -> str:
    """Markdown: per kernel and m, the worst case over the variant flags, per arch."""
    def worst(rs):
        ok = [r for r in rs if str(r["ok"]) in ("True", "1", "true")]
        if not ok:
            return None
        num = lambda k: [int(r[k]) for r in ok if r.get(k) not in (None, "")]
        return dict(n=len(rs), failed=len(rs) - len(ok), regs=max(num("regs")), spill=max(num("spill_bytes")),
                    occ=min(float(r["occupancy"]) for r in ok), shfl=max(num("loop_shuffles") or [0]),
                    bar=max(num("loop_barriers") or [0]), ldg=max(num("loop_global_loads") or [0]),
                    instrs=max(num("loop_instrs") or [0]), shared=max(num("shared_bytes")))

    def key(r):
        return (r["kernel"], int(r["m"]), int(r["arch"]))

    groups: Dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    old: Dict = {}
    for r in before or []:
        old.setdefault(key(r), []).append(r)
    head = ("| kernel | m | arch | variants | failed | regs (max) | spill B (max) | occupancy (min) | "
            "loop instrs | loop SHFL | loop BAR | loop LDG |")
    lines = [head + (" before: regs / spill B / SHFL / BAR |" if old else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if old else "")]
    for k in sorted(groups):
        w = worst(groups[k])
        if w is None:
            lines.append(f"| {k[0]} | {k[1]} | sm_{k[2]} | {len(groups[k])} | {len(groups[k])} | | | | | | | |")
            continue
        line = (f"| {k[0]} | {k[1]} | sm_{k[2]} | {w['n']} | {w['failed']} | {w['regs']} | {w['spill']} | "
                f"{w['occ']:.1%} | {w['instrs']} | {w['shfl']} | {w['bar']} | {w['ldg']} |")
        if old:
            o = worst(old.get(k, []))
            line += f" {o['regs']} / {o['spill']} / {o['shfl']} / {o['bar']} |" if o else " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


class _Serial:
    """ProcessPoolExecutor's map, in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)


def read_csv(path: str) -> List[Dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llm_lru.kernels.common.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated SM versions (default 80,90)")
    ap.add_argument("--full", action="store_true", help="every launchable variant, not the subset")
    ap.add_argument("--out", default=None, help="CSV to write (default: print the summary only)")
    ap.add_argument("--md", default=None, help="also write a markdown summary here")
    ap.add_argument("--before", default=None, help="a CSV of earlier kernels to show next to these in --md")
    ap.add_argument("--only", default=None, help="comma-separated kernel names to keep (e.g. block_fwd,fold)")
    ap.add_argument("--m", default=None, help="comma-separated block sizes to keep")
    ap.add_argument("--norm", default=None, help="comma-separated norms to keep (none, softmax, ...; fold has none)")
    ap.add_argument("--dtype", default=None, help="bf16 or fp32 inputs only")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a variant misses issue 18's targets")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: TRITON_INTERPRET=1 is set, so the kernels are interpreter functions and cannot be "
              "compiled; run it without: env -u TRITON_INTERPRET python -m llm_lru.kernels.common.aot",
              file=sys.stderr)
        return 2
    try:
        archs = [int(a) for a in args.arch.split(",") if a]
    except ValueError:
        ap.error(f"--arch: expected comma-separated integers, got {args.arch!r}")
    for a in archs:
        if a not in SM:
            ap.error(f"--arch: {a} is not one of {sorted(SM)}")
    vs = variants(args.full)
    if args.only:
        keep = set(args.only.split(","))
        vs = [v for v in vs if v.kernel + ("_bwd" if v.backward else "") in keep or v.kernel in keep]
    if args.m:
        ms = {int(x) for x in args.m.split(",")}
        vs = [v for v in vs if v.m in ms]
    if args.norm:
        norms = set(args.norm.split(","))
        vs = [v for v in vs if v.kernel == "fold" or (v.norm or "none") in norms]
    if args.dtype:
        vs = [v for v in vs if v.kernel == "fold" or v.dtype == args.dtype]
    jobs = sorted(((v, a) for v in vs for a in archs), key=lambda j: j[0].m)  # the slow m = 16 last
    t0 = time.time()
    rows: List[Dict] = []
    out = None
    if args.out:  # rows are written as they come: a long run that is stopped keeps what it did
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out = open(args.out, "w", newline="")
        writer = csv.DictWriter(out, fieldnames=FIELDS)
        writer.writeheader()
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else _Serial() as ex:
        for r in ex.map(_row, jobs):
            rows.append(r)
            if out:
                writer.writerow({k: r.get(k, "") for k in FIELDS})
                out.flush()
    if out:
        out.close()
    failed = [r for r in rows if not r["ok"]]
    md = summary_md(rows, read_csv(args.before) if args.before else None)
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    bad = target_violations(rows)
    import triton
    print(f"{len(rows)} compiles ({len(vs)} variants x {len(archs)} archs) with triton {triton.__version__} "
          f"in {time.time() - t0:.0f} s: {len(failed)} failed, {len(bad)} target violations")
    for r in failed:
        print(f"FAILED {r['kernel']} m={r['m']} norm={r['norm']} {r['dtype']} sm_{r['arch']}: {r['error']}")
    for b in bad:
        print(f"TARGET {b}")
    return 1 if failed or (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
