"""Experiment tracking with Weights & Biases: `logging.wandb: {project, name, mode, entity, tags}`.

The official `wandb` client is an optional extra (`pip install 'llm_lru[wandb]'`); a config that
asks for it without the client installed stops before any process group starts, naming the extra
(`require_wandb`, called by `llm-lru train` and by the trainer). Rank 0's Monitor sends every
metrics.jsonl record under the TensorBoard names (train/loss, val/val_loss, train/tokens/NAME, ...)
at its step, the resolved config, and the run's hardware (world, dp x sp, device, host; the
client adds its own system record: CPUs, memory, GPUs). `mode: offline` writes RUN/wandb/offline-run-*/ for a
later `wandb sync`. The run id is kept in RUN/wandb/run_id, so a resumed run continues the same
W&B run (steps it already sent are not sent twice).
"""
from __future__ import annotations

import platform
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from llm_lru.config import ConfigError, RunConfig, to_dict

EXTRA = "pip install 'llm_lru[wandb]'"


def require_wandb(cfg: RunConfig) -> None:
    """ConfigError naming the extra when logging.wandb is asked for and the client is missing."""
    if not cfg.logging.wandb.project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(f"logging.wandb: the wandb client is not installed; install the extra: {EXTRA} "
                          "(or set logging.wandb.project='' to turn tracking off)") from None


def hardware() -> Dict[str, Any]:
    """What the run ran on: world, device, host (rank 0's view)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    hw: Dict[str, Any] = {"world_size": world, "host": platform.node(), "torch": torch.__version__,
                          "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        hw.update(device="cuda", gpu=torch.cuda.get_device_name(), gpus_per_node=torch.cuda.device_count())
    else:
        hw["device"] = "cpu"
    return hw


class WandbRun:
    """One W&B run for a run directory; `log(step, record)` per optimizer step, `close()` at the end."""

    def __init__(self, cfg: RunConfig, run_dir: Path, start_step: int, extra: Optional[Dict[str, Any]] = None):
        require_wandb(cfg)
        import wandb

        wb = cfg.logging.wandb
        folder = Path(run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        config = to_dict(cfg)
        hw = hardware() | dict(extra or {})
        config["hardware"] = hw | {"dp": hw["world_size"] // cfg.parallel.sp, "sp": cfg.parallel.sp}
        self.last_step = start_step
        self.run = wandb.init(project=wb.project, name=wb.name or Path(cfg.out_dir).name, mode=wb.mode,
                              entity=wb.entity or None, tags=list(wb.tags) or None, dir=str(run_dir),
                              id=run_id, resume="allow", config=config)

    def log(self, step: int, record: Dict[str, Any]) -> None:
        """The metrics of one step (numbers only; None and flags are left out)."""
        if step <= self.last_step and step != 0:   # sent by the attempt a resume recomputes
            return
        data = {(f"val/{k}" if k.startswith("val") else f"train/{k}"): v for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(data, step=step)
        self.last_step = step

    def close(self) -> None:
        self.run.finish()
