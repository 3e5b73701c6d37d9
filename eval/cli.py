"""`llm-lru eval RUN_DIR|CHECKPOINT|EXPORT_DIR --suite a,b --out DIR [eval.key=value ...]`
and `llm-lru eval --sweep SWEEP.yaml --out DIR` (the recall lab, llm_lru.lab).

Suites: ppl, passkey, niah, lm-eval, and task | mqar | state-tracking | selective-copy (a
checkpoint trained on a synthetic task, scored on fresh samples of it). Settings
are the `eval` section of the config schema (llm_lru.config.EvalConfig): the run's own, then
`key=value` overrides (with or without the `eval.` prefix). Writes DIR/report.json,
DIR/report.md and the suites' PNG plots; a progress bar per suite on stderr.

Under torchrun (WORLD_SIZE = K > 1) the long-context suites (ppl, passkey, niah) run with
sequence parallelism over all K ranks (sp = K, dp = 1): each prefill chunk is split into K
slices, one per rank (llm_lru.eval.prefill). Every rank runs the same loop; rank 0 alone shows
the progress bars and writes the report and plots. Results equal the one-process run.

    torchrun --nproc_per_node 4 -m llm_lru.cli eval RUN_DIR --suite ppl,passkey,niah --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from llm_lru.config import ConfigError, EvalConfig

SUITES = {"ppl": ("llm_lru.eval.ppl", "run"), "passkey": ("llm_lru.eval.passkey", "run"),
          "niah": ("llm_lru.eval.niah", "run"), "lm-eval": ("llm_lru.eval.lmeval", "run"),
          "task": ("llm_lru.eval.task", "run_suite"), "mqar": ("llm_lru.eval.task", "run_mqar"),
          "state-tracking": ("llm_lru.eval.task", "run_state_tracking"),
          "selective-copy": ("llm_lru.eval.task", "run_selective_copy")}
# Suites whose loops run through chunked prefill, and so under sequence parallelism.
SP_SUITES = ("ppl", "passkey", "niah")


def check_sp_suites(ecfg: EvalConfig, world: int) -> None:
    """Refuse, before any collective, suites that cannot run split over `world` > 1 ranks."""
    if world <= 1:
        return
    bad = [s for s in ecfg.suites if s not in SP_SUITES]
    if bad:
        raise ConfigError(f"eval.suites: {', '.join(bad)} cannot run under sequence parallelism "
                          f"(WORLD_SIZE={world}); only {', '.join(SP_SUITES)} can. Run the others as one "
                          "process (without torchrun)")


def eval_config(base: Optional[EvalConfig], overrides: List[str]) -> EvalConfig:
    """base (a run's eval section, or defaults) + `key=value` overrides, validated."""
    cfg = OmegaConf.structured(base or EvalConfig())
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        items.append(item[len("eval."):] if item.startswith("eval.") else item)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))
    except oc_errors.ConfigKeyError as e:
        raise ConfigError(f"override: unknown key 'eval.{e.full_key}'") from None
    except oc_errors.ValidationError as e:
        raise ConfigError(f"override: wrong type for 'eval.{e.full_key}': {e.msg.splitlines()[0]}") from None
    ecfg: EvalConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if ecfg.chunk_size <= 0:
        raise ConfigError(f"eval.chunk_size: must be positive, got {ecfg.chunk_size}")
    for s in ecfg.suites:
        if s not in SUITES:
            raise ConfigError(f"eval.suites: unknown suite '{s}' (one of {', '.join(SUITES)})")
    return ecfg


def run_suites(target, ecfg: EvalConfig, out: Path) -> List[Dict[str, Any]]:
    """Run each suite of ecfg.suites; a failing suite is reported (with its error) and the rest run."""
    if getattr(target, "is_main", True):
        out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in ecfg.suites:
        module, fn = SUITES[name]
        t0 = time.time()
        try:
            results.append(getattr(importlib.import_module(module), fn)(target, ecfg, out))
        except Exception as e:  # noqa: BLE001 - one suite's failure must not lose the others
            traceback.print_exc()
            results.append({"suite": name, "error": f"{type(e).__name__}: {e}"})
        results[-1]["seconds"] = round(time.time() - t0, 3)
    return results


def parse(argv: List[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="llm-lru eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", nargs="?", help="run dir, checkpoint dir or exported model folder")
    ap.add_argument("overrides", nargs="*", help="eval settings: key=value (see llm_lru.config.EvalConfig)")
    ap.add_argument("--suite", default="", help="comma-separated: " + ",".join(SUITES))
    ap.add_argument("--out", default="", help="report folder (eval.out)")
    ap.add_argument("--tokenizer", default="", help="bytes | PREP_DIR | tokenizer.json (default: the model's)")
    ap.add_argument("--chunk-size", type=int, default=0, help="tokens per prefill chunk (eval.chunk_size)")
    ap.add_argument("--max-length", type=int, default=0, help="leave out lengths above this (eval.max_length)")
    ap.add_argument("--sweep", default="", help="a recall sweep YAML (configs/sweeps/): train and score its runs")
    ap.add_argument("--sp", type=int, default=0,
                    help="sequence-parallel size under torchrun (default and only choice: WORLD_SIZE)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_intermixed_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.overrides)
    if args.suite:
        overrides.append(f"suites=[{args.suite}]")
    for flag, key in ((args.out, "out"), (args.tokenizer, "tokenizer"), (args.chunk_size, "chunk_size"),
                      (args.max_length, "max_length")):
        if flag:
            overrides.append(f"{key}={flag}")
    if args.no_progress:
        overrides.append("progress=false")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.sp and args.sp != world:
        raise ConfigError(f"--sp {args.sp}: eval splits each chunk over the whole world (sp = WORLD_SIZE = "
                          f"{world}, dp = 1; data parallelism over prompts is not built): launch "
                          f"{args.sp} processes or leave out --sp")
    if args.sweep:
        if world > 1:
            raise ConfigError(f"--sweep trains and scores runs one process at a time; run it without "
                              f"torchrun (WORLD_SIZE={world})")
        return run_sweep_cli(args.sweep, eval_config(None, overrides))
    if not args.target:
        raise ConfigError("target: name a run dir, checkpoint or export folder (or --sweep FILE)")
    ecfg = eval_config(None, overrides)  # checks the overrides before the (slow) model load
    check_sp_suites(ecfg, world)
    if world == 1:
        return evaluate(args.target, ecfg, overrides, None)
    import torch.distributed as dist

    from llm_lru.parallel import init_mesh

    started = not dist.is_initialized()
    mesh = init_mesh(sp=world)  # under torchrun: join the job the way the trainer does
    try:
        return evaluate(args.target, ecfg, overrides, mesh)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def evaluate(target_path: str, ecfg: EvalConfig, overrides: List[str], mesh) -> int:
    """Load the target (split over mesh's SP group when sp > 1), run the suites, write the report
    (rank 0); returns the exit status, the same on every rank."""
    from .load import load_target, parallelize_target

    target = load_target(target_path, ecfg.tokenizer or None)
    if target.cfg is not None:
        ecfg = eval_config(target.cfg.eval, overrides)
    if not ecfg.suites:
        raise ConfigError(f"eval.suites: none chosen; pass --suite {','.join(SUITES)}")
    if not ecfg.out:
        raise ConfigError("eval.out: pass --out DIR")
    if mesh is not None:
        check_sp_suites(ecfg, mesh.world_size)  # the run's own eval.suites too
        parallelize_target(target, mesh)
    from .report import write_report

    results = run_suites(target, ecfg, Path(ecfg.out))
    failed = [r["suite"] for r in results if r.get("error")]
    if target.is_main:
        model_info = {**target.info, "kinds": list(target.model.kinds), "d_model": target.model.cfg.d_model,
                      "params": target.model.num_params(), "train_len": target.train_len,
                      "eval": dataclasses.asdict(ecfg), "sp": mesh.sp if mesh is not None else 1}
        write_report(Path(ecfg.out), str(target_path), model_info, results)
        print(f"llm-lru eval: wrote {Path(ecfg.out) / 'report.md'}"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def run_sweep_cli(path: str, ecfg: EvalConfig) -> int:
    """Train and score a recall sweep; writes DIR/recall.json and DIR/report.md."""
    import json

    from llm_lru.lab import run_sweep
    from .report import write_report

    if not ecfg.out:
        raise ConfigError("eval.out: pass --out DIR")
    sweep = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    out = Path(ecfg.out)

    def save(results):
        out.mkdir(parents=True, exist_ok=True)
        (out / "recall.json").write_text(json.dumps(results, indent=1, default=str))

    res = run_sweep(sweep, out / "runs", sweep.get("eval_samples", ecfg.task_samples), on_result=save,
                    show_progress=ecfg.progress)
    write_report(out, path, {"sweep": path}, [{"suite": "recall-sweep", "metrics": {}, "tables": [res["table"]],
                                               "plots": [], "settings": {"runs": len(res["results"])}}])
    print(f"llm-lru eval: wrote {out / 'report.md'}")
    return 0
