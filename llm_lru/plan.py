"""`llm-lru plan CONFIG [key=value ...] [--gpus N] [--gpu-mem 80GiB]`: per-GPU memory of a run.

    p = plan(cfg, gpus=8, gpu_mem=80 * GiB)     # -> MemoryPlan (rows, total, fits, max_seq_len)

What a rank holds at the peak of one training step, by named row:
- Model states: parameters, gradients and AdamW states, sharded over all ranks (dp x sp: ZeRO
  shards over the whole world, see train/engine.py) by the ZeRO stage, with DeepSpeed's flat
  fp32 partition and gradient buckets (the ZeRO paper's 2 + 2 + 12 bytes per parameter in bf16).
- Per layer kind, two measured slopes, not formulas: `activation_probe` runs one block of each
  kind on this machine's CPU, in the run's dtype, at the config's widths, at two short lengths,
  and counts the bytes autograd saves (`saved`: saved-tensor hooks, deduplicated by storage,
  parameters excluded) and the most tensor memory its forward + backward hold at once (`peak`:
  LiveBytes, every storage an op makes until it is freed). Exact for the implementation in this
  checkout, because it is that implementation.
- Without activation checkpointing: `activations` (every block's saved bytes) and `backward
  workspace` (backward runs the blocks in reverse; block i's peak lands on blocks 0..i-1's
  activations). With it: `saved block inputs` (one hidden state per block) and `recompute live
  set` (the block being recomputed holds its activations and its backward's transients).
- `sp buffers`: full attention's K/V gathered from the whole group (kept for backward; the
  concatenation, and in backward the gathered gradients, are transient copies), the window's
  halo, the recurrent carries (all-gathered (P, s) maps); with checkpointing, those of the block
  being recomputed.
- The forward's end, when it holds more than backward does: `final norm` (its input and output)
  and `loss` (the chunked loss's hidden-state and head gradients, held until backward, and one
  chunk of logits).
- `loader batch`: input ids and labels (int64) and document starts.
- `allocator slack (CPU)`, for device="cpu" only: what glibc keeps mapped beyond the live
  tensors, the one fitted row (CPU_SLACK + CPU_SLACK_FRACTION x the backward's transient row while
  the step's tensors are small enough for glibc's heap: see linear_total in plan), fitted by
  bench/longctx.py on some of its cells and scored on the others (bench/results/longctx.md).
  Compare it with the trainer's `memory_step_gb`. On a GPU the caching allocator's slack is left
  to GPU_RESERVE.
GPU numbers are predictions for the CUDA path from the CPU path's tensors (the Triton scans save
the same states; flash/flex attention the same q, k, v, out, lse) until a GPU run measures them.
"""
from __future__ import annotations

import argparse
import re
import sys
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llm_lru.config import ConfigError, ModelConfig, RunConfig, layer_kinds, load_config

GiB = 1 << 30
MiB = 1 << 20
# Per GPU, never available to tensors: CUDA context, NCCL buffers, the allocator's blocks.
GPU_RESERVE = 3 * GiB
# DeepSpeed's default bucket sizes (elements), used for ZeRO-1/2 gradient reduction and
# ZeRO-3 parameter prefetch (deepspeed/runtime/zero/config.py).
DS_REDUCE_BUCKET = 500_000_000
DS_STAGE3_PREFETCH = 50_000_000
PROBE_TOKENS = (256, 512)
# A CPU process's memory above the planned tensors (glibc's kept heap, gloo and DeepSpeed
# buffers): fitted by bench/longctx.py (bench/results/longctx.md); plans with device="cpu" add it.
# bench/results/longctx.md: 400 MiB + 35% of the backward's transient row in glibc's heap regime.
CPU_SLACK = 400 * MiB
CPU_SLACK_FRACTION = 0.35
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB    # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


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


class LiveBytes(TorchDispatchMode):
    """Bytes of CPU tensor storage alive while the mode is on, and their peak: every storage an op
    makes is counted until it is freed (a weak reference's finalizer). Storages made before the
    mode (inputs, parameters) are not counted; what autograd's backward makes is, the CPU engine
    running it on the calling thread."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held: Dict[int, object] = {}

    def _freed(self, key: int, n: int) -> None:
        self.live -= n
        self._held.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._held:
                    self._held[key] = weakref.finalize(st, self._freed, key, st.nbytes())
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
        return out


@dataclass
class Probe:
    """Bytes per token of one block of a kind (B = 1, no checkpointing): `saved`, what autograd
    keeps from its forward for backward; `peak`, the most its forward + backward hold at once
    (the saved tensors, the output's gradient and the backward's own transients)."""
    saved: float
    peak: float


def activation_probe(model: ModelConfig, kind: str, dtype: torch.dtype,
                     tokens: Sequence[int] = PROBE_TOKENS) -> Probe:
    """Runs one block of `kind` at two lengths and takes the slopes (see Probe)."""
    from llm_lru.models.hybrid import Block

    torch.manual_seed(0)
    block = Block(model, kind).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved, peak = [], []
    for T in tokens:
        x = torch.randn(1, T, model.d_model, dtype=dtype, requires_grad=True)
        docs = _doc_starts(T)
        with LiveBytes() as live:
            n, y = _saved_bytes(lambda: block(x, docs)[0], params)
            y.backward(torch.ones_like(y))
        saved.append(n)
        peak.append(live.peak)
    dt = tokens[1] - tokens[0]
    return Probe((saved[1] - saved[0]) / dt, (peak[1] - peak[0]) / dt)


def probe_all(model: ModelConfig, dtype: torch.dtype) -> Dict[str, Probe]:
    """activation_probe for every layer kind of `model`."""
    return {k: activation_probe(model, k, dtype) for k in sorted(set(layer_kinds(model)))}


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
         reserve: float = GPU_RESERVE, probe: Optional[Dict[str, float]] = None, device: str = "gpu") -> MemoryPlan:
    """The memory of one rank of `cfg` on `gpus` GPUs of `gpu_mem` bytes (see the module doc).

    precision: 'bf16' | 'fp32' (default: the config's; 'auto' means bf16, a GPU run).
    probe: {kind: saved bytes per token} to reuse (default: measured now).
    device: 'gpu' | 'cpu' (a CPU run: its process slack is a row, as the trainer's memory_step_gb sees it).
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
        saved = [probe[k].saved * n_tok for k in kinds]
        peak = [probe[k].peak * n_tok for k in kinds]
        # SP exchanges per layer: full attention's K/V gathered from the whole group (kept for
        # backward; its concatenation and, in backward, the gathered gradient and the stacked one
        # to reduce-scatter are transient copies of the same size), the window's halo, the
        # recurrent carries (all-gathered (P, s) maps, fp32).
        kept, transient = [], []
        state = (m.d_state or d) * (m.block_size + 1) * 4
        for k in kinds:
            if p.sp == 1:
                g = 0.0
            elif k == "attn" or (k == "swa" and m.window - 1 > seq_len // p.sp):
                g = 2 * micro * seq_len * kv * w                          # gathered K, V (whole sequence)
            elif k == "swa":
                g = 2 * micro * (m.window - 1) * kv * w                   # halo
            else:
                g = micro * p.sp * state                                  # carries
            kept.append(g)
            transient.append(2 * g if k in ("attn", "swa") else g)
        L = len(kinds)
        hidden = n_tok * d * w
        if t.activation_checkpointing:
            # Each block keeps only its input; backward recomputes one block at a time, which then
            # holds its activations, its exchanges and its backward's transients at once (the
            # inputs of the blocks after it are freed by then).
            held = [("saved block inputs", L * hidden)]
            top = max(range(L), key=lambda i: peak[i] + kept[i] + transient[i] - (L - 1 - i) * hidden)
            back = ("recompute live set", peak[top] - (L - 1 - top) * hidden)
            sp_buf = kept[top] + transient[top]           # that block's exchanges only
        else:
            # Backward runs the blocks in reverse: block i's transients land on the activations
            # of blocks 0..i-1 (the later blocks' are freed by then) and its own.
            top = max(sum(saved[:i]) + sum(kept[:i]) + peak[i] + kept[i] + transient[i] for i in range(L))
            held = [("activations", sum(saved))]
            back = ("backward workspace", top - sum(saved) - sum(kept))
            sp_buf = sum(kept)
        # The forward's end: the final norm's input, output (the head's input) and statistics,
        # and kernels/loss/op.py's gradients of the hidden states (their dtype) and of the head (fp32),
        # made in forward and held until backward begins, with one chunk of fp32 logits (turned
        # into their gradient in place, and cast to bf16 for the matmuls). The step peaks there
        # or in backward, whichever holds more above what both share.
        logit_bytes = 4 + (2 if bf16 else 0)
        end = [("final norm", n_tok * (2 * d * w + 4)),
               ("loss", hidden + m.vocab_size * d * 4 + min(chunk, n_tok) * m.vocab_size * logit_bytes)]
        peak_rows = [back] if back[1] + (sp_buf if t.activation_checkpointing else 0) >= sum(b for _, b in end) else end
        # The loader's batch: input ids and labels (int64) and document starts.
        return held + peak_rows + [("sp buffers", sp_buf), ("loader batch", n_tok * (8 + 8 + 1))]

    def linear_total(seq_len: int) -> float:
        """The rows that grow with the tokens; on CPU the allocator's slack with them: glibc serves
        blocks under its mmap threshold from the heap, where the backward's freed transients stay
        mapped and fragment (the recompute allocates and frees them block after block); from
        (tokens, D) tensors of 32 MiB up the step's tensors are mapped and returned whole."""
        got = dict(token_linear(seq_len))
        b = sum(got.values())
        if device != "cpu":
            return b
        heap = micro * seq_len // p.sp * d * w < GLIBC_MMAP_THRESHOLD_MAX
        churn = got.get("recompute live set", got.get("backward workspace", 0.0))
        return b + CPU_SLACK + (CPU_SLACK_FRACTION * churn if heap else 0.0)

    rows = rows + token_linear(t.seq_len)
    if device == "cpu":
        rows.append(("allocator slack (CPU)", linear_total(t.seq_len) - sum(b for _, b in token_linear(t.seq_len))))
    fixed = sum(b for name, b in rows if name in ("parameters", "gradients", "optimizer states"))
    # Everything else is linear in seq_len (plus the loss chunk's cap): the longest that fits.
    step = 1024 * p.sp
    lo, hi = 0, 1
    budget = gpu_mem - reserve - fixed
    while hi < 1 << 40 and linear_total(hi * step) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if linear_total(mid * step) <= budget:
            lo = mid
        else:
            hi = mid
    notes = [f"{gpus} GPUs = dp {dp} x sp {p.sp}, micro batch {micro}, {prec}, ZeRO-{cfg.deepspeed.zero_stage}, "
             f"activation checkpointing {'on' if t.activation_checkpointing else 'off'}, {n / 1e6:.1f}M parameters"]
    return MemoryPlan(rows, gpu_mem, reserve, micro * t.seq_len // p.sp, lo * step, notes)


def report(cfg_name: str, p: MemoryPlan) -> str:
    lines = [f"{cfg_name}: {p.notes[0]}", f"  tokens per rank per micro step: {p.tokens:,}"]
    for name, b in p.rows:
        lines.append(f"  {name:<22} {b / GiB:9.2f} GiB")
    lines.append(f"  {'total':<22} {p.total / GiB:9.2f} GiB  (+ {p.reserve / GiB:.1f} GiB reserve, "
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
    ap.add_argument("--cpu", action="store_true",
                    help="a CPU run (one process per rank, no reserve, the allocator's slack added): "
                         "its total compares with the trainer's memory_step_gb")
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
    precision = args.precision
    if args.cpu and not precision and cfg.train.precision == "auto":
        precision = "fp32"                      # what precision=auto runs on CPU
    p = plan(cfg, gpus, mem, precision, **(dict(reserve=0, device="cpu") if args.cpu else {}))
    print(report(args.config, p))
    return 0 if p.fits else 1
