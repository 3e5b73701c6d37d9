"""Learning-rate schedules: a pure function of the optimizer step and the train config.

    lr = lr_at(cfg.train, step)      # step: 0-based count of applied optimizer steps

Every schedule starts with `train.warmup_steps` of linear warmup, lr * (step + 1) / warmup, then:

- cosine (default): cosine from lr to min_lr over [warmup, max_steps);
- linear: straight line from lr to min_lr over the same span;
- constant: lr;
- wsd (warmup-stable-decay): lr until the last D = round(train.decay_fraction * max_steps) steps,
  then down to min_lr over those D steps in `train.decay_shape`: linear, cosine, or 1-sqrt
  (lr falls as 1 - sqrt(progress), Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations"). A stable-phase checkpoint can be continued into a decay by a
  run with a larger max_steps (the decay starts D steps before the new end).

With progress p in [0, 1] through the decay span, lr = min_lr + (lr - min_lr) * shape(p); steps at
or past max_steps get min_lr (p = 1). Nothing is stored: a resumed run, at any world size,
continues the schedule exactly from its step counter.
"""
from __future__ import annotations

import math

from llm_lru.config import DECAY_SHAPES, SCHEDULES, TrainConfig


def decayed(lr: float, min_lr: float, shape: str, progress: float) -> float:
    """The learning rate at `progress` in [0, 1] through a decay from lr (0) to min_lr (1)."""
    if shape == "cosine":  # written as it always was: cosine runs keep their exact values
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if shape == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    if shape == "1-sqrt":
        return min_lr + (lr - min_lr) * (1.0 - math.sqrt(progress))
    raise ValueError(f"train.decay_shape: unknown '{shape}' (one of {', '.join(DECAY_SHAPES)})")


def wsd_decay_steps(cfg: TrainConfig) -> int:
    """Steps of the WSD decay phase: round(decay_fraction * max_steps), at least 1."""
    return max(1, round(cfg.decay_fraction * cfg.max_steps))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based) under cfg.schedule (see the module docstring)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        span = wsd_decay_steps(cfg)
        start = cfg.max_steps - span
        shape = cfg.decay_shape
    elif cfg.schedule in ("cosine", "linear"):
        start = cfg.warmup_steps
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        shape = cfg.schedule
    else:
        raise ValueError(f"train.schedule: unknown '{cfg.schedule}' (one of {', '.join(SCHEDULES)})")
    progress = min(max(step - start, 0) / span, 1.0)
    return decayed(cfg.lr, cfg.min_lr, shape, progress)
