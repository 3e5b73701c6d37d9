"""The training loop, in named steps: setup, resume, step, validate, save.

    result = train(cfg, mesh)   # mesh = llm_lru.parallel.init_mesh(cfg.parallel) (see cli.py)

setup() builds a Run (model, SP wrap, DeepSpeed engine, loaders, monitor) on the mesh, resume()
loads the newest checkpoint into it, train_step() runs one optimizer step of grad_accum micro
batches per rank, validate() the validation loss, save_checkpoint() a complete checkpoint. Rank,
world and dp come from the Mesh; it also runs the trainer's few collectives.

The loss each rank backpropagates is scaled so that DeepSpeed's gradient average over all ranks
(dp x sp) and its 1/grad_accum scaling give exactly the gradient of the mean over every valid
token of the global batch, whatever the split into ranks, slices and micro batches.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from llm_lru.config import RunConfig, check_world, primary_data_path, save_config
from llm_lru.data_prep.mixture import data_report
from llm_lru.kernels import DEFAULT_CHUNK_TOKENS
from llm_lru.parallel import Mesh, init_mesh, parallelize
from llm_lru.parallel.loss import sp_dp_scale
from llm_lru.train import checkpoint as ckpt_lib
from llm_lru.train.engine import batch_geometry, build_engine, resolve_precision, set_lr
from llm_lru.train.init_from import load_init, load_init_optimizer
from llm_lru.train.monitor import MemoryMeter, Monitor, flops_per_token, peak_flops
from llm_lru.train.profile import StepProfiler
from llm_lru.train.schedule import lr_at
from llm_lru.train.tracking import require_wandb


class TooManyBadSteps(RuntimeError):
    """train.max_bad_steps consecutive non-finite losses: the run stops, checkpoints untouched."""


@dataclasses.dataclass
class TrainState:
    step: int = 0            # optimizer steps attempted (skipped ones included); the LR schedule
                             # counts applied ones, step - bad_total (see engine.py)
    tokens: int = 0          # global input tokens consumed
    bad_in_row: int = 0
    bad_total: int = 0


@dataclasses.dataclass
class Run:
    """What setup() builds and every later step uses."""

    cfg: RunConfig
    mesh: Mesh
    engine: Any                              # the DeepSpeed engine
    optimizer: Any                           # its SkippableAdamW (skip_next, lr)
    loader: Any
    val_loader: Any                          # None: validation off
    val_steps: int                           # micro batches per validation
    micro: int                               # sequences per rank per micro step
    gas: int                                 # micro steps per optimizer step
    memory: MemoryMeter                      # the process's memory above its baseline before the model
    checkpoint: Optional[Path]               # the one to resume from, if any
    universal: bool                          # ... through DeepSpeed's universal format
    init: Any                                # checkpoint.init_from's weights (train/init_from.py), if any
    flops_per_token: float
    peak_flops: Optional[float]
    notes: List[str]                         # what setup has to say, logged once the logs are open
    monitor: Optional[Monitor] = None        # opened by resume(), at the step the run continues from

    @property
    def device(self):
        return self.engine.device


# --- seams (replaced by tests or by later pieces of the project) ---------------------------

def build_model(cfg: RunConfig) -> torch.nn.Module:
    """The hybrid LM of cfg.model (vocab_size already resolved)."""
    from llm_lru.models import HybridLM

    return HybridLM(cfg.model)


def make_loader(cfg: RunConfig, split: str, dp_rank: int, dp_size: int, sp_rank: int, sp_size: int,
                batch_size: int):
    """The data issue's loader: dicts of input_ids / labels / doc_start, cut to this SP slice."""
    from llm_lru.data_prep import build_loader

    return build_loader(cfg, split=split, dp_rank=dp_rank, dp_size=dp_size, sp_rank=sp_rank,
                        sp_size=sp_size, batch_size=batch_size)


def has_validation_data(cfg: RunConfig) -> bool:
    """Whether make_loader(cfg, "val", ...) has data to read (a missing data.val_path raises)."""
    from llm_lru.data_prep.sources import has_val_split

    return has_val_split(cfg)


# --- one micro batch ------------------------------------------------------------------------

def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    """The batch on the training device; from the loader's pinned memory on CUDA the copies are
    asynchronous (non_blocking), so they overlap the work already queued."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine, batch: Dict[str, torch.Tensor], mesh, device, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of this rank's slice at its global positions (labels -100 not counted).

    The engine's forward is HybridLM.forward with labels, which is HybridLM.loss: the logits exist
    one chunk of tokens at a time and, under ZeRO-3, the head's weight is gathered by its module.
    """
    b = to_device(batch, device)
    ids = b["input_ids"]
    return engine(ids, doc_start=b["doc_start"], pos_offset=mesh.pos_offset(ids.shape[1]),
                  labels=b["labels"], loss_reduction="sum", loss_chunk_tokens=chunk_tokens)


def _loss(engine, batch, mesh, device, num_tokens: float, grad_average_size: int,
          chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """(loss_to_backward, global loss value) of one micro batch: see llm_lru.parallel.loss."""
    total = _forward(engine, batch, mesh, device, chunk_tokens)
    return sp_dp_scale(total, (batch["labels"] != -100).sum(), mesh, num_tokens=num_tokens,
                       grad_average_size=grad_average_size)


def _stage0_grad_norm(engine, cfg: RunConfig) -> Optional[float]:
    """Pre-clip norm of the averaged gradients at ZeRO-0 in fp32, where DeepSpeed keeps none."""
    if cfg.deepspeed.zero_stage != 0 or engine.bfloat16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


# --- validate ------------------------------------------------------------------------------

def evaluate(engine, val_loader, n_batches: int, mesh, device, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> float:
    """Global token-mean loss over the first `n_batches` micro batches of the validation loader.

    The loader is rewound first, so every evaluation sees the same batches.
    """
    # The loader's own state with its position at the start (a bare {"step": 0} lacks its version).
    val_loader.load_state_dict({**val_loader.state_dict(), "step": 0, "position": 0})
    it = iter(val_loader)
    engine.eval()
    total = count = 0.0
    try:
        with torch.no_grad():
            for _, batch in zip(range(n_batches), it):
                total += _forward(engine, batch, mesh, device, chunk_tokens).item()
                count += (batch["labels"] != -100).sum().item()
    finally:
        close = getattr(it, "close", None)
        if close:
            close()  # stops the loader's worker processes now
        engine.train()
    total, count = mesh.all_sum([total, count], device)
    return total / max(count, 1.0)


def validate(run: Run) -> float:
    """The validation loss of the run's model now (train.val_batches global batches)."""
    return evaluate(run.engine, run.val_loader, run.val_steps, run.mesh, run.device, run.cfg.train.loss_chunk_tokens)


def validation_steps(cfg: RunConfig, val_loader, gas: int, notes: List[str], dp: int, micro: int) -> int:
    """Micro batches per validation: train.val_batches global batches, the first val_batches x
    global_batch_size sequences of the split, the same ones at any dp or micro batch size (a run
    resumed at another dp keeps a comparable val_loss); a smaller split is read whole, never twice."""
    want = cfg.train.val_batches * gas
    if val_loader.steps_per_epoch < want:
        notes.append(f"warning: each validation reads the whole val split, "
                     f"{val_loader.steps_per_epoch * dp * micro} sequences in whole micro steps: fewer than "
                     f"train.val_batches x train.global_batch_size = "
                     f"{cfg.train.val_batches * cfg.train.global_batch_size}")
    return min(want, val_loader.steps_per_epoch)


# --- save ----------------------------------------------------------------------------------

def save_checkpoint(engine, cfg: RunConfig, state: TrainState, loader, mesh: Mesh) -> Path:
    """Write checkpoints/step_N (see checkpoint.py for the layout), mark it complete, prune.

    A write that fails on any rank (a full disk, a quota) fails on every rank with one
    CheckpointWriteError naming the checkpoint, the bytes it needs and the free space; the partial
    checkpoint is removed (its space back, `latest` still on the previous one).
    """
    root = Path(cfg.out_dir) / ckpt_lib.CKPT_DIR
    ckpt = root / ckpt_lib.checkpoint_name(state.step)
    if mesh.rank == 0:
        if ckpt.exists():  # a partial save of the same step from a crashed attempt
            import shutil

            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
    mesh.barrier()
    error = None
    try:
        engine.save_checkpoint(str(ckpt / ckpt_lib.DS_SUBDIR), tag=ckpt_lib.DS_TAG)
        rf = ckpt_lib.rank_file(ckpt, mesh.rank)
        rf.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"loader": loader.state_dict(), "rng": ckpt_lib.rng_state(), "state": dataclasses.asdict(state)},
                   rf)
        if mesh.rank == 0:
            save_config(cfg, ckpt / "config.yaml")
            meta = {"step": state.step, "tokens": state.tokens, "world_size": mesh.world_size,
                    "dp": mesh.dp, "sp": mesh.sp, "zero_stage": cfg.deepspeed.zero_stage,
                    "precision": resolve_precision(cfg.train), "ds_dir": ckpt_lib.DS_SUBDIR,
                    "ds_tag": ckpt_lib.DS_TAG, "global_batch_size": cfg.train.global_batch_size,
                    "data_path": primary_data_path(cfg.data),
                    "manifest": str(Path(primary_data_path(cfg.data)) / "manifest.json") if primary_data_path(cfg.data) else ""}
            (ckpt / "meta.json").write_text(json.dumps(meta, indent=1))
    except (OSError, RuntimeError) as e:  # torch's writer reports ENOSPC as a RuntimeError
        error = ckpt_lib.without_frames(e)
    if mesh.all_sum([float(error is not None)], engine.device)[0]:
        problem = None
        if mesh.rank == 0:  # one rank measures and cleans up, every rank raises the same message
            problem = ckpt_lib.discard_failed_save(ckpt, error, model_bytes=_state_bytes(engine))
        raise ckpt_lib.CheckpointWriteError(mesh.broadcast_object(problem)) from error
    mesh.barrier()
    if mesh.rank == 0:
        ckpt_lib.mark_complete(ckpt, state.step)
        ckpt_lib.prune(root, cfg.checkpoint.keep)
    mesh.barrier()
    return ckpt


def _state_bytes(engine) -> int:
    """Bytes of the fp32 weights and two Adam moments: a checkpoint's size when none is on disk yet."""
    return sum(p.numel() for p in engine.module.parameters()) * 4 * 3


def save_due(run: Run, state: TrainState, signals: ckpt_lib.SaveSignals, last_save: float) -> tuple:
    """(save now, stop after it): checkpoint.every steps, checkpoint.every_minutes on rank 0's clock,
    a save signal that reached any rank (one small all-reduce per step, the same answer on every
    rank), and the last step."""
    cfg = run.cfg
    minutes = cfg.checkpoint.every_minutes
    timed = run.mesh.rank == 0 and minutes > 0 and time.monotonic() - last_save >= 60 * minutes
    signalled, timed = (v > 0 for v in run.mesh.all_sum([float(signals.received is not None), float(timed)],
                                                         run.device))
    stop = signalled and state.step < cfg.train.max_steps     # in the last step: just finish
    every = cfg.checkpoint.every
    periodic = ((every and state.step % every == 0) or timed) and state.bad_in_row == 0
    return periodic or stop or state.step == cfg.train.max_steps, stop


# --- resume --------------------------------------------------------------------------------

def resume_path(cfg: RunConfig, mesh: Mesh) -> Optional[Path]:
    """The checkpoint to resume from per checkpoint.resume (auto | none | PATH), decided on rank 0."""
    choice = None
    if mesh.rank == 0:
        r = cfg.checkpoint.resume
        if r == "auto":
            found = ckpt_lib.latest_complete(Path(cfg.out_dir) / ckpt_lib.CKPT_DIR)
            choice = str(found) if found else None
        elif r != "none":
            choice = str(ckpt_lib.find_checkpoint(r))
    choice = mesh.broadcast_object(choice)
    return Path(choice) if choice else None


def prepare_resume(ckpt: Path, cfg: RunConfig, mesh: Mesh) -> bool:
    """Check that `ckpt` can continue in this world (ValueError naming the key if not: another SP
    size, global batch or model). When the DP size changed under ZeRO or bf16, whose optimizer state is
    sharded per rank, rank 0 builds DeepSpeed's universal checkpoint of it; returns whether the
    engine must load that one (`universal_load_config`)."""
    ckpt_lib.check_resume_model(ckpt, cfg.model)
    dp_changed = ckpt_lib.check_resume(ckpt, cfg.parallel.sp, mesh.dp, cfg.train.global_batch_size)
    if not (dp_changed and (cfg.deepspeed.zero_stage > 0 or resolve_precision(cfg.train) == "bf16")):
        return False
    err = None
    if mesh.rank == 0:
        try:
            ckpt_lib.to_universal(ckpt)
        except Exception as e:  # every rank must hear of it, not wait in the next collective
            err = f"{type(e).__name__}: {e}"
    err = mesh.broadcast_object(err)
    if err:
        raise ValueError(f"checkpoint.resume: {ckpt} could not be made a universal checkpoint: {err}")
    return True


def universal_load_config(cfg: RunConfig) -> RunConfig:
    """cfg with DeepSpeed's `checkpoint.load_universal` set (for the engine that loads one)."""
    over = dict(cfg.deepspeed.overrides)
    over["checkpoint"] = {**over.get("checkpoint", {}), "load_universal": True}
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, overrides=over))


def load_checkpoint(engine, ckpt: Path, loader, mesh: Mesh, universal: bool = False) -> TrainState:
    """Restore engine (weights + optimizer), the loader position and, in the same world, RNG states.

    In another world the loader state of rank 0 (a global position) is re-split over this one.
    """
    same_world = ckpt_lib.read_meta(ckpt)["world_size"] == mesh.world_size
    saved = torch.load(ckpt_lib.rank_file(ckpt, mesh.rank if same_world else 0), weights_only=False)
    ds_dir = ckpt / (ckpt_lib.UNIVERSAL_SUBDIR if universal else ckpt_lib.DS_SUBDIR)
    hyper = ckpt_lib.group_hyperparams(engine.optimizer)
    path, _ = engine.load_checkpoint(str(ds_dir), tag=ckpt_lib.DS_TAG,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"checkpoint.resume: DeepSpeed could not load {ds_dir}")
    if universal:
        ckpt_lib.repair_universal_load(engine.optimizer, hyper)
    loader.load_state_dict(saved["loader"])
    if same_world:
        ckpt_lib.set_rng_state(saved["rng"])
    return TrainState(**saved["state"])


def resume(run: Run) -> TrainState:
    """The state to continue from: the checkpoint's (loaded into the engine and loader), or a fresh
    one; opens the run's logs at that step (records of later steps from a cut-short attempt are
    moved aside) and logs setup's notes."""
    state = TrainState()
    if run.checkpoint is not None:
        state = load_checkpoint(run.engine, run.checkpoint, run.loader, run.mesh, run.universal)
    load_init_optimizer(run.engine, run.init)
    run.monitor = Monitor(run.cfg, Path(run.cfg.out_dir), state.step, enabled=run.mesh.rank == 0)
    if run.checkpoint is not None:
        run.monitor.message(f"resumed from {run.checkpoint} at step {state.step}")
    elif run.init is not None:
        init = run.init
        run.monitor.message(f"initialised from {init.path} ({init.kind}{f', step {init.step}' if init.step else ''}); "
                            f"optimizer {'state loaded' if init.optimizer else 'fresh'}")
    for note in run.notes:
        run.monitor.message(note)
    return state


# --- setup ---------------------------------------------------------------------------------

def setup(cfg: RunConfig, mesh: Mesh) -> Run:
    """Model, SP wrap, DeepSpeed engine, loaders and monitor of this rank; the resume checks run
    before anything is written, so a refused resume leaves the run's config.yaml as it was."""
    dp = check_world(cfg, mesh.world_size)
    micro, gas = batch_geometry(cfg, dp)
    # Same seed everywhere: identical initial weights on every rank (DeepSpeed also broadcasts).
    torch.manual_seed(cfg.train.seed)
    memory = MemoryMeter()
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    # Training never reads the final recurrent state: skip its collective (and let ring ranks run ahead).
    model = parallelize(model, mesh, cfg.parallel, activation_checkpointing=cfg.train.activation_checkpointing,
                        final_state=False)
    ckpt = resume_path(cfg, mesh)
    universal = ckpt is not None and prepare_resume(ckpt, cfg, mesh)
    init = load_init(cfg, model) if ckpt is None else None   # checkpoint.init_from: a new run from its weights
    universal = universal or (init is not None and init.universal)
    run_dir = Path(cfg.out_dir)
    if mesh.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    engine, optimizer = build_engine(model, universal_load_config(cfg) if universal else cfg, mesh.world_size)
    # Per-rank streams from here on (dropout-free today, but samplers and future noise differ).
    torch.manual_seed(cfg.train.seed + 1 + mesh.rank)
    loader = make_loader(cfg, "train", mesh.dp_rank, dp, mesh.sp_rank, mesh.sp, micro)
    # Built now so that a missing validation split stops the run before its first step. No
    # validation data at all (prep --val-fraction 0, no data.val_path): validation off, said once.
    validate_data = bool(cfg.train.val_every) and has_validation_data(cfg)
    val_loader = make_loader(cfg, "val", mesh.dp_rank, dp, mesh.sp_rank, mesh.sp, micro) if validate_data else None
    notes: List[str] = []
    if cfg.train.val_every and val_loader is None:
        notes.append(f"warning: {cfg.data.path or 'data.sources'} has no 'val' split and data.val_path is not set: "
                     "validation is off (train.val_every ignored)")
    val_steps = validation_steps(cfg, val_loader, gas, notes, dp, micro) if val_loader is not None else 0
    notes.append(f"world {mesh.world_size} = dp {dp} x sp {mesh.sp}, ZeRO-{cfg.deepspeed.zero_stage}, "
                 f"{resolve_precision(cfg.train)}, micro {micro} x accum {gas}, {n_params / 1e6:.2f}M params")
    return Run(cfg, mesh, engine, optimizer, loader, val_loader, val_steps, micro, gas, memory, ckpt, universal, init,
               flops_per_token(cfg.model, n_params, cfg.train.seq_len), peak_flops(), notes)


# --- one optimizer step --------------------------------------------------------------------

def _next(it_holder: List[Iterator], loader) -> Dict[str, torch.Tensor]:
    try:
        return next(it_holder[0])
    except StopIteration:  # a finite loader: start its next epoch
        it_holder[0] = iter(loader)
        return next(it_holder[0])


def train_step(run: Run, state: TrainState, it: List[Iterator]) -> Dict[str, Any]:
    """One optimizer step (grad_accum micro batches on this rank); updates `state`, returns the
    step's metrics record. A non-finite loss skips the update on every rank (ZeRO's collectives
    still run) and does not advance the schedule."""
    cfg, mesh, engine, optimizer = run.cfg, run.mesh, run.engine, run.optimizer
    t0 = time.time()
    batches = [_next(it, run.loader) for _ in range(run.gas)]
    (n_valid,) = mesh.all_sum([float(sum((b["labels"] != -100).sum().item() for b in batches))], run.device)
    lr = lr_at(cfg.train, state.step - state.bad_total)
    set_lr(optimizer, lr)
    loss_value = 0.0
    for b in batches:
        # DeepSpeed divides by gas and averages over the world: scale the loss by both.
        loss, value = _loss(engine, b, mesh, run.device, n_valid, mesh.world_size * run.gas,
                            cfg.train.loss_chunk_tokens)
        loss_value += value.item()  # already all-reduced: every rank sees the same NaN
        engine.backward(loss)
        if b is batches[-1]:
            bad = not math.isfinite(loss_value)
            optimizer.skip_next = bad
            grad_norm = _stage0_grad_norm(engine, cfg)
        engine.step()
    step_tokens = cfg.train.global_batch_size * cfg.train.seq_len
    state.step += 1
    state.tokens += step_tokens
    dt = time.time() - t0
    rec: Dict[str, Any] = {"lr": lr, "tokens": state.tokens, "tokens_per_s": step_tokens / dt, "step_time": dt}
    if bad:
        state.bad_in_row += 1
        state.bad_total += 1
        rec.update(loss=None, skipped=True, bad_steps=state.bad_total)
    else:
        state.bad_in_row = 0
        gn = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
        rec.update(loss=loss_value, grad_norm=float(gn) if gn is not None else None, bad_steps=state.bad_total)
    data_metrics, data_notes = data_report(run.loader)   # per-source tokens of a mixture
    rec.update(data_metrics)
    for note in data_notes:
        run.monitor.message(note)
    rec.update(run.memory.record())
    if run.peak_flops:
        rec["mfu"] = rec["tokens_per_s"] * run.flops_per_token / (run.peak_flops * mesh.world_size)
    return rec


# --- the loop ------------------------------------------------------------------------------

def train(cfg: RunConfig, mesh: Optional[Mesh] = None) -> Dict[str, Any]:
    """Train per cfg on `mesh` (llm_lru.parallel.init_mesh; built from cfg.parallel when None);
    returns a summary dict. Raises TooManyBadSteps after train.max_bad_steps non-finite losses in a row."""
    require_wandb(cfg)   # on every rank, before anything: not only on rank 0's Monitor
    run = setup(cfg, init_mesh(cfg.parallel) if mesh is None else mesh)
    state = resume(run)
    profiler = StepProfiler(cfg.train.profile, Path(cfg.out_dir), run.mesh.rank, first_step=state.step + 1)
    it, last_ckpt, status = [iter(run.loader)], run.checkpoint, "failed"
    # Never rewrite the checkpoint resumed from (a save first deletes a same-step dir).
    saved_step, last_save, stop = state.step if run.checkpoint else -1, time.monotonic(), False
    signals = ckpt_lib.SaveSignals(cfg.checkpoint.save_signals).install()
    if run.mesh.rank == 0:
        ckpt_lib.write_status(Path(cfg.out_dir), "running", state.step)
    try:
        while state.step < cfg.train.max_steps and not stop:
            rec = train_step(run, state, it)
            if run.val_loader is not None and state.step % cfg.train.val_every == 0:
                rec["val_loss"] = validate(run)
            run.monitor.log(state.step, rec)
            profiler.step()
            if state.bad_in_row >= cfg.train.max_bad_steps:
                raise TooManyBadSteps(
                    f"{state.bad_in_row} non-finite losses in a row (train.max_bad_steps={cfg.train.max_bad_steps}) "
                    f"at step {state.step}; last good checkpoint: {last_ckpt or 'none'}")
            due, stop = save_due(run, state, signals, last_save)
            if due and state.step != saved_step:
                last_ckpt = save_checkpoint(run.engine, cfg, state, run.loader, run.mesh)
                saved_step, last_save = state.step, time.monotonic()
            if stop:
                run.monitor.message(f"save signal ({signals.received or 'on another rank'}): checkpoint {last_ckpt} "
                                    f"at step {state.step}; exiting with {ckpt_lib.PREEMPTED_EXIT}")
        status = "preempted" if stop else "finished"
    finally:
        signals.restore()
        profiler.close()
        if run.mesh.rank == 0:
            ckpt_lib.write_status(Path(cfg.out_dir), status, state.step)
        run.monitor.close()
    return {"step": state.step, "tokens": state.tokens, "bad_steps": state.bad_total,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "preempted": stop}
