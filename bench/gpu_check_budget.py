"""The compile-time half of bench/gpu_check.sh's step budgets, from the measured compile times in
bench/results/triton_resources.csv (sm_90; Triton 3.9 on the 2-core CPU machine, 2 jobs).

    python bench/gpu_check_budget.py [--csv bench/results/triton_resources.csv]

Per step: the Triton kernel variants its code launches on a GPU (kernel pass, m, gate norm, input
dtype, scan direction, document cuts, h0), each priced at the largest compile time the CSV has for
that pass, m and norm (some CSV rows were cache hits: under a second at m = 16), summed. Integer
specialisation (T, L, R divisible by 16) can compile one variant twice: diag at T = 32K is
counted apart from the m = 1 block scan. The run-time half and the fixed costs are in the script's
header; this prints the compile table that header quotes.
"""
from __future__ import annotations

import argparse
import csv
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

HERE = Path(__file__).resolve().parent
PASSES = {"block": ("block_carry", "block_fwd", "block_bwd_carry", "block_bwd"),
          "comp": ("comp_carry", "comp_fwd", "comp_bwd_carry", "comp_bwd")}
Variant = Tuple[str, int, str, str, bool, bool, bool]  # pass, m, norm, dtype, reverse, reset, h0


def scan_variants(family: str, m: int, norm: str, dtypes: Iterable[str], reverses: Iterable[bool],
                  reset: bool, h0: bool, tag: str = "") -> List[Variant]:
    """The four passes of one chunked scan (forward carry + main, backward carry + main) and the
    two folds (fp32: one per m whatever the input dtype)."""
    out = []
    for dtype, reverse in itertools.product(dtypes, reverses):
        for p in PASSES[family]:
            out.append((p + tag, m, norm, dtype, reverse, reset, h0 and "bwd" in p))
    return out + [("fold", m, "none", "fp32", False, False, False), ("fold_bwd", m, "none", "fp32", False, False, False)]


def step_variants() -> Dict[str, List[Variant]]:
    """What each step launches (see tests/kernels/test_triton_gpu.py, bench/scan.py --quick,
    configs/hybrid-125m.yaml)."""
    dts, both = ("bf16", "fp32"), (False, True)
    pytest: List[Variant] = []
    for m in (1, 2, 4, 8):
        pytest += scan_variants("block", m, "none", dts, both, False, True)      # block_scan_triton
        pytest += scan_variants("block", m, "softmax", dts, both, True, True)    # bdlru, cuts
        pytest += scan_variants("comp", m, "none", dts, both, True, True)        # companion, cuts
        pytest += scan_variants("comp", m, "tanh", dts, both, True, True)        # hlru tanh, cuts
    pytest += scan_variants("block", 1, "none", dts, (False,), False, True, tag="@T32K")  # diag, other ints
    m16 = scan_variants("block", 16, "none", dts, both, False, True) + \
        scan_variants("block", 16, "softmax", dts, both, True, True)
    scan: List[Variant] = []
    for m in (1, 2, 4, 8):  # bf16, no h0, no cuts, one chunk length (256) for every row
        scan += scan_variants("block", m, "softmax", ("bf16",), (False,), False, False)  # bdlru
        if m == 1:
            scan += scan_variants("block", 1, "none", ("bf16",), (False,), False, False)  # diag
        else:
            scan += scan_variants("block", m, "none", ("bf16",), (False,), False, False)  # block
            scan += scan_variants("comp", m, "softmax", ("bf16",), (False,), False, False)  # hlru
    # the hybrid's BD-LRU layers: m = 4 softmax, bf16, document cuts, both directions are not used
    train = scan_variants("block", 4, "softmax", ("bf16",), (False,), True, False)
    return {"pytest": pytest, "pytest_m16": m16, "scan": scan, "train": train}


def compile_seconds(csv_path: Path) -> Dict[Tuple[str, int, str], float]:
    """(pass, m, norm) -> the largest sm_90 compile time of the CSV."""
    worst: Dict[Tuple[str, int, str], float] = defaultdict(float)
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r["arch"] == "90" and r["compile_s"]:
                key = (r["kernel"], int(r["m"]), r["norm"] or "none")
                worst[key] = max(worst[key], float(r["compile_s"]))
    return worst


def price(variants: List[Variant], worst: Dict[Tuple[str, int, str], float]) -> Tuple[int, float, List[str]]:
    """(distinct variants, seconds, missing) for a step."""
    unique = sorted(set(variants))
    total, missing = 0.0, []
    for p, m, norm, *_ in unique:
        key = (p.split("@")[0], m, norm)
        if key not in worst:
            missing.append(f"{key}")
            continue
        total += worst[key]
    return len(unique), total, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default=str(HERE / "results" / "triton_resources.csv"))
    args = ap.parse_args(argv)
    worst = compile_seconds(Path(args.csv))
    print("| step | Triton variants | compile s (sm_90, serial) |\n|---|---|---|")
    for step, variants in step_variants().items():
        n, secs, missing = price(variants, worst)
        print(f"| {step} | {n} | {secs:.0f} |" + (f" missing: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
