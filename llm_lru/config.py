"""Structured run configuration: one dataclass per section, YAML files, dotlist overrides.

`load_config(path, overrides)` merges a YAML file and `key=value` overrides onto the schema
below and validates the result before anything runs; every error names the offending key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

# Pattern letters a config may use without declaring them in model.kinds.
DEFAULT_KINDS: Dict[str, str] = {
    "A": "attn",   # causal softmax attention
    "S": "swa",    # sliding-window attention
    "L": "lru",    # Orvieto LRU (complex diagonal, time-invariant)
    "G": "glru",   # selective gated diagonal recurrence (m = 1)
    "B": "bdlru",  # selective block-diagonal LRU (block size model.block_size)
    "H": "hlru",   # selective higher-order LRU (order model.block_size)
    "R": "blur",   # bidirectional LRU (encoders only)
    "C": "lstm",   # baseline: torch.nn.LSTM (hidden width d_state)
    "D": "deltanet",  # baseline: DeltaNet, the delta rule over n_heads heads of d_state / n_heads
}
MIXER_KINDS = ("attn", "swa", "lru", "glru", "bdlru", "hlru", "blur", "lstm", "deltanet")
# Mixers with no sequence-parallel form (no split-phase scan): parallel.sp > 1 refuses them.
NO_SP_KINDS = ("lstm", "deltanet")
RECURRENT_KINDS = ("lru", "glru", "bdlru", "hlru", "blur")
# The kernels check gate normalisations and block sizes themselves (they import nothing of the
# project): their lists are the one definition, named here for the config.
from llm_lru.kernels.common.scan import MAX_BLOCK_SIZE, NORMS as GATE_NORMS  # noqa: E402
GATE_INITS = ("long_memory", "uniform")            # llm_lru/models/recurrent.py
HLRU_READOUTS = ("state", "last")                  # H-LRU's readout: all m lagged values, or the last one
CARRIES = ("allgather", "ring")                    # SP carry exchange (llm_lru/parallel/scan.py)
PROCESS_GROUP_BACKENDS = ("auto", "gloo", "nccl")  # llm_lru/parallel/mesh.py
SCHEDULES = ("cosine", "wsd", "linear", "constant")     # llm_lru/train/schedule.py
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
# Model fields added after runs and exports existed: a saved config (a checkpoint's config.yaml,
# an export's config.json) without the key was written by code that behaved like this value.
LEGACY_MODEL_DEFAULTS = {"hlru_readout": "last"}
# Model fields a resumed run may change: they only shape the initial weights, or (window,
# rope_theta) how attention reads positions, a deliberate long-context continuation.
RESUMABLE_MODEL_FIELDS = ("init_std", "lru_r_min", "lru_r_max", "lru_max_phase", "gate_init", "window",
                          "rope_theta")


@dataclass
class ModelConfig:
    vocab_size: int = 0                 # 0: taken from the data's tokenizer
    d_model: int = 128
    n_layers: int = 4
    pattern: str = "BBBA"               # repeated (and cut) to n_layers
    kinds: Dict[str, str] = field(default_factory=dict)  # extra/overriding letter -> kind
    d_state: int = 0                    # recurrent state width N*m; 0: d_model
    block_size: int = 4                 # m for bdlru (block) and hlru (order)
    gate_norm: str = "softmax"          # bdlru/hlru row normalisation: softmax|sigmoid|relu|tanh|lin_l1 (g/sum|g|)
    gate_init: str = "long_memory"      # bdlru/hlru gates start: long_memory (bias to own past) | uniform (paper)
    selective: bool = True              # bdlru/hlru: false = a learned logit table, no input dependence
    hlru_readout: str = "state"         # hlru: state (Linear(N*m, d) over the last m values, paper) | last (y_t)
    lru_r_min: float = 0.9
    lru_r_max: float = 0.999
    lru_max_phase: float = 6.283
    n_heads: int = 4
    n_kv_heads: int = 0                 # 0: n_heads (no grouping)
    window: int = 256                   # sliding-window size for swa
    rope_theta: float = 10000.0
    ffn_dim: int = 0                    # 0: 8/3 * d_model rounded up to a multiple of 64
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    causal: bool = True                 # False allows blur (encoder stacks)
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    sp: int = 1                         # sequence-parallel group size
    carry: str = "allgather"            # allgather (DESIGN §4) | ring (pipelined p2p; bench/results/sp.md)
    backend: str = "auto"               # auto | gloo | nccl


@dataclass
class SourceConfig:
    """One source of a weighted mixture (data.sources): a prep folder and its sampling weight."""

    path: str = ""                      # shard folder with manifest.json
    weight: float = 1.0                 # relative: a sample comes from it with probability weight / sum
    name: str = ""                      # in logs and metrics (tokens/NAME, val_loss); "": the folder's name
    val_path: str = ""                  # its validation shards; "": path's val split (if any)


@dataclass
class DataConfig:
    source: str = "shards"              # shards | random | synthetic
    path: str = ""                      # shard folder with manifest.json (one source)
    sources: List[SourceConfig] = field(default_factory=list)   # a weighted mixture instead of path
    val_path: str = ""                  # optional validation shard folder
    num_workers: int = 1
    shuffle: bool = True
    shuffle_buffer: int = 1000
    skip_bad_shards: bool = False       # False: a broken shard stops the run, naming it
    task: str = ""                      # synthetic task name (eval/recall benchmarks)
    task_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ProfileConfig:
    """train.profile: a torch.profiler trace of some steps (llm_lru/train/profile.py)."""

    start_step: int = 0                 # first profiled optimizer step (1-based); 0: no profiling
    steps: int = 2                      # steps recorded from start_step on
    out: str = ""                       # trace folder; "": RUN/profile
    all_ranks: bool = False             # False: rank 0 only
    memory: bool = True                 # allocations in the trace (the memory timeline); CUDA: a snapshot too
    with_stack: bool = False            # Python stacks of the operators (bigger traces)


@dataclass
class TrainConfig:
    seq_len: int = 256
    global_batch_size: int = 8          # sequences per optimizer step, over the DP group
    micro_batch_size: int = 0           # per DP rank per micro step; 0: no accumulation
    max_steps: int = 100
    seed: int = 1234
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    schedule: str = "cosine"            # cosine | wsd | linear | constant, after the warmup (train/schedule.py)
    decay_fraction: float = 0.2         # wsd: the last round(decay_fraction x max_steps) steps decay to min_lr
    decay_shape: str = "1-sqrt"         # wsd: linear | cosine | 1-sqrt
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = False
    max_bad_steps: int = 5              # consecutive NaN/inf steps before the run stops
    val_every: int = 0                  # 0: no periodic validation
    val_batches: int = 4                # global batches per validation (the same sequences at any dp)
    threads: int = 0                    # torch threads per process; 0: leave as is
    loss_chunk_tokens: int = 4096       # tokens per chunk of fp32 logits in the loss (chunk x vocab x 4 bytes)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    overrides: Dict[str, Any] = field(default_factory=dict)  # merged into the DS config as is


@dataclass
class WandbConfig:
    """logging.wandb: Weights & Biases tracking (pip install 'llm_lru[wandb]'; llm_lru/train/tracking.py)."""

    project: str = ""                   # "": off
    name: str = ""                      # the run's name; "": out_dir's folder name
    mode: str = "online"                # online | offline (a folder that `wandb sync` uploads later) | disabled
    entity: str = ""                    # team or user; "": the client's default
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_every: int = 1
    tensorboard: bool = True
    progress: str = "auto"              # auto | bar | lines
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 0                      # 0: only at the end
    every_minutes: float = 0.0          # also save when this much wall time passed since the last save; 0: off
    keep: int = 2
    resume: str = "auto"                # auto | none | a checkpoint path
    # A new run from these weights (a checkpoint, run dir or export dir): step 0, fresh data,
    # schedule and optimizer; ignored once the run has checkpoints of its own (train/init_from.py).
    init_from: str = ""
    init_optimizer: bool = False        # with init_from: keep the checkpoint's AdamW moments
    # Signals that make every rank finish its step, save and exit (code 75); [] leaves them alone.
    save_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class EvalConfig:
    suites: List[str] = field(default_factory=list)
    out: str = ""
    max_length: int = 0                 # 0: no cap; else lengths above it are left out
    chunk_size: int = 1024              # chunked prefill: tokens per forward
    seed: int = 0
    tokenizer: str = ""                 # "": the run's / export's; bytes | PREP_DIR | tokenizer.json
    progress: bool = True
    ppl_length: int = 0                 # 0: 4 x train.seq_len
    ppl_batches: int = 4                # rows of ppl_length tokens
    data_path: str = ""                 # prep folder for ppl when the target has no run config
    passkey_lengths: List[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768, 65536])
    passkey_depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 3
    niah_tasks: List[str] = field(default_factory=lambda: ["single", "multikey", "multivalue", "multiquery", "vt", "cwe"])
    niah_lengths: List[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])
    niah_trials: int = 4
    haystack: str = "auto"              # auto | data | fallback | a text file
    lm_eval_tasks: List[str] = field(default_factory=list)
    lm_eval_include: str = ""           # folder of local lm-eval task YAMLs
    lm_eval_limit: int = 0              # 0: all documents
    task_samples: int = 256             # mqar / state-tracking suites: eval samples


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


def _merge(base: DictConfig, other: Any, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except oc_errors.ConfigKeyError as e:
        raise ConfigError(f"{what}: unknown key '{e.full_key}'") from None
    except oc_errors.ValidationError as e:
        raise ConfigError(f"{what}: wrong type for '{e.full_key}': {e.msg.splitlines()[0]}") from None
    except TypeError as e:  # a key path into a list (data.sources.1.weight=...): omegaconf cannot merge it
        raise ConfigError(f"{what}: {e}; a list (such as data.sources) is overridden whole, "
                          "e.g. 'data.sources=[{path: a, weight: 1}, {path: b, weight: 2}]'") from None


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None,
                saved: bool = False) -> RunConfig:
    """Merge a YAML file and `key=value` overrides onto the schema, validate, return RunConfig.

    saved: the file is a config the trainer wrote (a run's or checkpoint's config.yaml): model
    keys it lacks take LEGACY_MODEL_DEFAULTS, the behaviour of the code that wrote it."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry the line
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if saved and isinstance(file_cfg.get("model"), DictConfig):
            for key, value in LEGACY_MODEL_DEFAULTS.items():
                if key not in file_cfg.model:
                    file_cfg.model[key] = value
        cfg = _merge(cfg, file_cfg, str(path))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except Exception as e:
            raise ConfigError(f"overrides: {e}") from None
        cfg = _merge(cfg, dot, "override")
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(run)
    return run


def from_dict(d: Dict[str, Any]) -> RunConfig:
    """Build a validated RunConfig from a plain (possibly partial) nested dict."""
    cfg = _merge(OmegaConf.structured(RunConfig), OmegaConf.create(d), "config")
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(run)
    return run


def to_dict(run: RunConfig) -> Dict[str, Any]:
    return dataclasses.asdict(run)


def save_config(run: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (readable back with load_config)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))


def source_name(src: SourceConfig) -> str:
    """A mixture source's name in logs and metrics: its `name`, else its folder's name."""
    return src.name or Path(src.path.rstrip("/")).name


def primary_data_path(d: DataConfig) -> str:
    """The shard folder whose tokenizer the run uses: data.path, else the first mixture source's."""
    return d.path or (d.sources[0].path if d.sources else "")


def layer_kinds(model: ModelConfig) -> List[str]:
    """Mixer kind of each layer: the pattern repeated and cut to n_layers."""
    kinds = {**DEFAULT_KINDS, **model.kinds}
    pattern = (model.pattern * (model.n_layers // max(len(model.pattern), 1) + 1))[: model.n_layers]
    return [kinds[c] for c in pattern]


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate_model(m: ModelConfig, key: str = "model") -> None:
    """Checks a model config alone (also used when loading a checkpoint or an export)."""
    _need(m.d_model > 0, f"{key}.d_model", f"must be positive, got {m.d_model}")
    _need(m.n_layers > 0, f"{key}.n_layers", f"must be positive, got {m.n_layers}")
    _need(len(m.pattern) > 0, f"{key}.pattern", "must not be empty")
    kinds = {**DEFAULT_KINDS, **m.kinds}
    for letter, kind in m.kinds.items():
        _need(kind in MIXER_KINDS, f"{key}.kinds.{letter}", f"unknown mixer kind '{kind}' (one of {', '.join(MIXER_KINDS)})")
    for c in m.pattern:
        _need(c in kinds, f"{key}.pattern", f"letter '{c}' maps to no mixer kind (known: {''.join(sorted(kinds))}; add it under {key}.kinds)")
    used = set(layer_kinds(m))
    d_state = m.d_state or m.d_model
    _need(1 <= m.block_size <= MAX_BLOCK_SIZE, f"{key}.block_size", f"must be in 1..{MAX_BLOCK_SIZE}, got {m.block_size}")
    if used & {"bdlru"}:
        _need(d_state % m.block_size == 0, f"{key}.block_size", f"must divide the state width {d_state} (model.d_state or model.d_model)")
    if used & {"lru", "blur"}:
        _need(d_state % 2 == 0, f"{key}.d_state", f"lru/blur need an even state width (complex pairs), got {d_state}")
        _need(0 < m.lru_r_min < m.lru_r_max < 1, f"{key}.lru_r_min", f"need 0 < lru_r_min < lru_r_max < 1, got {m.lru_r_min}, {m.lru_r_max}")
    _need(m.gate_norm in GATE_NORMS, f"{key}.gate_norm", f"unknown '{m.gate_norm}' (one of {', '.join(GATE_NORMS)})")
    # Choices spelled out here: the export vendors validate_model with a fixed list of names.
    _need(m.gate_init in GATE_INITS, f"{key}.gate_init", f"unknown '{m.gate_init}' (one of {', '.join(GATE_INITS)})")
    _need(m.hlru_readout in HLRU_READOUTS, f"{key}.hlru_readout",
          f"unknown '{m.hlru_readout}' (one of {', '.join(HLRU_READOUTS)})")
    if used & {"attn", "swa"}:
        _need(m.n_heads > 0 and m.d_model % m.n_heads == 0, f"{key}.n_heads", f"must divide d_model={m.d_model}, got {m.n_heads}")
        n_kv = m.n_kv_heads or m.n_heads
        _need(n_kv > 0 and m.n_heads % n_kv == 0, f"{key}.n_kv_heads", f"must divide n_heads={m.n_heads}, got {n_kv}")
        _need((m.d_model // m.n_heads) % 2 == 0, f"{key}.n_heads", "head dim d_model/n_heads must be even for RoPE")
    if "deltanet" in used:
        _need(m.n_heads > 0 and d_state % m.n_heads == 0, f"{key}.n_heads",
              f"deltanet needs n_heads to divide the state width {d_state}, got {m.n_heads}")
    if "swa" in used:
        _need(m.window > 0, f"{key}.window", f"must be positive, got {m.window}")
    if "blur" in used:
        _need(not m.causal, f"{key}.pattern", "blur is bidirectional and cannot sit in a causal LM stack (set model.causal=false for an encoder)")


def validate(run: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    validate_model(run.model)
    p, t, d = run.parallel, run.train, run.data
    _need(p.sp >= 1, "parallel.sp", f"must be >= 1, got {p.sp}")
    _need(p.carry in CARRIES, "parallel.carry", f"must be one of {', '.join(CARRIES)}, got '{p.carry}'")
    _need(p.backend in PROCESS_GROUP_BACKENDS, "parallel.backend",
          f"must be one of {', '.join(PROCESS_GROUP_BACKENDS)}, got '{p.backend}'")
    _need(t.seq_len >= 2, "train.seq_len", f"must be >= 2, got {t.seq_len}")
    _need(t.seq_len % p.sp == 0, "train.seq_len", f"{t.seq_len} is not divisible by parallel.sp={p.sp}")
    no_sp = sorted(set(layer_kinds(run.model)) & set(NO_SP_KINDS))
    _need(p.sp == 1 or not no_sp, "parallel.sp", f"{', '.join(no_sp)} layers have no sequence-parallel form; use sp = 1")
    _need(t.global_batch_size >= 1, "train.global_batch_size", f"must be >= 1, got {t.global_batch_size}")
    _need(t.micro_batch_size >= 0, "train.micro_batch_size", f"must be >= 0, got {t.micro_batch_size}")
    _need(t.max_steps >= 0, "train.max_steps", f"must be >= 0, got {t.max_steps}")
    _need(t.precision in ("auto", "fp32", "bf16"), "train.precision", f"must be auto, fp32 or bf16, got '{t.precision}'")
    _need(t.lr > 0 and 0 <= t.min_lr <= t.lr, "train.min_lr", f"need 0 <= min_lr <= lr and lr > 0, got lr={t.lr} min_lr={t.min_lr}")
    _need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _need(t.schedule in SCHEDULES, "train.schedule", f"unknown '{t.schedule}' (one of {', '.join(SCHEDULES)})")
    _need(t.decay_shape in DECAY_SHAPES, "train.decay_shape", f"unknown '{t.decay_shape}' (one of {', '.join(DECAY_SHAPES)})")
    _need(0 < t.decay_fraction <= 1, "train.decay_fraction", f"must be in (0, 1], got {t.decay_fraction}")
    _need(t.profile.start_step >= 0, "train.profile.start_step", f"must be >= 0 (0: off), got {t.profile.start_step}")
    _need(t.profile.steps >= 1, "train.profile.steps", f"must be >= 1, got {t.profile.steps}")
    if t.schedule == "wsd":
        decay = max(1, round(t.decay_fraction * t.max_steps))
        _need(t.warmup_steps + decay <= t.max_steps or t.max_steps == 0, "train.decay_fraction",
              f"the wsd decay ({decay} steps) and train.warmup_steps={t.warmup_steps} do not fit in "
              f"train.max_steps={t.max_steps}")
    _need(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    _need(t.val_every >= 0, "train.val_every", f"must be >= 0 (0: no validation), got {t.val_every}")
    _need(t.val_batches >= 1 or not t.val_every, "train.val_batches",
          f"must be >= 1 with train.val_every={t.val_every}, got {t.val_batches}")
    _need(t.loss_chunk_tokens >= 1, "train.loss_chunk_tokens", f"must be >= 1, got {t.loss_chunk_tokens}")
    _need(run.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {run.deepspeed.zero_stage}")
    _need(d.source in ("shards", "random", "synthetic"), "data.source", f"must be shards, random or synthetic, got '{d.source}'")
    if d.source == "shards" and not d.sources:
        _need(bool(d.path), "data.path", "required when data.source=shards (a folder with manifest.json, "
              "or data.sources for a mixture)")
    if d.sources:
        _need(d.source == "shards", "data.sources", f"a mixture reads shards, not data.source={d.source}")
        _need(not d.path and not d.val_path, "data.sources",
              "set either data.path (one source) or data.sources (a mixture), not both; a source's own "
              "validation folder is its val_path")
        for i, src in enumerate(d.sources):
            _need(bool(src.path), f"data.sources[{i}].path", "required (a folder with manifest.json)")
            _need(src.weight > 0 and math.isfinite(src.weight), f"data.sources[{i}].weight",
                  f"must be a positive number, got {src.weight}")
        names = [source_name(s) for s in d.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        _need(not dup, "data.sources", f"two sources named {dup[0]!r}: give them distinct names (name: ...)"
              if dup else "")
    if d.source == "synthetic":
        _need(bool(d.task), "data.task", "required when data.source=synthetic")
    _need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _need(run.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {run.checkpoint.every}")
    _need(run.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {run.checkpoint.keep}")
    _need(run.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", f"must be >= 0, got {run.checkpoint.every_minutes}")
    _need(bool(run.checkpoint.init_from) or not run.checkpoint.init_optimizer, "checkpoint.init_optimizer",
          "needs checkpoint.init_from (the checkpoint whose optimizer state to load)")
    for name in run.checkpoint.save_signals:
        _need(name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"), "checkpoint.save_signals",
              f"'{name}' is not one of SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP")
    _need(run.logging.progress in ("auto", "bar", "lines"), "logging.progress", f"must be auto, bar or lines, got '{run.logging.progress}'")
    _need(bool(run.out_dir), "out_dir", "must not be empty")
    wb = run.logging.wandb
    if wb.project:
        _need(wb.mode in ("online", "offline", "disabled"), "logging.wandb.mode",
              f"must be online, offline or disabled, got '{wb.mode}'")


def check_world(run: RunConfig, world_size: int) -> int:
    """Validate the config against a world size; returns dp = world_size / sp."""
    sp = run.parallel.sp
    _need(world_size % sp == 0, "parallel.sp", f"{sp} does not divide the world size {world_size}")
    dp = world_size // sp
    t = run.train
    _need(t.global_batch_size % dp == 0, "train.global_batch_size", f"{t.global_batch_size} is not divisible by the data-parallel size {dp}")
    if t.micro_batch_size:
        _need((t.global_batch_size // dp) % t.micro_batch_size == 0, "train.micro_batch_size",
              f"{t.micro_batch_size} does not divide the per-rank batch {t.global_batch_size // dp}")
    return dp
