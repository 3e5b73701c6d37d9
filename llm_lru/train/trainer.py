"""The training loop: model + SP wrap + DeepSpeed engine + loader + checkpoints + logs.

    result = train(cfg, mesh)   # mesh = llm_lru.parallel.init_mesh(cfg.parallel) (see cli.py)

One optimizer step = grad_accum micro batches per rank. The loss each rank backpropagates is
scaled so that DeepSpeed's gradient average over all ranks (dp x sp) and its 1/grad_accum
scaling give exactly the gradient of the mean over every valid token of the global batch,
whatever the split into ranks, slices and micro batches.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from llm_lru.config import RunConfig, check_world, save_config
from llm_lru.kernels import DEFAULT_CHUNK_TOKENS
from llm_lru.parallel import Mesh, init_mesh, parallelize
from llm_lru.parallel.loss import sp_dp_scale
from llm_lru.train import checkpoint as ckpt_lib
from llm_lru.train.engine import batch_geometry, build_engine, lr_at, resolve_precision, set_lr
from llm_lru.train.monitor import Monitor, flops_per_token, memory_gb, peak_flops


class TooManyBadSteps(RuntimeError):
    """train.max_bad_steps consecutive non-finite losses: the run stops, checkpoints untouched."""


@dataclasses.dataclass
class TrainState:
    step: int = 0            # optimizer steps attempted (skipped ones included); the LR schedule
                             # counts applied ones, step - bad_total (see engine.py)
    tokens: int = 0          # global input tokens consumed
    bad_in_row: int = 0
    bad_total: int = 0


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
    from llm_lru.data_prep.loader import has_val_split

    return has_val_split(cfg)


# --- the loop ------------------------------------------------------------------------------

def _next(it_holder: List[Iterator], loader) -> Dict[str, torch.Tensor]:
    try:
        return next(it_holder[0])
    except StopIteration:  # a finite loader: start its next epoch
        it_holder[0] = iter(loader)
        return next(it_holder[0])


def _forward(engine, batch: Dict[str, torch.Tensor], mesh, device, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of this rank's slice at its global positions (labels -100 not counted).

    The labels go into the model's forward (HybridLM.forward), so that the logits exist one
    chunk of tokens at a time and, under ZeRO-3, the head's weight is gathered by its module.
    """
    ids = batch["input_ids"].to(device)
    return engine(ids, doc_start=batch["doc_start"].to(device), pos_offset=mesh.pos_offset(ids.shape[1]),
                  labels=batch["labels"].to(device), loss_reduction="sum", loss_chunk_tokens=chunk_tokens)


def _loss(engine, batch, mesh, device, num_tokens: float, grad_average_size: int,
          chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """(loss_to_backward, global loss value) of one micro batch: see llm_lru.parallel.loss."""
    total = _forward(engine, batch, mesh, device, chunk_tokens)
    return sp_dp_scale(total, (batch["labels"] != -100).sum(), mesh, num_tokens=num_tokens,
                       grad_average_size=grad_average_size)


def _all_sum(values: List[float], device) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _stage0_grad_norm(engine, cfg: RunConfig) -> Optional[float]:
    """Pre-clip norm of the averaged gradients at ZeRO-0 in fp32, where DeepSpeed keeps none."""
    if cfg.deepspeed.zero_stage != 0 or engine.bfloat16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


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
    total, count = _all_sum([total, count], device)
    return total / max(count, 1.0)


def save_checkpoint(engine, cfg: RunConfig, state: TrainState, loader, mesh) -> Path:
    """Write checkpoints/step_N (see checkpoint.py for the layout), mark it complete, prune."""
    root = Path(cfg.out_dir) / ckpt_lib.CKPT_DIR
    ckpt = root / ckpt_lib.checkpoint_name(state.step)
    rank = dist.get_rank()
    if rank == 0:
        if ckpt.exists():  # a partial save of the same step from a crashed attempt
            import shutil

            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt / ckpt_lib.DS_SUBDIR), tag=ckpt_lib.DS_TAG)
    rf = ckpt_lib.rank_file(ckpt, rank)
    rf.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"loader": loader.state_dict(), "rng": ckpt_lib.rng_state(), "state": dataclasses.asdict(state)}, rf)
    if rank == 0:
        save_config(cfg, ckpt / "config.yaml")
        meta = {"step": state.step, "tokens": state.tokens, "world_size": dist.get_world_size(),
                "dp": mesh.dp, "sp": cfg.parallel.sp, "zero_stage": cfg.deepspeed.zero_stage,
                "precision": resolve_precision(cfg.train), "ds_dir": ckpt_lib.DS_SUBDIR, "ds_tag": ckpt_lib.DS_TAG,
                "global_batch_size": cfg.train.global_batch_size,
                "data_path": cfg.data.path,
                "manifest": str(Path(cfg.data.path) / "manifest.json") if cfg.data.path else ""}
        (ckpt / "meta.json").write_text(json.dumps(meta, indent=1))
    dist.barrier()
    if rank == 0:
        ckpt_lib.mark_complete(ckpt, state.step)
        ckpt_lib.prune(root, cfg.checkpoint.keep)
    dist.barrier()
    return ckpt


def resume_path(cfg: RunConfig) -> Optional[Path]:
    """The checkpoint to resume from per checkpoint.resume (auto | none | PATH), decided on rank 0."""
    choice = [None]
    if dist.get_rank() == 0:
        r = cfg.checkpoint.resume
        if r == "auto":
            found = ckpt_lib.latest_complete(Path(cfg.out_dir) / ckpt_lib.CKPT_DIR)
            choice[0] = str(found) if found else None
        elif r != "none":
            choice[0] = str(ckpt_lib.find_checkpoint(r))
    dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def prepare_resume(ckpt: Path, cfg: RunConfig, dp: int) -> bool:
    """Check that `ckpt` can continue in this world (ValueError naming the key if not: another SP
    size, global batch or model). When the DP size changed under ZeRO or bf16, whose optimizer state is
    sharded per rank, rank 0 builds DeepSpeed's universal checkpoint of it; returns whether the
    engine must load that one (`universal_load_config`)."""
    ckpt_lib.check_resume_model(ckpt, cfg.model)
    dp_changed = ckpt_lib.check_resume(ckpt, cfg.parallel.sp, dp, cfg.train.global_batch_size)
    if not (dp_changed and (cfg.deepspeed.zero_stage > 0 or resolve_precision(cfg.train) == "bf16")):
        return False
    err = [None]
    if dist.get_rank() == 0:
        try:
            ckpt_lib.to_universal(ckpt)
        except Exception as e:  # every rank must hear of it, not wait in the next collective
            err[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(err, src=0)
    if err[0]:
        raise ValueError(f"checkpoint.resume: {ckpt} could not be made a universal checkpoint: {err[0]}")
    return True


def universal_load_config(cfg: RunConfig) -> RunConfig:
    """cfg with DeepSpeed's `checkpoint.load_universal` set (for the engine that loads one)."""
    over = dict(cfg.deepspeed.overrides)
    over["checkpoint"] = {**over.get("checkpoint", {}), "load_universal": True}
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, overrides=over))


def load_checkpoint(engine, ckpt: Path, loader, universal: bool = False) -> TrainState:
    """Restore engine (weights + optimizer), the loader position and, in the same world, RNG states.

    In another world the loader state of rank 0 (a global position) is re-split over this one.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    same_world = ckpt_lib.read_meta(ckpt)["world_size"] == world
    saved = torch.load(ckpt_lib.rank_file(ckpt, rank if same_world else 0), weights_only=False)
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


def _save_flags(signals: ckpt_lib.SaveSignals, cfg: RunConfig, last_save: float, world: int,
                device) -> Tuple[bool, bool]:
    """(a save signal reached some rank, checkpoint.every_minutes passed on rank 0's clock), the
    same on every rank: one small all-reduce per step, since a signal may reach one rank only."""
    minutes = cfg.checkpoint.every_minutes
    timed = dist.get_rank() == 0 and minutes > 0 and time.monotonic() - last_save >= 60 * minutes
    flags = [float(signals.received is not None), float(timed)]
    if world > 1:
        flags = _all_sum(flags, device)
    return flags[0] > 0, flags[1] > 0


def train(cfg: RunConfig, mesh: Optional[Mesh] = None) -> Dict[str, Any]:
    """Train per cfg on `mesh` (llm_lru.parallel.init_mesh; built from cfg.parallel when None);
    returns a summary dict.

    Raises TooManyBadSteps after train.max_bad_steps non-finite losses in a row.
    """
    mesh = init_mesh(cfg.parallel) if mesh is None else mesh
    rank, world = dist.get_rank(), dist.get_world_size()
    dp, micro, gas = batch_geometry(cfg, world)
    check_world(cfg, world)
    sp = cfg.parallel.sp
    run_dir = Path(cfg.out_dir)

    # Same seed everywhere: identical initial weights on every rank (DeepSpeed also broadcasts).
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    # Training never reads the final recurrent state: skip its collective (and let ring ranks run ahead).
    model = parallelize(model, mesh, cfg.parallel, activation_checkpointing=cfg.train.activation_checkpointing,
                        final_state=False)
    ckpt = resume_path(cfg)
    universal = ckpt is not None and prepare_resume(ckpt, cfg, dp)
    if rank == 0:  # after the resume checks: a refused resume leaves the run's config as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    engine, optimizer = build_engine(model, universal_load_config(cfg) if universal else cfg, world)
    device = engine.device
    # Per-rank streams from here on (dropout-free today, but samplers and future noise differ).
    torch.manual_seed(cfg.train.seed + 1 + rank)

    loader = make_loader(cfg, "train", mesh.dp_rank, dp, mesh.sp_rank, sp, micro)
    # Built now so that a missing validation split stops the run before its first step.
    # No validation data at all (a prep with --val-fraction 0, no data.val_path): validation off,
    # said once below, rather than a run that cannot start.
    validate_data = bool(cfg.train.val_every) and has_validation_data(cfg)
    val_loader = make_loader(cfg, "val", mesh.dp_rank, dp, mesh.sp_rank, sp, micro) if validate_data else None
    state = TrainState()
    if ckpt is not None:
        state = load_checkpoint(engine, ckpt, loader, universal)
    mon = Monitor(cfg, run_dir, state.step, enabled=rank == 0)
    if ckpt is not None:
        mon.message(f"resumed from {ckpt} at step {state.step}")
    if cfg.train.val_every and val_loader is None:
        mon.message(f"warning: {cfg.data.path} has no 'val' split and data.val_path is not set: "
                    "validation is off (train.val_every ignored)")
    val_steps = 0
    if val_loader is not None:
        # train.val_batches global batches: the first val_batches x global_batch_size sequences of
        # the split, the same ones at any dp or micro batch size (a run resumed at another dp
        # keeps a comparable val_loss); a smaller split is read whole, never twice.
        val_steps = min(cfg.train.val_batches * gas, val_loader.steps_per_epoch)
        if val_steps < cfg.train.val_batches * gas:
            mon.message(f"warning: each validation reads the whole val split, "
                        f"{val_loader.steps_per_epoch * dp * micro} sequences in whole micro steps: fewer than "
                        f"train.val_batches x train.global_batch_size = "
                        f"{cfg.train.val_batches * cfg.train.global_batch_size}")
    mon.message(f"world {world} = dp {dp} x sp {sp}, ZeRO-{cfg.deepspeed.zero_stage}, "
                f"{resolve_precision(cfg.train)}, micro {micro} x accum {gas}, {n_params / 1e6:.2f}M params")
    fpt = flops_per_token(cfg.model, n_params, cfg.train.seq_len)
    peak = peak_flops()
    it = [iter(loader)]
    last_ckpt = ckpt
    step_tokens = cfg.train.global_batch_size * cfg.train.seq_len
    # Never rewrite the checkpoint resumed from (a save first deletes a same-step dir).
    saved_step, last_save, preempted, status = state.step if ckpt else -1, time.monotonic(), False, "failed"
    signals = ckpt_lib.SaveSignals(cfg.checkpoint.save_signals).install()
    if rank == 0:
        ckpt_lib.write_status(run_dir, "running", state.step)
    try:
        while state.step < cfg.train.max_steps:
            t0 = time.time()
            batches = [_next(it, loader) for _ in range(gas)]
            valid = float(sum((b["labels"] != -100).sum().item() for b in batches))
            (n_valid,) = _all_sum([valid], device) if world > 1 else (valid,)
            # A skipped (non-finite) step applied no update: it does not advance the schedule.
            lr = lr_at(cfg.train, state.step - state.bad_total)
            set_lr(optimizer, lr)
            loss_value = 0.0
            for b in batches:
                # DeepSpeed divides by gas and averages over the world: scale the loss by both.
                loss, value = _loss(engine, b, mesh, device, n_valid, world * gas, cfg.train.loss_chunk_tokens)
                loss_value += value.item()  # already all-reduced: every rank sees the same NaN
                engine.backward(loss)
                if b is batches[-1]:
                    bad = not math.isfinite(loss_value)
                    optimizer.skip_next = bad  # the same on every rank: ZeRO's collectives still run
                    grad_norm = _stage0_grad_norm(engine, cfg)
                engine.step()
            state.step += 1
            state.tokens += step_tokens
            dt = time.time() - t0
            rec: Dict[str, Any] = {"lr": lr, "tokens": state.tokens,
                                   "tokens_per_s": step_tokens / dt, "step_time": dt}
            if bad:
                state.bad_in_row += 1
                state.bad_total += 1
                rec.update(loss=None, skipped=True, bad_steps=state.bad_total)
            else:
                state.bad_in_row = 0
                gn = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
                rec.update(loss=loss_value, grad_norm=float(gn) if gn is not None else None,
                           bad_steps=state.bad_total)
            rec["memory_gb"] = memory_gb()
            if peak:
                rec["mfu"] = rec["tokens_per_s"] * fpt / (peak * world)
            if val_loader is not None and state.step % cfg.train.val_every == 0:
                rec["val_loss"] = evaluate(engine, val_loader, val_steps, mesh, device,
                                           cfg.train.loss_chunk_tokens)
            mon.log(state.step, rec)
            if state.bad_in_row >= cfg.train.max_bad_steps:
                raise TooManyBadSteps(
                    f"{state.bad_in_row} non-finite losses in a row (train.max_bad_steps={cfg.train.max_bad_steps}) "
                    f"at step {state.step}; last good checkpoint: {last_ckpt or 'none'}")
            every = cfg.checkpoint.every
            stop, timed = _save_flags(signals, cfg, last_save, world, device)
            preempted = stop and state.step < cfg.train.max_steps  # in the last step: just finish
            due = ((every and state.step % every == 0) or timed) and state.bad_in_row == 0
            if (due or preempted or state.step == cfg.train.max_steps) and state.step != saved_step:
                last_ckpt = save_checkpoint(engine, cfg, state, loader, mesh)
                saved_step, last_save = state.step, time.monotonic()
            if preempted:
                mon.message(f"save signal ({signals.received or 'on another rank'}): checkpoint {last_ckpt} "
                            f"at step {state.step}; exiting with {ckpt_lib.PREEMPTED_EXIT}")
                break
        status = "preempted" if preempted else "finished"
    finally:
        signals.restore()
        if rank == 0:
            ckpt_lib.write_status(run_dir, status, state.step)
        mon.close()
    return {"step": state.step, "tokens": state.tokens, "bad_steps": state.bad_total,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "preempted": preempted}
