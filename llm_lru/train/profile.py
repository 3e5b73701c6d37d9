"""torch.profiler traces of chosen training steps: `train.profile: {start_step, steps, out, all_ranks}`.

    prof = StepProfiler(cfg.train.profile, run_dir, rank, first_step=state.step + 1)   # before the loop
    ...after every optimizer step: prof.step()
    prof.close()     # in a finally: stops a profile that is still running

Steps start_step .. start_step + steps - 1 (1-based, the step numbers of metrics.jsonl) are
recorded on rank 0, or on every rank with all_ranks, into OUT/rankR.stepsA-B.pt.trace.json
(OUT: train.profile.out, default RUN/profile): a Chrome trace with a ProfilerStep#k mark per
recorded step (k counts from the warm-up step, 0, so start_step is #1; #0 when start_step is 1,
which has no warm-up step), operator shapes and, with `memory` (default), the allocations and
frees that make the memory timeline. It opens in Perfetto (ui.perfetto.dev), chrome://tracing, and TensorBoard's
profiler plugin (`tensorboard --logdir OUT`, torch-tb-profiler). On CUDA, `memory` also writes
the allocator's snapshot over those steps (rankR.stepsA-B.memory.pickle, pytorch.org/memory_viz).
The step before the first is a warm-up step of the profiler (not recorded). A run resumed past
start_step records nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerAction, ProfilerActivity


class StepProfiler:
    """Records steps [start_step, start_step + steps) of this process, if it is asked to (see module)."""

    def __init__(self, cfg, run_dir: Path, rank: int, first_step: int):
        self.cfg = cfg
        self.prof: Optional[torch.profiler.profile] = None
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        self.next = first_step                       # the step about to run (1-based)
        self.wanted = bool(cfg.start_step) and (rank == 0 or cfg.all_ranks) and first_step <= self.first
        out = Path(cfg.out) if cfg.out else Path(run_dir) / "profile"
        self.trace = out / f"rank{rank}.steps{self.first}-{self.last}.pt.trace.json"
        self.cuda_memory = cfg.memory and torch.cuda.is_available()
        self._maybe_start()

    def _maybe_start(self) -> None:
        """Start before the warm-up step (the one before start_step), or before start_step itself."""
        if not self.wanted or self.prof is not None or self.next not in (self.first - 1, self.first):
            return
        warm = 1 if self.next == self.first - 1 else 0
        n = self.cfg.steps

        def action(k: int) -> ProfilerAction:  # k: steps since this profiler started
            if k < warm:
                return ProfilerAction.WARMUP
            if k < warm + n - 1:
                return ProfilerAction.RECORD
            return ProfilerAction.RECORD_AND_SAVE if k == warm + n - 1 else ProfilerAction.NONE

        self.trace.parent.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = torch.profiler.profile(activities=activities, schedule=action, on_trace_ready=self._save,
                                           record_shapes=True, profile_memory=self.cfg.memory,
                                           with_stack=self.cfg.with_stack)
        self.prof.start()
        if self.cuda_memory:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)

    def _save(self, prof) -> None:
        prof.export_chrome_trace(str(self.trace))
        if self.cuda_memory:
            torch.cuda.memory._dump_snapshot(str(self.trace).replace(".pt.trace.json", ".memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)

    def step(self) -> None:
        """Call after every optimizer step."""
        self.next += 1
        if self.prof is not None:
            self.prof.step()
            if self.next > self.last:
                self.prof.stop()
                self.prof = None
                self.wanted = False
        self._maybe_start()

    def close(self) -> None:
        """Stop a profile still running (the run ended or failed inside the window; nothing is written)."""
        if self.prof is not None:
            self.prof.on_trace_ready = None
            self.prof.stop()
            self.prof = None
