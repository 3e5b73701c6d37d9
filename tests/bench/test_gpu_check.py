"""The parts of the prepared GPU check (bench/gpu_check.sh, bench/gpu_train_step.py, `make
gpu-wheels`) that run without a GPU: argument handling, step bookkeeping, the budgets in the
script's header, the CPU rehearsal (--rehearse: every step's code path, a step killed by its
timeout and rerun), the offline install from .whl/, and one training step of a tiny model on CPU."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_lru.config import DEFAULT_KINDS, load_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
WHEELS = ROOT / ".whl"
STEPS = ["env", "install", "pytest", "scan", "train", "pytest_m16"]
MANDATORY = STEPS[:-1]


def check(*args, **kw):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, **kw)


def summary_steps(out):
    """(step, attempt, status) of every attempt, in order."""
    return [(s["step"], s["attempt"], s["status"]) for s in json.loads((out / "summary.json").read_text())["steps"]]


def train_step_module():
    spec = importlib.util.spec_from_file_location("gpu_train_step", ROOT / "bench" / "gpu_train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- bench/gpu_check.sh: arguments --------------------------------------------------------------

def test_help_names_every_step_and_option():
    r = check("--help")
    assert r.returncode == 0, r.stderr
    for word in STEPS + ["--dry-run", "--only", "--out", "--wheels", "--python", "--budget", "--step-budget"]:
        assert re.search(rf"(^|\s){re.escape(word)}\s", r.stdout), word


def test_dry_run_lists_the_steps_within_eight_minutes_and_runs_nothing(tmp_path):
    r = check("--dry-run", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    budgets = dict(re.findall(r"^  (\w+)\s+(\d+)  ", r.stdout, re.M))
    assert list(budgets) == STEPS
    total = int(re.search(r"(\d+) in all", r.stdout).group(1))
    reserve = int(re.search(r"(\d+) of it for reruns", r.stdout).group(1))
    assert sum(int(budgets[s]) for s in MANDATORY) + reserve <= total <= 8 * 60 and reserve >= 60
    assert not (tmp_path / "out").exists()

    r = check("--dry-run", "--only", "train,pytest")
    assert r.returncode == 0, r.stderr
    assert re.findall(r"^  (\w+)\s+\d+  ", r.stdout, re.M) == ["train", "pytest"]


def header_budgets():
    """step -> (budget, its terms) from the script's header lines `#   step  N = a + b + ...`."""
    head = SCRIPT.read_text().split("set -uo pipefail")[0]
    out, step = {}, None
    for line in head.splitlines():
        m = re.match(r"#   (\w+)\s+(\d+) = (.*)", line)
        if m:
            step = m.group(1)
            out[step] = [int(m.group(2)), m.group(3)]
        elif step and re.match(r"#\s{10,}", line):
            out[step][1] += " " + line
        else:
            step = None
    # the terms: the numbers after "=" or "+" before the colon that starts the step's description
    return {k: (b, [int(x) for x in re.findall(r"(?:^|\s[=+])\s*~?(\d+)", " " + terms.split(":")[0])])
            for k, (b, terms) in out.items()}


def test_header_budgets_add_up_from_the_measured_compile_times():
    budgets = header_budgets()
    assert list(budgets) == STEPS
    for step, (budget, terms) in budgets.items():
        assert sum(terms) == budget, (step, terms)
    r = check("--dry-run")
    listed = dict(re.findall(r"^  (\w+)\s+(\d+)  ", r.stdout, re.M))
    assert {k: int(v) for k, v in listed.items()} == {k: b for k, (b, _) in budgets.items()}
    assert sum(budgets[s][0] for s in MANDATORY) + 60 <= 480
    # the Triton terms are bench/gpu_check_budget.py's sums over triton_resources.csv
    spec = importlib.util.spec_from_file_location("gpu_check_budget", ROOT / "bench" / "gpu_check_budget.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    worst = mod.compile_seconds(ROOT / "bench" / "results" / "triton_resources.csv")
    head = SCRIPT.read_text().split("set -uo pipefail")[0]
    for step, variants in mod.step_variants().items():
        n, secs, missing = mod.price(variants, worst)
        assert not missing, (step, missing)
        assert re.search(rf"\b{n} variants", head) and re.search(rf"\b{secs:.0f}\b", head), (step, n, secs)


@pytest.mark.parametrize("args, named", [
    (["--frobnicate"], "--frobnicate"),
    (["--only", "env,gpu_burn"], "gpu_burn"),
    (["--workers", "four"], "--workers"),
    (["--budget", "-1"], "--budget"),
    (["--out"], "--out"),
    (["--out", "--dry-run"], "--out"),
    (["--step-budget", "burn=30"], "burn"),
])
def test_bad_arguments_are_usage_errors_naming_the_argument(args, named, tmp_path):
    r = check("--work", str(tmp_path / "work"), *args)
    assert r.returncode == 2
    assert named in r.stderr
    assert not (tmp_path / "work").exists()


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path):
    """install without wheels fails at once; env still runs (and fails where nvidia-smi is missing)."""
    out = tmp_path / "out"
    r = check("--only", "install,env", "--step-budget", "env=60", "--wheels", str(tmp_path / "no-wheels"),
              "--python", sys.executable, "--work", str(tmp_path / "work"), "--out", str(out), timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}  # the last attempt of each
    assert list(steps) == ["install", "env"]
    assert steps["install"]["status"] == "failed" and steps["install"]["rc"] == 3
    has_smi = shutil.which("nvidia-smi") is not None
    assert steps["env"]["status"] == ("ok" if has_smi else "failed")
    # each failed step ran once more, after the others
    env_status = "ok" if has_smi else "failed"
    assert summary_steps(out) == [("install", 1, "failed"), ("env", 1, env_status), ("install", 2, "failed")] + \
        ([] if has_smi else [("env", 2, "failed")])  # env=60: a busy CPU machine, not a hung step
    env = (out / "env.txt").read_text()
    assert f"torch {torch.__version__}" in env
    md = (out / "summary.md").read_text()
    assert "| install | 1 | failed |" in md and "make gpu-wheels" in md  # the failing log's tail, with the hint
    assert len(list(out.iterdir())) <= 8  # what a lent machine sends back


def test_no_rerun_runs_a_failed_step_once(tmp_path):
    out = tmp_path / "out"
    r = check("--only", "install", "--no-rerun", "--wheels", str(tmp_path / "no-wheels"), "--python", sys.executable,
              "--work", str(tmp_path / "work"), "--out", str(out), timeout=120)
    assert r.returncode == 1
    assert summary_steps(out) == [("install", 1, "failed")]


def test_steps_past_the_whole_budget_are_skipped(tmp_path):
    out = tmp_path / "out"
    r = check("--only", "install", "--budget", "3", "--wheels", str(tmp_path / "no-wheels"),
              "--python", sys.executable, "--work", str(tmp_path / "work"), "--out", str(out), timeout=120)
    assert r.returncode == 1
    (step,) = json.loads((out / "summary.json").read_text())["steps"]
    assert step["status"] == "skipped" and "no time left" in step["note"]
    assert not (tmp_path / "work" / "install.log").exists()


@pytest.mark.slow
def test_pytest_step_counts_outcomes_per_dtype(tmp_path):
    """The GPU tests' fp32 and bf16 cases are told apart (their ids say dtype0, dtype1)."""
    out = tmp_path / "out"
    r = check("--only", "pytest", "--workers", "1", "--python", sys.executable, "--work", str(tmp_path / "work"),
              "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    counts = json.loads((out / "summary.json").read_text())["pytest"]["by_dtype"]
    # tests/kernels/test_triton_gpu.py alone has 17 cases of each dtype under -m gpu (2 x 4 + 2 x 4 + 1)
    assert sum(counts["fp32"].values()) >= 17 and sum(counts["bf16"].values()) >= 17
    if not torch.cuda.is_available():
        assert {outcome for c in counts.values() for outcome in c} == {"skipped"}
    assert "fp32" in (out / "summary.md").read_text()


# ---- the wheels: make gpu-wheels, then an offline install into an empty folder -------------------

def lock_pins():
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", line)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


@pytest.mark.slow
def test_wheels_install_offline_into_an_empty_folder_and_import(tmp_path):
    if not (WHEELS / "requirements.txt").is_file():
        r = subprocess.run(["make", "gpu-wheels"], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wanted = dict(line.split("==") for line in (WHEELS / "requirements.txt").read_text().split())
    assert {"deepspeed", "flash-linear-attention", "fla-core", "webdataset", "omegaconf", "pydantic"} <= set(wanted)
    locked = lock_pins()
    assert {k: v for k, v in wanted.items() if k in locked} == {k: locked[k] for k in wanted if k in locked}
    size = sum(p.stat().st_size for p in WHEELS.rglob("*") if p.is_file())
    assert size < 64 << 20

    egg = ROOT / "llm_lru.egg-info"   # `make setup`'s editable install keeps one in the tree
    egg_before = egg.stat().st_mtime_ns if egg.exists() else None
    work, out = tmp_path / "work", tmp_path / "out"
    # a shared CPU machine: more time than the GPU machine's budget, not less work
    r = check("--only", "install", "--step-budget", "install=600", "--budget", "900", "--python", sys.executable,
              "--work", str(work), "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    site = work / "site"
    # Independently of the script's own import check: a fresh interpreter with only the target
    # folder added finds llm_lru and its dependencies there, and torch where it was.
    code = ("import json, deepspeed, fla, webdataset, omegaconf, llm_lru.kernels, llm_lru.models, torch\n"
            "print(json.dumps({m.__name__: m.__file__ for m in (deepspeed, fla, webdataset, omegaconf,"
            " llm_lru.kernels, llm_lru.models, torch)}))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = json.loads(r.stdout.strip().splitlines()[-1])
    for name, path in files.items():
        assert Path(path).is_relative_to(site) == (name != "torch"), (name, path)
    # the build ran on a copy: it neither made nor touched the tree's egg-info
    assert (egg.stat().st_mtime_ns if egg.exists() else None) == egg_before


# ---- bench/gpu_train_step.py --------------------------------------------------------------------

def test_train_step_smoke_reports_both_models(tmp_path):
    mod = train_step_module()
    out = tmp_path / "step.json"
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    meta, rows = result["meta"], {r["name"]: r for r in result["models"]}
    assert meta["smoke"] and meta["dtype"] == "bf16"
    hyb, att = rows["hybrid"], rows["attention"]
    pattern = load_config(ROOT / "configs" / "hybrid-125m.yaml").model.pattern
    kinds = [DEFAULT_KINDS[c] for c in pattern]  # --smoke: one round of the config's pattern
    assert hyb["layers"] == kinds and hyb["pattern"] == pattern
    assert att["layers"] == ["attn"] * len(kinds) and att["d_model"] == hyb["d_model"] == 64
    assert "swa" not in kinds  # the FLOP count below assumes full attention
    B, T, d = meta["micro_batch"], meta["seq_len"], 64
    for row, n_attn in ((hyb, kinds.count("attn")), (att, len(kinds))):
        assert row["tokens_per_step"] == B * T
        assert row["tokens_per_s"] == pytest.approx(B * T / row["step_time_s"])
        # training FLOPs per token: 6 N plus the attention scores and values (12 d T / 2 per layer)
        assert row["flops_per_token"] == pytest.approx(6 * row["n_params"] + 12 * n_attn * d * T / 2)
        assert row["loss_last"] < row["loss_first"]  # the steps train: the same batch, lower loss
        assert row["peak_memory_gib"] > 0 and len(row["step_times_s"]) == meta["steps"]
        if not torch.cuda.is_available():
            assert row["mfu"] is None
    assert result["ratios"][0]["value"] == pytest.approx(hyb["tokens_per_s"] / att["tokens_per_s"])
    assert "| hybrid | BBBA |" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_train_step_without_gpu_writes_nothing(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert train_step_module().main(["--out", str(out)]) == 0
    assert not out.exists() and "no CUDA device" in capsys.readouterr().out


def test_train_step_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        train_step_module().main(["--smoke", "--steps", "0", "--out", str(tmp_path / "x.json")])


# ---- bench/gpu_check.sh --rehearse: every step on CPU, tiny sizes, the Triton interpreter --------


@pytest.mark.slow
def test_rehearsal_runs_every_step_on_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # env's 15 s hold on the GPU machine; this shared 2-core one, at a load of 16, needs more for
    # its three interpreter starts (the same work, more time, as for install below)
    r = check("--rehearse", "--workers", "1", "--step-budget", "env=60", "--python", sys.executable,
              "--work", str(work), "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    steps = summary_steps(out)
    assert [s for s, attempt, _ in steps if attempt == 1] == STEPS
    # every step ends ok, at worst on its rerun (this machine is shared: a load spike can cost a timeout)
    last = {s: status for s, _, status in steps}
    assert all(last[s] == "ok" for s in MANDATORY), steps
    assert last["pytest_m16"] in ("ok", "skipped")  # optional: only with its whole budget left
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"]
    # install: llm_lru built from a copy of the tree into WORK/site and imported from there
    imports = json.loads((work / "imports.json").read_text())
    assert imports["llm_lru.kernels"]["file"].startswith(str(work / "site"))
    # pytest: the GPU tests collected, none run here (no CUDA), fp32 and bf16 told apart
    counts = summary["pytest"]["by_dtype"]
    assert {o for c in counts.values() for o in c} == {"skipped"} and sum(counts["fp32"].values()) >= 17
    # scan: the Triton rows ran through the kernels (interpreter), chunked, at tiny sizes
    scan = json.loads((out / "scan.json").read_text())
    triton = [x for x in scan["rows"] if x.get("impl") == "triton"]
    assert {x["kind"] for x in triton} == {"diag", "bdlru", "hlru", "block"}
    assert all(x["status"].startswith("smoke") and x["chunk"] < x["T"] for x in triton)
    # train: both models stepped; the loss routes timed; the trainer's route named
    train = json.loads((out / "train_step.json").read_text())
    assert [x["name"] for x in train["models"]] == ["hybrid", "attention"]
    assert train["loss_routes"]["trainer_route"] == "chunked" == train["models"][0]["loss_route"]
    assert "time_s" in train["loss_routes"]["routes"]["chunked"]
    assert len(list(out.iterdir())) <= 8


HANG_AFTER_WRITES = """
import os, time
_replace, _writes = os.replace, [0]
def replace(src, dst, *a, **k):
    _replace(src, dst, *a, **k)
    if str(dst).endswith("scan.json"):
        _writes[0] += 1
        if _writes[0] >= {n}:
            time.sleep(3600)  # a step that outlives its budget
os.replace = replace
"""


@pytest.mark.slow
def test_a_step_killed_by_its_timeout_keeps_its_rows_and_its_rerun_resumes(tmp_path):
    """scan.py is made to hang after its third row; the step's timeout kills it, the summary says
    timeout, scan.json keeps the three rows, and the rerun keeps them and adds three more."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_AFTER_WRITES.format(n=3))
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(hook)}
    r = check("--rehearse", "--only", "scan", "--step-budget", "scan=30", "--python", sys.executable,
              "--work", str(work), "--out", str(out), env=env, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert summary_steps(out) == [("scan", 1, "timeout"), ("scan", 2, "timeout")]
    rows = json.loads((out / "scan.json").read_text())["rows"]
    keys = [(x["kind"], x["impl"], x["mode"], x["m"]) for x in rows]
    assert len(keys) == 6 == len(set(keys))
    assert "--resume: 3 rows kept" in (work / "scan.rerun.log").read_text()
    md = (out / "summary.md").read_text()
    assert "| scan | 1 | timeout |" in md and "killed at 30 s" in md


FLAKY_GPU_TESTS = '''
import os
from pathlib import Path

import pytest


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_passes(dtype):
    pass


@pytest.mark.gpu
def test_fails_the_first_time():
    seen = Path(os.environ["FLAKY_MARK"])
    first = not seen.exists()
    seen.touch()
    assert not first
'''


def test_pytest_rerun_runs_only_the_tests_that_did_not_pass(tmp_path):
    """A copy of the script in a tree whose one GPU test fails once: the rerun deselects the two
    that passed, runs the third, and the summary counts all three as passed."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "tests").mkdir()
    shutil.copy(SCRIPT, repo / "bench" / "gpu_check.sh")
    (repo / "tests" / "test_flaky.py").write_text(FLAKY_GPU_TESTS)
    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), "--only", "pytest", "--workers", "1",
                        "--python", sys.executable, "--work", str(work), "--out", str(out)], cwd=repo,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "FLAKY_MARK": str(tmp_path / "seen")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert summary_steps(out) == [("pytest", 1, "failed"), ("pytest", 2, "ok")]
    rerun = [json.loads(line)["test"] for line in (work / "pytest_results.rerun.jsonl").read_text().splitlines()]
    assert rerun == ["tests/test_flaky.py::test_fails_the_first_time"]
    summary = json.loads((out / "summary.json").read_text())["pytest"]
    assert summary["tests"] == 3 and summary["failed"] == []
    assert summary["by_dtype"] == {"fp32": {"passed": 1}, "bf16": {"passed": 1}, "other": {"passed": 1}}


def test_train_step_loss_routes_time_the_trainers_route_and_match_the_reference():
    """On CPU the chunked route is the trainer's; its loss over several chunks is the full-logits
    reference's on the same batch (rebuilt here from the same seed), and fla is named, not run."""
    import argparse
    from llm_lru.kernels.loss.reference import linear_cross_entropy_reference
    mod = train_step_module()
    mcfg = mod.load_run(str(ROOT / "configs" / "hybrid-125m.yaml"), smoke=True).model
    mcfg = mod.dataclasses.replace(mcfg, vocab_size=300)
    args = argparse.Namespace(dtype="fp32", micro_batch=2, seq_len=50, warmup=1, steps=2, smoke=True)
    got = mod.loss_routes(mcfg, args, torch.device("cpu"), chunk_tokens=32)
    assert got["trainer_route"] == "chunked" and got["routes"]["fla"]["status"].startswith("not run")
    g = torch.Generator().manual_seed(0)
    M, D, V = 100, mcfg.d_model, 300
    hidden = torch.randn(M, D, generator=g)
    weight = torch.randn(V, D, generator=g) * D ** -0.5
    labels = torch.randint(0, V, (M,), generator=g)
    labels[::97] = -100
    ref = linear_cross_entropy_reference(hidden.double(), weight.double(), labels, reduction="sum")
    assert got["routes"]["chunked"]["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert got["routes"]["chunked"]["time_s"] > 0 and got["tokens"] == M
