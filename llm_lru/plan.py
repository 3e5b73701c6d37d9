"""`llm-lru plan CONFIG [key=value ...] [--gpus N] [--gpu-mem 80GiB]`: per-GPU memory of a run.

    p = plan(cfg, gpus=8, gpu_mem=80 * GiB)     # -> MemoryPlan (rows, total, fits, max_seq_len)

What a rank holds during one training step, in four parts:
- Model states: parameters, gradients and AdamW states, sharded over all ranks (dp x sp: ZeRO
  shards over the whole world, see train/engine.py) by the ZeRO stage, with DeepSpeed's flat
  fp32 partition and gradient buckets (the ZeRO paper's 2 + 2 + 12 bytes per parameter in bf16).
- Activations: bytes saved for backward per token, per layer kind. They are not guessed from
  formulas: `activation_probe` runs one block of each kind on this machine's CPU, in the run's
  dtype, at the config's widths, at two short lengths, and counts the bytes autograd saves
  (saved-tensor hooks, deduplicated by storage, parameters excluded); the slope is exact for the
  implementation in this checkout, because it is that implementation. With activation
  checkpointing a block keeps only its input, and the block being recomputed is transient.
- SP buffers: full-attention K/V gathered from the whole group (kept for backward), the
  sliding-window halo, the recurrent carries (all-gathered maps).
- Transients: the backward of the largest layer (WORKSPACE x its activations); the loss's chunk
  of logits (chunk x V in fp32, and its gradient), with the hidden-state and head gradients
  that the chunked loss computes in forward and holds until backward.
WORKSPACE and the CPU allocator's slack are the measured constants: bench/longctx.py measures
peak memory of real steps, fits them, and writes the planner's error beside its measurements
(bench/results/longctx.md). GPU numbers are predictions for the CUDA path from the CPU path's
saved tensors (the Triton scans save the same states; flash/flex attention the same q, k, v,
out, lse) until a GPU run measures them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llm_lru.config import ConfigError, ModelConfig, RunConfig, layer_kinds, load_config

GiB = 1 << 30
MiB = 1 << 20
# The backward's transient beyond the saved activations, in units of the largest layer's:
# fitted by bench/longctx.py on CPU (bench/results/longctx.md: 0.16; the rest of a layer's
# backward fits in the memory its own freed activations leave).
WORKSPACE = 0.16
# Per GPU, never available to tensors: CUDA context, NCCL buffers, the allocator's blocks.
GPU_RESERVE = 3 * GiB
# DeepSpeed's default bucket sizes (elements), used for ZeRO-1/2 gradient reduction and
# ZeRO-3 parameter prefetch (deepspeed/runtime/zero/config.py).
DS_REDUCE_BUCKET = 500_000_000
DS_STAGE3_PREFETCH = 50_000_000
PROBE_TOKENS = (256, 512)


@dataclass
class MemoryPlan:
    """Bytes per rank by component; `tokens` per rank per micro step."""
    rows: List[Tuple[str, float]]
    gpu_mem: float
    reserve: float
    tokens: int
    max_seq_len: int
    notes: List[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def fits(self) -> bool:
        return self.total + self.reserve <= self.gpu_mem


def parse_size(text: str) -> int:
    """'80GiB', '80GB' (taken as GiB: GPU marketing sizes are close to it), '512MiB', '1.5T'."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"--gpu-mem: cannot read '{text}' (e.g. 80GiB)")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()])


# ---- activations: measured on the implementation ---------------------------------------------

def _saved_bytes(fn, exclude: set) -> Tuple[int, object]:
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _doc_starts(T: int) -> torch.Tensor:
    """Packed documents of ~T/3 tokens: training always has document starts."""
    s = torch.zeros(1, T, dtype=torch.bool)
    s[0, :: max(1, T // 3)] = True
    return s


def activation_probe(model: ModelConfig, kind: str, dtype: torch.dtype,
                     tokens: Sequence[int] = PROBE_TOKENS) -> float:
    """Bytes that one block of `kind` saves for backward per token (B = 1, no checkpointing)."""
    from llm_lru.models.hybrid import Block

    torch.manual_seed(0)
    block = Block(model, kind).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    got = []
    for T in tokens:
        x = torch.randn(1, T, model.d_model, dtype=dtype, requires_grad=True)
        n, _ = _saved_bytes(lambda: block(x, _doc_starts(T))[0], params)
        got.append(n)
    return (got[1] - got[0]) / (tokens[1] - tokens[0])


# ---- the plan ---------------------------------------------------------------------------------

def _n_params(model: ModelConfig) -> Tuple[int, int]:
    """(total, largest block) parameter counts, built on the meta device (no memory)."""
    from llm_lru.models import HybridLM

    with torch.device("meta"):
        lm = HybridLM(model)
    return (sum(p.numel() for p in lm.parameters()),
            max(sum(p.numel() for p in b.parameters()) for b in lm.layers))


def model_state_bytes(n: int, largest_block: int, stage: int, shards: int, bf16: bool) -> List[Tuple[str, float]]:
    """Parameters, gradients, optimizer states per rank (DeepSpeed ZeRO with a torch AdamW)."""
    w = 2 if bf16 else 4                     # parameter and gradient bytes
    adam = 8.0 * n                            # exp_avg + exp_avg_sq, fp32
    if stage == 0:
        # bf16 without ZeRO: DeepSpeed's BF16_Optimizer keeps fp32 master weights and grads.
        extra = 8.0 * n if bf16 else 0.0
        return [("parameters", w * n), ("gradients", w * n), ("optimizer states", adam + extra)]
    master = 4.0 * n / shards                 # the flat fp32 partition the optimizer steps
    rows = [("optimizer states", (adam + 4.0 * n) / shards + master)]  # + the partition's fp32 grad
    if stage == 1:
        rows = [("parameters", w * n), ("gradients", w * n)] + rows
    elif stage == 2:
        rows = [("parameters", w * n), ("gradients", w * n / shards + w * min(DS_REDUCE_BUCKET, n))] + rows
    else:
        live = w * min(2 * max(DS_STAGE3_PREFETCH, largest_block), n)  # a gathered block + the prefetch
        rows = [("parameters", w * n / shards + live), ("gradients", w * n / shards)] + rows
    return rows


def plan(cfg: RunConfig, gpus: int, gpu_mem: float, precision: Optional[str] = None,
         reserve: float = GPU_RESERVE, probe: Optional[Dict[str, float]] = None) -> MemoryPlan:
    """The memory of one rank of `cfg` on `gpus` GPUs of `gpu_mem` bytes (see the module doc).

    precision: 'bf16' | 'fp32' (default: the config's; 'auto' means bf16, a GPU run).
    probe: {kind: saved bytes per token} to reuse (default: measured now).
    """
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if m.vocab_size <= 0:
        raise ConfigError("model.vocab_size: the planner needs it (0 means 'from the data'; pass model.vocab_size=N)")
    if gpus % p.sp:
        raise ConfigError(f"parallel.sp: {p.sp} does not divide --gpus {gpus}")
    dp = gpus // p.sp
    if t.global_batch_size % dp:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} does not split over dp = {dp}")
    micro = t.micro_batch_size or t.global_batch_size // dp
    prec = precision or ("bf16" if t.precision == "auto" else t.precision)
    bf16 = prec == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = 2 if bf16 else 4
    kinds = layer_kinds(m)
    probe = dict(probe or {})
    for k in sorted(set(kinds)):
        if k not in probe:
            probe[k] = activation_probe(m, k, dtype)
    n, largest = _n_params(m)
    rows = model_state_bytes(n, largest, cfg.deepspeed.zero_stage, gpus, bf16)
    d, hd = m.d_model, m.d_model // m.n_heads
    kv = (m.n_kv_heads or m.n_heads) * hd
    chunk = t.loss_chunk_tokens

    def token_linear(seq_len: int) -> List[Tuple[str, float]]:
        n_tok = micro * seq_len // p.sp                     # tokens this rank holds
        per_layer = [probe[k] * n_tok for k in kinds]
        if t.activation_checkpointing:
            # Each block keeps its input; the one being recomputed holds all of its own.
            act = len(kinds) * n_tok * d * w + max(per_layer)
        else:
            act = sum(per_layer)
        act += n_tok * (d * w + 8)                          # final norm input, loss statistics
        sp_buf = 0.0
        for k in kinds:
            if k == "attn" or (k == "swa" and m.window - 1 > seq_len // p.sp):
                sp_buf += 2 * micro * seq_len * kv * w * (p.sp - 1) / p.sp   # gathered K, V
            elif k == "swa" and p.sp > 1:
                sp_buf += 2 * micro * (m.window - 1) * kv * w                 # halo
        n_rec = sum(k not in ("attn", "swa") for k in kinds)
        state = (m.d_state or d) * (m.block_size + 1) * 4                     # (P, s) per row, fp32
        sp_buf += n_rec * micro * p.sp * state if p.sp > 1 else 0.0
        work = WORKSPACE * max(per_layer)
        # kernels/loss/op.py: one chunk of fp32 logits, turned into their gradient in place (and cast
        # to bf16 for the matmuls); the gradients of the hidden states (their dtype) and of the
        # head (fp32) are made in forward and held until backward.
        logit_bytes = 4 + (2 if bf16 else 0)
        loss = min(chunk, n_tok) * m.vocab_size * logit_bytes + n_tok * d * w + m.vocab_size * d * 4
        return [("activations", act), ("sp buffers", sp_buf), ("backward workspace", work),
                ("loss", loss)]

    rows = rows + token_linear(t.seq_len)
    fixed = sum(b for name, b in rows if name in ("parameters", "gradients", "optimizer states"))
    # Everything else is linear in seq_len (plus the loss chunk's cap): the longest that fits.
    step = 1024 * p.sp
    lo, hi = 0, 1
    budget = gpu_mem - reserve - fixed
    while hi < 1 << 40 and sum(b for _, b in token_linear(hi * step)) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(b for _, b in token_linear(mid * step)) <= budget:
            lo = mid
        else:
            hi = mid
    notes = [f"{gpus} GPUs = dp {dp} x sp {p.sp}, micro batch {micro}, {prec}, ZeRO-{cfg.deepspeed.zero_stage}, "
             f"activation checkpointing {'on' if t.activation_checkpointing else 'off'}, {n / 1e6:.1f}M parameters"]
    return MemoryPlan(rows, gpu_mem, reserve, micro * t.seq_len // p.sp, lo * step, notes)


def report(cfg_name: str, p: MemoryPlan) -> str:
    lines = [f"{cfg_name}: {p.notes[0]}", f"  tokens per rank per micro step: {p.tokens:,}"]
    for name, b in p.rows:
        lines.append(f"  {name:<20} {b / GiB:9.2f} GiB")
    lines.append(f"  {'total':<20} {p.total / GiB:9.2f} GiB  (+ {p.reserve / GiB:.1f} GiB reserve, "
                 f"of {p.gpu_mem / GiB:.0f} GiB: {'fits' if p.fits else 'DOES NOT FIT'})")
    lines.append(f"  longest train.seq_len that fits: {p.max_seq_len:,}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="llm-lru plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs in the run (default: parallel.sp, one SP group)")
    ap.add_argument("--gpu-mem", default="80GiB", help="memory per GPU (default 80GiB)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], help="default: the config's (auto = bf16)")
    args = ap.parse_intermixed_args(argv)   # overrides and options in any order
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size <= 0:
        from llm_lru.train.cli import resolve_vocab

        try:
            resolve_vocab(cfg)
        except ConfigError as e:
            raise ConfigError(f"{e} (for a plan without data, pass model.vocab_size=N)") from None
    gpus = args.gpus or cfg.parallel.sp
    try:
        mem = parse_size(args.gpu_mem)
    except ValueError as e:
        print(f"llm-lru plan: {e}", file=sys.stderr)
        return 2
    p = plan(cfg, gpus, mem, args.precision)
    print(report(args.config, p))
    return 0 if p.fits else 1
