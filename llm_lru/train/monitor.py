"""Rank-0 training logs: metrics.jsonl, TensorBoard scalars, W&B (logging.wandb), a progress bar or plain lines.

    mon = Monitor(cfg, run_dir, start_step, enabled=(rank == 0))
    mon.log(step, {"loss": ..., "lr": ..., ...})    # once per optimizer step
    mon.close()

On a terminal (or logging.progress=bar) a tqdm bar shows loss and ETA; otherwise (a log file,
SLURM, CI) one plain line per `logging.log_every` steps, with its own ETA.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from llm_lru.config import ModelConfig, RunConfig, layer_kinds

# Dense bf16 peak FLOP/s by device-name fragment, for the MFU estimate (GPU only).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def flops_per_token(model: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the weights plus the attention score/value matmuls.

    The recurrent scans are linear in T and small next to the matmuls; they are left out.
    """
    n_attn = sum(k in ("attn", "swa") for k in layer_kinds(model))
    ctx = min(seq_len, model.window) if "swa" in layer_kinds(model) else seq_len
    return 6.0 * n_params + 12.0 * n_attn * model.d_model * ctx / 2


def peak_flops() -> Optional[float]:
    """Per-GPU bf16 peak, or None off GPU / on an unknown device."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def memory_gb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU (GiB), imports included."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _vm_hwm() -> int:
    """This process's peak RSS since it started or since the last _reset_vm_hwm (bytes)."""
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")), 0)


def _reset_vm_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # "5": VmHWM restarts from the current RSS
        f.write("5")


class MemoryMeter:
    """Each step's peak memory above what the process held before the run built anything, the
    figure `llm-lru plan` predicts (its total, without the GPU reserve).

        meter = MemoryMeter()             # before the model exists: takes the baseline
        rec.update(meter.record())        # once per step

    The baseline is the memory of the process's code alone (imports, the process group): on CPU
    its RSS after handing freed heap back, on GPU the allocated bytes (about 0).
    """

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.seen = 0                 # the largest VmHWM read before a reset (VmHWM restarts)
        self.logged = False
        if self.cuda:
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        import ctypes

        import deepspeed  # noqa: F401  the trainer imports it later: its code belongs in the baseline

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/statm") as f:
            self.baseline = int(f.read().split()[1]) * resource.getpagesize()
        self.seen = _vm_hwm()
        _reset_vm_hwm()

    def record(self) -> Dict[str, float]:
        """memory_gb (the process's peak so far, imports included), memory_step_gb (the peak since
        the previous record, above the baseline) and, in the first record, memory_baseline_gb."""
        if self.cuda:
            rec = {"memory_gb": memory_gb(), "memory_step_gb": (torch.cuda.max_memory_allocated() - self.baseline) / 2**30}
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = _vm_hwm()
            self.seen = max(self.seen, peak)
            _reset_vm_hwm()
            rec = {"memory_gb": max(memory_gb(), self.seen / 2**30), "memory_step_gb": max(peak - self.baseline, 0) / 2**30}
        if not self.logged:
            rec["memory_baseline_gb"] = self.baseline / 2**30
            self.logged = True
        return rec


def _clean(v: Any) -> Any:
    """JSON-safe value: non-finite floats become None."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def supersede_after(path: Path, step: int) -> int:
    """Before a run resumes at `step`, move the records of later steps (the interrupted attempt's,
    about to be recomputed) and any torn last line out of `path` into metrics.superseded.jsonl
    beside it (appended: nothing is lost), so each step appears once. The TensorBoard writer
    does the same with purge_step. Returns the number of lines moved."""
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            rec_step = None  # a torn write of the killed attempt
        (keep if isinstance(rec_step, int) and rec_step <= step else moved).append(line)
    if not moved:
        return 0
    with open(path.with_name("metrics.superseded.jsonl"), "a") as f:  # first: a crash now loses nothing
        f.write("".join(line + "\n" for line in moved))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
    return len(moved)


class Monitor:
    """Writes the logs on rank 0; a no-op elsewhere."""

    def __init__(self, cfg: RunConfig, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.cfg = cfg
        self.max_steps = cfg.train.max_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.bar = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        supersede_after(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        if cfg.logging.wandb.project:
            from llm_lru.train.tracking import WandbRun

            self.wandb = WandbRun(cfg, run_dir, start_step)
        mode = cfg.logging.progress
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        """Record one optimizer step (1-based `step`): jsonl line, TB scalars, bar or line."""
        if not self.enabled:
            return
        rec = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(step, rec)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            post = {k: f"{rec[k]:.4g}" for k in ("loss", "lr", "tokens_per_s") if isinstance(rec.get(k), float)}
            self.bar.set_postfix(post, refresh=False)
        elif step % self.cfg.logging.log_every == 0 or step == self.max_steps or "val_loss" in rec:
            done = step - self.start_step
            eta = (time.time() - self.t0) / max(done, 1) * (self.max_steps - step)
            parts = [f"step {step}/{self.max_steps}"]
            parts += [f"{k} {rec[k]:.4g}" for k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s")
                      if isinstance(rec.get(k), (int, float))]
            if rec.get("skipped"):
                parts.append("SKIPPED (non-finite loss)")
            parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            print(" | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)
            sys.stdout.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
        if self.bar is not None:
            self.bar.close()
