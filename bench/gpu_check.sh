#!/usr/bin/env bash
# One prepared GPU check for a machine with one GPU and no network, in at most 8 minutes.
#
#   make gpu-wheels                        # first, where there is network: fills .whl/
#   bash bench/gpu_check.sh [OPTIONS]      # on the GPU machine, from the repo root, .whl/ carried
#
# Steps, each under its own time budget (seconds; 460 in all); a failing step is recorded and the
# next one runs:
#   env      15   nvidia-smi, Python and the image's package versions
#   install  60   .whl/ with pip --no-index --no-deps --target WORK/site (the image's torch, triton
#                 and transformers stay as they are), llm_lru itself, pip check, an import check
#   pytest   165  pytest -m gpu: the real-size GPU tests, fp32 and bf16 where parametrised
#   scan     105  bench/scan.py --quick --dtype bf16: the GPU rows, the measured copy bandwidth,
#                 fla's fused_recurrent_hgrn at m = 1
#   train    110  bench/gpu_train_step.py: a bf16 training step of configs/hybrid-125m.yaml's model
#                 next to an attention-only model of the same size (tokens/s, MFU, peak memory)
#
# Results go to --out (default $OUT, else out/gpu_check), at most 8 files (what the lent machine
# sends back): summary.json, summary.md, env.txt, pytest.log, scan.json, scan.md, train_step.json
# and logs.tar.gz (every step's full log). The summary is rewritten after each step, so a run cut
# short still reports the steps it finished. Exit status: 0 when every step passed, 1 when one did
# not, 2 for a usage error.
#
# Options:
#   --only STEPS     comma-separated subset of: env,install,pytest,scan,train
#   --out DIR        where the results go
#   --wheels DIR     the wheel folder made by `make gpu-wheels` (default .whl)
#   --work DIR       scratch folder: the install target, logs (default: a new temporary folder)
#   --python PY      the interpreter (default python3: on the lent machines, the one with torch)
#   --workers N      pytest-xdist workers for the pytest step, if xdist is there (default 4; 1: none)
#   --budget SECS    the whole run's limit; steps are cut to what is left (default 460)
#   --step-budget STEP=SECS   one step's own limit (repeatable), e.g. install=300 on a slow machine
#   --smoke          tiny sizes (bench --smoke): checks the plumbing off a GPU; numbers mean nothing
#   --dry-run        list the steps and settings, run nothing
#   -h, --help       this text
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=(env install pytest scan train)
declare -A BUDGET=([env]=15 [install]=60 [pytest]=165 [scan]=105 [train]=110)
declare -A DESC=(
    [env]="nvidia-smi, Python and the image's package versions"
    [install]="wheels + llm_lru into WORK/site (pip --no-index --no-deps --target), pip check, imports"
    [pytest]="pytest -m gpu over the test files that mark gpu tests (fp32 and bf16 parametrised)"
    [scan]="bench/scan.py --quick --dtype bf16: GPU rows, copy bandwidth, fla hgrn at m = 1"
    [train]="bench/gpu_train_step.py: bf16 step of configs/hybrid-125m.yaml vs attention only")
# 460 s, plus at most one step's 10 s grace to die after its TERM: under 8 minutes.
TOTAL=460
PY=python3
OUTDIR=${OUT:-$ROOT/out/gpu_check}
WHEELS=$ROOT/.whl
WORK=""
ONLY=""
WORKERS=4
DRY=0
SMOKE=0

usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] && [[ $2 != --* ]] || die "$1 needs a value (see --help)"; }
need_int() { [[ $2 =~ ^[0-9]+$ ]] || die "$1: expected a whole number, got '$2'"; }

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY=1 ;;
        --smoke) SMOKE=1 ;;
        --only) need_value "$@"; ONLY=$2; shift ;;
        --out) need_value "$@"; OUTDIR=$2; shift ;;
        --wheels) need_value "$@"; WHEELS=$2; shift ;;
        --work) need_value "$@"; WORK=$2; shift ;;
        --python) need_value "$@"; PY=$2; shift ;;
        --workers) need_value "$@"; need_int "$1" "$2"; WORKERS=$2; shift ;;
        --budget) need_value "$@"; need_int "$1" "$2"; TOTAL=$2; shift ;;
        --step-budget)
            need_value "$@"
            [ -n "${2%%=*}" ] && [ -n "${BUDGET[${2%%=*}]+x}" ] || die "--step-budget: unknown step '${2%%=*}' (steps: ${STEPS[*]})"
            need_int "$1" "${2#*=}"
            BUDGET[${2%%=*}]=${2#*=}; shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

SELECTED=("${STEPS[@]}")
if [ -n "$ONLY" ]; then
    IFS=, read -r -a SELECTED <<<"$ONLY"
    for s in "${SELECTED[@]}"; do
        [ -n "$s" ] && [ -n "${BUDGET[$s]+x}" ] || die "--only: unknown step '$s' (steps: ${STEPS[*]})"
    done
fi

if [ "$DRY" = 1 ]; then
    echo "gpu_check.sh: dry run; would run these steps (budget in seconds, ${TOTAL} in all):"
    for s in "${SELECTED[@]}"; do printf '  %-8s %4s  %s\n' "$s" "${BUDGET[$s]}" "${DESC[$s]}"; done
    echo "python: $PY; wheels: $WHEELS; work: ${WORK:-a new temporary folder}; out: $OUTDIR; smoke: $SMOKE"
    exit 0
fi

command -v "$PY" >/dev/null 2>&1 || die "--python: '$PY' is not a command"
mkdir -p "$OUTDIR" || die "--out: cannot create '$OUTDIR'"
OUTDIR=$(cd "$OUTDIR" && pwd)
[ -n "$WORK" ] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK" || die "--work: cannot create '$WORK'"
WORK=$(cd "$WORK" && pwd)
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$WHEELS")
SITE=$WORK/site
BOOT=$WORK/boot
: >"$WORK/steps.tsv"
# The steps after install import from WORK/site; BOOT's sitecustomize binds llm_lru to that copy.
export PYTHONPATH="$BOOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The GPU kernels must compile for the device, never run in the interpreter; conftest and
# bench/scan.py --smoke set it themselves where there is no GPU.
unset TRITON_INTERPRET
export ROOT PY WHEELS WORK SITE BOOT WORKERS SMOKE

# ---- the steps (each runs in its own bash under `timeout`, output in WORK/<step>.log) -----------

step_env() {
    echo "# date (UTC)"; date -u +%Y-%m-%dT%H:%M:%SZ
    echo "# host"; uname -a; echo "cpus: $(nproc)"
    echo "# python"; env -u PYTHONPATH "$PY" -c 'import sys; print(sys.executable); print(sys.version)'
    echo "# the image's packages (pip list, filtered)"
    env -u PYTHONPATH "$PY" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE \
        '^(torch|triton|transformers|tokenizers|safetensors|numpy|pytest|pytest-xdist|einops|ninja|msgpack|psutil|py-cpuinfo|pyyaml|typing.extensions|setuptools|pip|tensorboard|pyarrow|tqdm|packaging|pydantic|deepspeed|flash-linear-attention|fla-core|webdataset|omegaconf) ' || true
    echo "# torch"
    env -u PYTHONPATH "$PY" -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")'
    echo "# nvidia-smi"
    nvidia-smi && nvidia-smi --format=csv \
        --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu
}

step_install() {
    set -e
    if [ ! -f "$WHEELS/requirements.txt" ]; then
        echo "no $WHEELS/requirements.txt: run 'make gpu-wheels' where there is network and carry .whl" >&2
        return 3
    fi
    cd "$ROOT"
    rm -rf "$SITE" "$BOOT" "$WORK/buildtools" "$WORK/src"
    mkdir -p "$SITE" "$BOOT" "$WORK/src"
    local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check)
    # llm_lru is built with the lock's setuptools from a copy of what its build reads: pip builds a
    # folder in place, and the tree must stay untouched.
    "${pip[@]}" --target "$WORK/buildtools" "$WHEELS"/build/setuptools-*.whl
    local f
    for f in pyproject.toml setup.py setup.cfg MANIFEST.in README.md ./*.pth llm_lru kernels data_prep eval; do
        if [ -e "$f" ]; then cp -r "$f" "$WORK/src/"; fi
    done
    echo "# ${pip[*]} --no-build-isolation --target $SITE -r $WHEELS/requirements.txt $WORK/src"
    # host/ holds this machine's binary wheels where its Python differs; pip takes the matching one.
    PYTHONPATH="$WORK/buildtools" "${pip[@]}" --no-build-isolation --target "$SITE" \
        --find-links "$WHEELS" --find-links "$WHEELS/host" -r "$WHEELS/requirements.txt" "$WORK/src"
    cat >"$BOOT/sitecustomize.py" <<'EOF'
# Written by bench/gpu_check.sh. Imports llm_lru from the installed copy in WORK/site before the
# working directory joins sys.path: the repo's own llm_lru/ lacks kernels/, data_prep/ and eval/,
# which the install maps into it (pyproject.toml package-dir).
try:
    import llm_lru  # noqa: F401
except ImportError:
    pass
EOF
    echo "# installed in $SITE"
    "$PY" -m pip list --path "$SITE" --disable-pip-version-check
    echo "# pip check (the image's packages with $SITE in front)"
    PYTHONPATH="$SITE" "$PY" -m pip check --disable-pip-version-check || echo "(pip check exit $?)"
    echo "# imports"
    "$PY" - "$SITE" "$WORK/imports.json" <<'EOF'
import importlib, json, os, sys
site = os.path.realpath(sys.argv[1])
out, bad = {}, []
for name in ["deepspeed", "fla", "webdataset", "omegaconf", "pydantic", "llm_lru", "llm_lru.kernels",
             "llm_lru.models", "llm_lru.train.engine", "torch", "triton", "transformers"]:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - every failure is the result
        out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        bad.append(name)
        continue
    path = os.path.realpath(mod.__file__)
    ours = name.split(".")[0] not in ("torch", "triton", "transformers")  # those stay the image's
    out[name] = {"version": getattr(mod, "__version__", None), "file": path}
    if ours and not path.startswith(site + os.sep):
        out[name]["error"] = f"imported from {path}, not from {site}"
        bad.append(name)
with open(sys.argv[2], "w") as f:  # a file: deepspeed logs to stdout
    json.dump(out, f, indent=1)
print("import check:", "ok" if not bad else "failed: " + ", ".join(bad), file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
    cat "$WORK/imports.json"
}

step_pytest() {
    cd "$ROOT" || return 1
    local files
    mapfile -t files < <(grep -rlE 'mark\.gpu' tests --include='test_*.py' | sort)
    [ "${#files[@]}" -gt 0 ] || files=(tests)
    local extra=()
    if [ "$WORKERS" -gt 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then extra+=(-n "$WORKERS"); fi
    mkdir -p "$BOOT"
    cat >"$BOOT/gpu_check_pytest.py" <<'EOF'
"""Written by bench/gpu_check.sh: a pytest plugin that appends one JSON line per test outcome, with
its dtype parameter (ids say dtype0, dtype1 for torch dtypes), to $GPU_CHECK_PYTEST_JSONL, as each
test ends, so that a run cut at its budget still counts what finished."""
import json
import os

DTYPES = {"torch.float32": "fp32", "float32": "fp32", "fp32": "fp32",
          "torch.bfloat16": "bf16", "bfloat16": "bf16", "bf16": "bf16"}
_controller = True


def pytest_configure(config):
    global _controller
    _controller = not hasattr(config, "workerinput")  # under xdist the controller alone writes


def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        dtype = next((DTYPES[str(v)] for v in params.values() if str(v) in DTYPES), "other")
        item.user_properties.append(("dtype", dtype))  # travels with the reports from xdist workers


def pytest_runtest_logreport(report):
    if not _controller or not (report.when == "call" or report.outcome != "passed"):
        return
    outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
    rec = {"test": report.nodeid, "outcome": outcome, "when": report.when, "seconds": round(report.duration, 3),
           "dtype": dict(report.user_properties).get("dtype", "other")}
    with open(os.environ["GPU_CHECK_PYTEST_JSONL"], "a") as f:
        f.write(json.dumps(rec) + "\n")
EOF
    echo "# $PY -m pytest -m gpu ${extra[*]} ${files[*]}"
    # -v: one line per test as it ends, so a run cut at its budget still shows what passed.
    GPU_CHECK_PYTEST_JSONL="$WORK/pytest_results.jsonl" "$PY" -m pytest -p gpu_check_pytest -m gpu -v -rfE \
        --durations=15 --continue-on-collection-errors "${extra[@]}" "${files[@]}"
}

step_scan() {
    cd "$ROOT" || return 1
    if [ "$SMOKE" = 1 ]; then "$PY" bench/scan.py --smoke; return; fi
    "$PY" bench/scan.py --quick --dtype bf16 --out "$WORK/scan.json"
}

step_train() {
    cd "$ROOT" || return 1
    local smoke=()
    if [ "$SMOKE" = 1 ]; then smoke=(--smoke); fi
    "$PY" bench/gpu_train_step.py --config configs/hybrid-125m.yaml --out "$WORK/train_step.json" "${smoke[@]}"
}
export -f step_env step_install step_pytest step_scan step_train

# ---- the summary (rewritten after every step) --------------------------------------------------

write_summary() {
    "$PY" - "$WORK" "$OUTDIR" "$TOTAL" <<'EOF' || echo "gpu_check.sh: writing the summary failed" >&2
import json, re, sys
from collections import Counter
from pathlib import Path

work, out, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def load(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, secs, budget, note = line.split("\t")
    steps.append(dict(step=name, status=status, rc=int(rc), seconds=int(secs), budget=int(budget), note=note))
summary = {"steps": steps, "total_budget_s": total}
md = ["# GPU check (bench/gpu_check.sh)", ""]

imports = load("imports.json")
if imports:
    summary["versions"] = {k: v.get("version") for k, v in imports.items() if "." not in k}
env = (work / "env.log").read_text(errors="replace") if (work / "env.log").is_file() else ""
gpu = re.search(r"^(.*) sm_(\d+) (\d+) SMs (\S+) GiB$", env, re.M)
if gpu:
    summary["device"] = dict(name=gpu.group(1), arch=f"sm_{gpu.group(2)}", sms=int(gpu.group(3)), gib=float(gpu.group(4)))
    md.append(f"Device: {gpu.group(1)} (sm_{gpu.group(2)}, {gpu.group(3)} SMs, {gpu.group(4)} GiB).")
if imports:
    md.append("Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v) + ".")
md += ["", "| step | status | seconds | budget | note |", "|---|---|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['budget']} | {s['note']} |" for s in steps]

results = work / "pytest_results.jsonl"
if results.is_file():
    outcome, dtype = {}, {}
    for line in results.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by the step's timeout
        if outcome.get(rec["test"]) not in ("failed", "error"):  # a teardown error after a pass counts
            outcome[rec["test"]] = rec["outcome"]
        dtype[rec["test"]] = rec["dtype"]
    by_dtype = {}
    for test, res in outcome.items():
        by_dtype.setdefault(dtype[test], Counter())[res] += 1
    failed = sorted(t for t, r in outcome.items() if r in ("failed", "error"))
    summary["pytest"] = dict(by_dtype={d: dict(c) for d, c in sorted(by_dtype.items())}, failed=failed,
                             tests=len(outcome))
    md += ["", "## pytest -m gpu", ""]
    md += [f"- {d}: " + ", ".join(f"{n} {r}" for r, n in sorted(c.items())) for d, c in sorted(by_dtype.items())]
    md += [f"- failed: `{t}`" for t in failed[:20]] + ([f"- ... {len(failed) - 20} more"] if len(failed) > 20 else [])

scan = load("scan.json")
if scan:
    rows = [r for r in scan["rows"] if r.get("status") == "measured" and "ratio" not in r and r.get("device") != "cpu"]
    copy = next((r["copy_GBps"] for r in rows if "copy_GBps" in r), None)
    best = {}
    for r in rows:
        if r["impl"] == "triton":
            key = (r["kind"], r["m"], r["mode"])
            best[key] = max(best.get(key, 0.0), r["frac_copy"])
    fla = [r for r in scan["rows"] if "ratio" in r and r["ratio"].startswith("fla_hgrn")]
    summary["scan"] = dict(copy_GBps=copy, triton_best_frac_copy={f"{k}/m={m}/{mode}": v for (k, m, mode), v in sorted(best.items())},
                           fla_hgrn_over_triton_time=[dict(T=r["T"], BN=r["BN"], mode=r["mode"], value=r["value"]) for r in fla])
    md += ["", "## bench/scan.py (bf16, --quick; full rows in scan.md)", ""]
    md.append(f"Copy bandwidth: {copy:.0f} GB/s (read + write)." if copy else "Copy bandwidth: not measured.")
    md += [f"- triton {k} m={m} {mode}: best {v:.0%} of copy bandwidth" for (k, m, mode), v in sorted(best.items())]
    md += [f"- fla hgrn / triton time at m = 1, T={r['T']}, BxN={r['BN']} {r['mode']}: {r['value']:.2f}" for r in fla]

train = load("train_step.json")
if train:
    summary["train"] = dict(meta=train["meta"], ratios=train["ratios"], models=[
        {k: r.get(k) for k in ("name", "pattern", "n_params", "status", "step_time_s", "tokens_per_s", "mfu",
                               "mfu_vs_measured_matmul", "peak_memory_gib", "loss_first", "loss_last", "loss_path")}
        for r in train["models"]])
    tmd = work / "train_step.md"
    if tmd.is_file():
        md += ["", "## " + tmd.read_text().split("\n", 1)[0].lstrip("# ")] + tmd.read_text().split("\n")[1:]

for s in steps:
    if s["status"] not in ("ok",) and (work / f"{s['step']}.log").is_file():
        tail = (work / f"{s['step']}.log").read_text(errors="replace").splitlines()[-15:]
        md += ["", f"## {s['step']}: {s['status']} (last lines of its log)", "", "```"] + tail + ["```"]

(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
(out / "summary.md").write_text("\n".join(md) + "\n")
EOF
}

# Copies the step outputs to OUT: 8 files at most (summary.json and .md are written there).
publish() {
    local src dst
    for pair in env.log:env.txt pytest.log:pytest.log scan.json:scan.json scan.md:scan.md \
                train_step.json:train_step.json; do
        src=${pair%%:*}; dst=${pair#*:}
        if [ -f "$WORK/$src" ]; then cp "$WORK/$src" "$OUTDIR/$dst"; fi
    done
    (cd "$WORK" && tar -czf "$OUTDIR/logs.tar.gz" --ignore-failed-read ./*.log ./*.json ./*.jsonl ./*.md steps.tsv 2>/dev/null)
    write_summary
}

run_step() {
    local name=$1 budget=${BUDGET[$1]} left t0 rc status note=""
    left=$((DEADLINE - $(date +%s)))
    if [ "$budget" -gt "$left" ]; then budget=$left; note="cut to the time left"; fi
    if [ "$budget" -lt 5 ]; then
        printf '%s\tskipped\t0\t0\t%s\t%s\n' "$name" "$budget" "no time left of ${TOTAL} s" >>"$WORK/steps.tsv"
        echo "== $name: skipped, no time left"
        publish
        return
    fi
    echo "== $name (budget ${budget} s): ${DESC[$name]}"
    t0=$(date +%s)
    # timeout signals the whole process group: pytest workers and compilers go with it.
    timeout --kill-after=10 "$budget" bash -c "step_$name" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="killed at ${budget} s" ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$budget" "$note" >>"$WORK/steps.tsv"
    echo "== $name: $status (exit $rc, $(($(date +%s) - t0)) s)"
    publish
}

DEADLINE=$(($(date +%s) + TOTAL))
echo "gpu_check.sh: steps ${SELECTED[*]}; work $WORK; results $OUTDIR"
for s in "${SELECTED[@]}"; do run_step "$s"; done
echo
cat "$OUTDIR/summary.md" 2>/dev/null
! grep -qv $'^[^\t]*\tok\t' "$WORK/steps.tsv"
