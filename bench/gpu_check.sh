#!/usr/bin/env bash
# One prepared GPU check for a machine with one GPU and no network, in at most 8 minutes (and 10 s
# for the step killed last to exit).
#
#   make gpu-wheels                        # first, where there is network: fills .whl/
#   bash bench/gpu_check.sh [OPTIONS]      # on the GPU machine, from the repo root, .whl/ carried
#   bash bench/gpu_check.sh --rehearse     # here, without a GPU: every step's code path, tiny sizes
#
# Steps, each under its own time budget; a failing step is recorded and the next one runs. Each
# budget = start + Triton compile + other compile + run, in seconds. Triton compile is the sum of
# bench/results/triton_resources.csv's sm_90 compile times (the worst per pass, m and norm, on the
# 2-core CPU machine) over the variants the step launches: `python bench/gpu_check_budget.py`.
# Other compile (torch.compile of flex_attention, fla's kernels) has no measurement on sm_90 yet:
# estimates, marked ~.
#   env      15 = 5 torch import + 2 sha256 of libtriton.so + 8 nvidia-smi, pip list
#   install  50 = 15 pip --no-index --no-deps --target WORK/site of ~12 wheels + 5 llm_lru build
#                 + 5 pip check + ~25 import check (deepspeed, fla); the image's torch, triton and
#                 transformers stay as they are
#   pytest  170 = 15 start (4 xdist workers import torch, collect) + 67 Triton (272 variants,
#                 268 s / 4 workers) + ~60 torch.compile(flex_attention) (14 shape/dtype cases,
#                 fwd + bwd, ~15 s each / 4) + 28 run: pytest -m gpu (m <= 8, fp32 and bf16)
#   scan    100 = 10 start (torch import, 1 GiB copy bandwidth) + 12 fla import + 53 Triton
#                 (52 variants, one process, one chunk length) + 25 run (~120 rows x 13 calls):
#                 bench/scan.py --quick --dtype bf16, GPU rows, fla's fused_recurrent_hgrn at m = 1
#   train    85 = 10 start + 5 Triton (6 variants, the BD-LRU layers' scan with cuts) + ~30 flex_attention
#                 + ~15 fla fused cross-entropy + 10 bf16 matmul peak + 15 run (2 models x 13 steps,
#                 both loss routes timed): bench/gpu_train_step.py on configs/hybrid-125m.yaml
#   ---------
#           420, + 60 left unused for a rerun of a failed step = 480 s (8 minutes)
#   pytest_m16 290 = 15 start + 270 Triton (34 variants, 1080 s / 4 workers) + 5 run: pytest -m
#                 gpu_m16, optional: runs last, and only if its whole budget is left
#
# After the steps, each one that failed or timed out runs again (--no-rerun: not) within the time
# left, on the warm Triton cache, continuing where it stopped: pytest runs only the tests that did
# not pass, scan.py and gpu_train_step.py --resume keep the rows and models already measured.
#
# Every step writes its results as it goes (the pytest plugin one JSON line per test, scan.py a row,
# gpu_train_step.py a model), so a step killed at its budget keeps what it finished.
# Results go to --out (default $OUT, else out/gpu_check), at most 8 files (what the lent machine
# sends back): summary.json, summary.md, env.txt, pytest.log, scan.json, scan.md, train_step.json
# and logs.tar.gz (every step's full log). The summary is rewritten after each step, so a run cut
# short still reports the steps it finished. Exit status: 0 when every step passed (the optional
# pytest_m16 aside), 1 when one did not, 2 for a usage error.
#
# Options:
#   --only STEPS     comma-separated subset of: env,install,pytest,scan,train,pytest_m16
#   --out DIR        where the results go
#   --wheels DIR     the wheel folder made by `make gpu-wheels` (default .whl)
#   --work DIR       scratch folder: the install target, logs (default: a new temporary folder)
#   --python PY      the interpreter (default python3: on the lent machines, the one with torch)
#   --workers N      pytest-xdist workers for the pytest steps, if xdist is there (default 4; 1: none)
#   --budget SECS    the whole run's limit; steps are cut to what is left (default 480)
#   --step-budget STEP=SECS   one step's own limit (repeatable), e.g. install=300 on a slow machine
#   --no-rerun       do not run a failed step again
#   --smoke          tiny sizes (bench --smoke): checks the plumbing off a GPU; numbers mean nothing
#   --rehearse       no GPU: the Triton kernels under the interpreter (TRITON_INTERPRET=1), scan and
#                    train at tiny sizes (--smoke), pytest's GPU tests collected and skipped,
#                    nvidia-smi only where present; install from --wheels where it holds
#                    requirements.txt, else llm_lru alone from a local wheel folder (its
#                    dependencies from --python's environment). Same budgets, timeouts and reruns
#   --dry-run        list the steps and settings, run nothing
#   -h, --help       this text
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=(env install pytest scan train pytest_m16)
OPTIONAL=" pytest_m16 "  # runs last, only with its whole budget left; its outcome leaves the exit status alone
declare -A BUDGET=([env]=15 [install]=50 [pytest]=170 [scan]=100 [train]=85 [pytest_m16]=290)
declare -A DESC=(
    [env]="nvidia-smi, Python and the image's package versions"
    [install]="wheels + llm_lru into WORK/site (pip --no-index --no-deps --target), pip check, imports"
    [pytest]="pytest -m gpu over the test files that mark gpu tests (fp32 and bf16 parametrised)"
    [scan]="bench/scan.py --quick --dtype bf16: GPU rows, copy bandwidth, fla hgrn at m = 1"
    [train]="bench/gpu_train_step.py: bf16 step of configs/hybrid-125m.yaml vs attention only, both loss routes"
    [pytest_m16]="pytest -m gpu_m16: the m = 16 cases (optional: only with its whole budget left)")
# The steps' budgets (420 s) + RERUN_RESERVE: what a rerun of a failed step can count on.
TOTAL=480
RERUN_RESERVE=60
RERUN=1
REHEARSE=0
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
        --rehearse) REHEARSE=1; SMOKE=1 ;;
        --no-rerun) RERUN=0 ;;
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
    echo "gpu_check.sh: dry run; would run these steps (budget in seconds, ${TOTAL} in all, ${RERUN_RESERVE} of it for reruns):"
    for s in "${SELECTED[@]}"; do printf '  %-10s %4s  %s\n' "$s" "${BUDGET[$s]}" "${DESC[$s]}"; done
    echo "python: $PY; wheels: $WHEELS; work: ${WORK:-a new temporary folder}; out: $OUTDIR; smoke: $SMOKE; rehearse: $REHEARSE; rerun: $RERUN"
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
if [ "$REHEARSE" = 1 ]; then
    # No GPU: the kernels run in the interpreter, and no CUDA device is looked for.
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    if [ ! -f "$WHEELS/requirements.txt" ]; then
        # llm_lru alone (built with --python's setuptools); its dependencies stay where they are.
        WHEELS=$WORK/rehearsal_wheels
        mkdir -p "$WHEELS" && : >"$WHEELS/requirements.txt"
    fi
else
    # The GPU kernels must compile for the device, never run in the interpreter; conftest and
    # bench/scan.py --smoke set it themselves where there is no GPU.
    unset TRITON_INTERPRET
fi
export ROOT PY WHEELS WORK SITE BOOT WORKERS SMOKE REHEARSE

# ---- the steps (each runs in its own bash under `timeout`, output in WORK/<step>.log) -----------

step_env() {
    echo "# date (UTC)"; date -u +%Y-%m-%dT%H:%M:%SZ
    echo "# host"; uname -a; echo "cpus: $(nproc)"
    # one interpreter for Python, torch and triton: each start costs seconds on a busy machine
    env -u PYTHONPATH "$PY" - <<'EOF'
import hashlib, os, sys
print("# python", sys.executable, sys.version, sep="\n")
import torch
print("# torch\ntorch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
# bench/results/gpu_check.md: a Triton cache made elsewhere is found only with this libtriton.so
import triton
print("# triton\ntriton", triton.__version__, triton.__file__, "TRITON_PTXAS_PATH", os.environ.get("TRITON_PTXAS_PATH"))
with open(os.path.join(os.path.dirname(triton.__file__), "_C", "libtriton.so"), "rb") as f:
    print("libtriton.so sha256", hashlib.file_digest(f, "sha256").hexdigest())
EOF
    echo "# the image's packages (pip list, filtered)"
    env -u PYTHONPATH "$PY" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE \
        '^(torch|triton|transformers|tokenizers|safetensors|numpy|pytest|pytest-xdist|einops|ninja|msgpack|psutil|py-cpuinfo|pyyaml|typing.extensions|setuptools|pip|tensorboard|pyarrow|tqdm|packaging|pydantic|deepspeed|flash-linear-attention|fla-core|webdataset|omegaconf) ' || true
    echo "# nvidia-smi"
    if [ "$REHEARSE" = 1 ] && ! command -v nvidia-smi >/dev/null; then echo "(none here: a rehearsal)"; return 0; fi
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
    if [ "$REHEARSE" = 1 ] && ! compgen -G "$WHEELS/build/setuptools-*.whl" >/dev/null; then
        mkdir -p "$WORK/buildtools"  # a rehearsal without wheels: --python's own setuptools builds it
    else
        "${pip[@]}" --target "$WORK/buildtools" "$WHEELS"/build/setuptools-*.whl
    fi
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
    "$PY" - "$SITE" "$WORK/imports.json" "$REHEARSE" <<'EOF'
import importlib, json, os, sys
site = os.path.realpath(sys.argv[1])
out, bad = {}, []
wheels = [] if sys.argv[3] == "1" else ["deepspeed", "fla", "webdataset", "omegaconf", "pydantic"]  # rehearsal: none
for name in wheels + ["llm_lru", "llm_lru.kernels", "llm_lru.models", "llm_lru.train.engine", "torch", "triton",
                      "transformers"]:
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
    cat "$WORK/imports.json"; echo
}

# pytest over the test files that use MARKER; one JSON line per outcome in WORK/NAME.jsonl (a rerun:
# NAME.rerun.jsonl, and only the tests that did not pass or skip in NAME.jsonl).
run_pytest() {
    local marker=$1 name=$2
    cd "$ROOT" || return 1
    local files
    mapfile -t files < <(grep -rlE "mark\.$marker\b" tests --include='test_*.py' | sort)
    [ "${#files[@]}" -gt 0 ] || files=(tests)
    local extra=()
    if [ "$WORKERS" -gt 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then extra+=(-n "$WORKERS"); fi
    mkdir -p "$BOOT"
    cat >"$BOOT/gpu_check_pytest.py" <<'EOF'
"""Written by bench/gpu_check.sh: a pytest plugin that appends one JSON line per test outcome, with
its dtype parameter (ids say dtype0, dtype1 for torch dtypes), to $GPU_CHECK_PYTEST_JSONL, as each
test ends, so that a run cut at its budget still counts what finished. With $GPU_CHECK_PYTEST_DONE
(an earlier attempt's file) the tests that passed or skipped there are deselected: a rerun runs the
rest."""
import json
import os

DTYPES = {"torch.float32": "fp32", "float32": "fp32", "fp32": "fp32",
          "torch.bfloat16": "bf16", "bfloat16": "bf16", "bf16": "bf16"}
_controller = True


def pytest_configure(config):
    global _controller
    _controller = not hasattr(config, "workerinput")  # under xdist the controller alone writes


def _finished(path):
    """The tests that passed or skipped in an earlier attempt's file."""
    last = {}
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return set()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by the step's timeout
        if last.get(rec["test"]) not in ("failed", "error"):  # a teardown error after a pass counts
            last[rec["test"]] = rec["outcome"]
    return {t for t, o in last.items() if o in ("passed", "skipped")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        dtype = next((DTYPES[str(v)] for v in params.values() if str(v) in DTYPES), "other")
        item.user_properties.append(("dtype", dtype))  # travels with the reports from xdist workers
    if os.environ.get("GPU_CHECK_PYTEST_DONE"):
        finished = _finished(os.environ["GPU_CHECK_PYTEST_DONE"])
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid in finished])
        items[:] = [i for i in items if i.nodeid not in finished]


def pytest_runtest_logreport(report):
    if not _controller or not (report.when == "call" or report.outcome != "passed"):
        return
    outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
    rec = {"test": report.nodeid, "outcome": outcome, "when": report.when, "seconds": round(report.duration, 3),
           "dtype": dict(report.user_properties).get("dtype", "other")}
    with open(os.environ["GPU_CHECK_PYTEST_JSONL"], "a") as f:
        f.write(json.dumps(rec) + "\n")
EOF
    local jsonl=$WORK/$name.jsonl done=""
    if [ "$ATTEMPT" -gt 1 ]; then done=$jsonl; jsonl=$WORK/$name.rerun.jsonl; fi
    echo "# $PY -m pytest -m $marker ${extra[*]} ${files[*]}${done:+ (rerun: the tests that did not pass)}"
    # -v: one line per test as it ends, so a run cut at its budget still shows what passed.
    GPU_CHECK_PYTEST_JSONL=$jsonl GPU_CHECK_PYTEST_DONE=$done "$PY" -m pytest -p gpu_check_pytest -m "$marker" -v \
        -rfE --durations=15 --continue-on-collection-errors "${extra[@]}" "${files[@]}"
}

step_pytest() { run_pytest gpu pytest_results; }
step_pytest_m16() { run_pytest gpu_m16 pytest_m16_results; }

# scan.py and gpu_train_step.py write their results as they go; a rerun keeps what they measured.
step_scan() {
    cd "$ROOT" || return 1
    local args=(--out "$WORK/scan.json")
    if [ "$SMOKE" = 1 ]; then args+=(--smoke); else args+=(--quick --dtype bf16); fi
    if [ "$ATTEMPT" -gt 1 ]; then args+=(--resume); fi
    "$PY" bench/scan.py "${args[@]}"
}

step_train() {
    cd "$ROOT" || return 1
    local args=(--config configs/hybrid-125m.yaml --out "$WORK/train_step.json")
    if [ "$SMOKE" = 1 ]; then args+=(--smoke); fi
    if [ "$ATTEMPT" -gt 1 ]; then args+=(--resume); fi
    "$PY" bench/gpu_train_step.py "${args[@]}"
}
export -f step_env step_install run_pytest step_pytest step_pytest_m16 step_scan step_train

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
    name, status, rc, secs, budget, note, attempt, optional = line.split("\t")
    steps.append(dict(step=name, attempt=int(attempt), status=status, rc=int(rc), seconds=int(secs), budget=int(budget),
                      note=note, optional=optional == "1"))
last = {s["step"]: s for s in steps}  # a rerun's outcome is the step's
summary = {"steps": steps, "total_budget_s": total,
           "passed": all(s["status"] == "ok" for s in last.values() if not s["optional"])}
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
md += ["", "| step | attempt | status | seconds | budget | note |", "|---|---|---|---|---|---|"]
md += [f"| {s['step']}{' (optional)' if s['optional'] else ''} | {s['attempt']} | {s['status']} | {s['seconds']} "
       f"| {s['budget']} | {s['note']} |" for s in steps]

def pytest_outcomes(name):
    """test -> (outcome, dtype) over NAME.jsonl and its rerun's NAME.rerun.jsonl (the rerun's word last)."""
    outcome, dtype = {}, {}
    for path in (work / f"{name}.jsonl", work / f"{name}.rerun.jsonl"):
        if not path.is_file():
            continue
        seen = {}
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by the step's timeout
            if seen.get(rec["test"]) not in ("failed", "error"):  # a teardown error after a pass counts
                seen[rec["test"]] = rec["outcome"]
            dtype[rec["test"]] = rec["dtype"]
        outcome.update(seen)
    return outcome, dtype


for name, key, title in (("pytest_results", "pytest", "pytest -m gpu"),
                         ("pytest_m16_results", "pytest_m16", "pytest -m gpu_m16 (optional)")):
    outcome, dtype = pytest_outcomes(name)
    if not outcome:
        continue
    by_dtype = {}
    for test, res in outcome.items():
        by_dtype.setdefault(dtype[test], Counter())[res] += 1
    failed = sorted(t for t, r in outcome.items() if r in ("failed", "error"))
    summary[key] = dict(by_dtype={d: dict(c) for d, c in sorted(by_dtype.items())}, failed=failed, tests=len(outcome))
    md += ["", f"## {title}", ""]
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
    statuses = Counter(r.get("status", "?").split(":")[0] for r in scan["rows"] if "ratio" not in r)
    summary["scan"] = dict(rows=dict(statuses), copy_GBps=copy, triton_best_frac_copy={f"{k}/m={m}/{mode}": v for (k, m, mode), v in sorted(best.items())},
                           fla_hgrn_over_triton_time=[dict(T=r["T"], BN=r["BN"], mode=r["mode"], value=r["value"]) for r in fla])
    md += ["", "## bench/scan.py (bf16, --quick; full rows in scan.md)", "",
           "Rows: " + ", ".join(f"{n} {st}" for st, n in sorted(statuses.items())) + "."]
    md.append(f"Copy bandwidth: {copy:.0f} GB/s (read + write)." if copy else "Copy bandwidth: not measured.")
    md += [f"- triton {k} m={m} {mode}: best {v:.0%} of copy bandwidth" for (k, m, mode), v in sorted(best.items())]
    md += [f"- fla hgrn / triton time at m = 1, T={r['T']}, BxN={r['BN']} {r['mode']}: {r['value']:.2f}" for r in fla]

train = load("train_step.json")
if train:
    summary["train"] = dict(meta=train["meta"], ratios=train["ratios"], loss_routes=train.get("loss_routes"), models=[
        {k: r.get(k) for k in ("name", "pattern", "n_params", "status", "step_time_s", "tokens_per_s", "mfu",
                               "mfu_vs_measured_matmul", "peak_memory_gib", "loss_first", "loss_last", "loss_path",
                               "loss_route")}
        for r in train["models"]])
    tmd = work / "train_step.md"
    if tmd.is_file():
        md += ["", "## " + tmd.read_text().split("\n", 1)[0].lstrip("# ")] + tmd.read_text().split("\n")[1:]

for s in steps:
    log = work / (f"{s['step']}.log" if s["attempt"] == 1 else f"{s['step']}.rerun.log")
    if s["status"] not in ("ok", "skipped") and log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        md += ["", f"## {s['step']} (attempt {s['attempt']}): {s['status']} (last lines of its log)", "", "```"] + tail + ["```"]

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

# run_step NAME ATTEMPT LIMIT: one attempt of a step under min(its budget, LIMIT) seconds.
run_step() {
    local name=$1 attempt=$2 budget=${BUDGET[$1]} left=$3 t0 rc status note="" log=$WORK/$1.log optional=0
    [[ $OPTIONAL == *" $name "* ]] && optional=1
    [ "$attempt" = 1 ] || { log=$WORK/$name.rerun.log; note="rerun"; }
    if [ "$optional" = 1 ] && [ "$budget" -gt "$left" ]; then
        # compiling is most of its budget: cut short it would measure nothing
        printf '%s\tskipped\t0\t0\t%s\t%s\t%s\t%s\n' "$name" "$budget" "needs ${budget} s, ${left} s left" \
            "$attempt" 1 >>"$WORK/steps.tsv"
        echo "== $name: skipped, needs ${budget} s, ${left} s left"
        publish
        return
    fi
    if [ "$budget" -gt "$left" ]; then budget=$left; note="${note:+$note, }cut to the time left"; fi
    if [ "$budget" -lt 5 ]; then
        printf '%s\tskipped\t0\t0\t%s\t%s\t%s\t%s\n' "$name" "$budget" "no time left of ${TOTAL} s" "$attempt" \
            "$optional" >>"$WORK/steps.tsv"
        echo "== $name: skipped, no time left"
        LAST_STATUS[$name]=skipped
        publish
        return
    fi
    echo "== $name${note:+ ($note)} (budget ${budget} s): ${DESC[$name]}"
    t0=$(date +%s)
    # timeout signals the whole process group: pytest workers and compilers go with it.
    ATTEMPT=$attempt timeout --kill-after=10 "$budget" bash -c "step_$name" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="${note:+$note, }killed at ${budget} s" ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$budget" "$note" \
        "$attempt" "$optional" >>"$WORK/steps.tsv"
    echo "== $name: $status (exit $rc, $(($(date +%s) - t0)) s)"
    LAST_STATUS[$name]=$status
    publish
}

time_left() { echo $((DEADLINE - $(date +%s))); }

declare -A LAST_STATUS=()
DEADLINE=$(($(date +%s) + TOTAL))
RESERVE=$((RERUN == 1 ? RERUN_RESERVE : 0))
echo "gpu_check.sh: steps ${SELECTED[*]}; work $WORK; results $OUTDIR"
# The steps, leaving RESERVE seconds for reruns; then a rerun of each that failed, on the warm
# caches and from where it stopped; then the optional steps with what is left.
for s in "${SELECTED[@]}"; do
    [[ $OPTIONAL == *" $s "* ]] || run_step "$s" 1 $(($(time_left) - RESERVE))
done
if [ "$RERUN" = 1 ]; then
    for s in "${SELECTED[@]}"; do
        case ${LAST_STATUS[$s]:-} in failed|timeout) run_step "$s" 2 "$(time_left)" ;; esac
    done
fi
for s in "${SELECTED[@]}"; do
    [[ $OPTIONAL != *" $s "* ]] || run_step "$s" 1 "$(time_left)"
done
echo
cat "$OUTDIR/summary.md" 2>/dev/null
for s in "${SELECTED[@]}"; do
    [[ $OPTIONAL == *" $s "* ]] || [ "${LAST_STATUS[$s]:-}" = ok ] || exit 1
done
exit 0
