"""One training step of a config's model on one GPU, next to an attention-only model of the same
size measured in the same run: tokens/s, MFU and peak memory. bench/gpu_check.sh runs it on a
lent GPU; the ratio printed is hybrid tokens/s over attention-only tokens/s.

    python bench/gpu_train_step.py [--config configs/hybrid-125m.yaml] [--dtype bf16|fp32]
        [--micro-batch B] [--seq-len T] [--vocab V] [--doc-len L] [--warmup 3] [--steps 10]
        [--out bench/results/gpu_train_step.json] [--smoke] [--resume]

A plain torch loop on one device, no DeepSpeed world: forward, loss, backward, gradient clipping,
AdamW step, on random tokens packed into documents (mean length --doc-len). Precision as under
DeepSpeed's bf16 mode: weights and activations in the model dtype (the scans accumulate their
state in fp32); the optimizer steps those weights directly, where DeepSpeed keeps fp32 masters,
so its step moves a few more bytes. The attention-only baseline is the same config with
`model.pattern=A`: the same width, depth, heads and MLPs, attention in every layer.

Per model: the median step time over --steps timed steps after --warmup (the first compiles the
Triton kernels), tokens/s, training FLOPs per token from llm_lru.train.monitor.flops_per_token
(6 N + attention), MFU against the datasheet bf16 peak (monitor.PEAK_BF16) and against a bf16
matmul measured in the same run, and the CUDA allocator's peak memory over the model's steps.

The loss routes: the head's fused linear cross-entropy, fwd + bwd, on the same hidden states,
weight and labels (B x T tokens, the model's D and V, the model dtype), through each route there
is here: "chunked" (llm_lru's ChunkedLinearCrossEntropy: bf16 matmuls, fp32 logits one chunk at a
time) and "fla" (fla's FusedLinearCrossEntropyLoss, CUDA with fla installed). Median time, peak
memory and loss of each, and "trainer_route": the one llm_lru.kernels.loss.op.loss_route picks for
training on this device, which every model row names too (loss_route).

The JSON is rewritten after the loss routes and after each model, so a run killed at its time
budget keeps what it measured; --resume keeps an earlier run's measured models and routes.

Without CUDA nothing is measured or written (so `make bench` never overwrites GPU numbers), except
with --smoke: a tiny model of the config's pattern on whatever device is here, which checks the
loop and the report; its numbers are not a timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llm_lru.config import ModelConfig, RunConfig, layer_kinds, load_config
from llm_lru.models import HybridLM
from llm_lru.train import monitor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DT = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_VOCAB = 50257  # the configs' "50K vocab" (bpe:50257) where the config leaves it to the data
# --smoke: the model (config overrides) and the run (this script's defaults).
SMOKE_MODEL = dict(d_model=64, n_heads=4, window=16)
SMOKE = dict(micro_batch=2, seq_len=64, vocab=256, doc_len=24, warmup=1, steps=3)


# ---- setup --------------------------------------------------------------------------------------

def load_run(config: str, smoke: bool) -> RunConfig:
    """The config, validated by load_config; shrunk to a tiny model of the same pattern for --smoke."""
    if not smoke:
        return load_config(config)
    m = load_config(config).model
    kv = 2 if m.n_kv_heads and m.n_kv_heads != m.n_heads else 0  # keep grouped-query attention grouped
    return load_config(config, [f"model.{k}={v}" for k, v in SMOKE_MODEL.items()] + [
        f"model.n_kv_heads={kv}", f"model.n_layers={len(m.pattern)}", "model.d_state=0", "model.ffn_dim=0"])


def attention_only(model: ModelConfig) -> ModelConfig:
    """The baseline: the same model with attention in every layer."""
    return dataclasses.replace(model, pattern="A", kinds={})


def make_batch(B: int, T: int, vocab: int, doc_len: int, device: torch.device, seed: int = 0):
    """Random tokens (B, T), next-token labels (B, T) and document starts (B, T) bool: packed
    documents of geometric length with mean doc_len (doc_len <= 0: one document per row)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    if doc_len > 0:
        doc_start = torch.rand(B, T, generator=g) < 1.0 / doc_len
    doc_start[:, 0] = True
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device), doc_start.to(device)


def loss_function(model: HybridLM) -> Tuple[Callable, str]:
    """(ids, labels, doc_start) -> mean loss, through the model's own training loss where it has
    one (no (B, T, V) logits, DESIGN.md §4b), else cross-entropy over its logits."""
    if callable(getattr(model, "loss", None)):
        return (lambda ids, labels, ds: model.loss(ids, labels, ds)), "model.loss"
    if "labels" in inspect.signature(model.forward).parameters:
        return (lambda ids, labels, ds: model(ids, ds, labels=labels)), "model(labels=...)"

    def logits_ce(ids, labels, ds):
        logits = model(ids, ds)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    return logits_ce, "cross_entropy(logits)"


# ---- timing -------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], device: torch.device) -> Tuple[float, object]:
    """(seconds, result) of fn(): CUDA events on a GPU, perf_counter elsewhere."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def matmul_flops(device: torch.device, n: int = 8192, reps: int = 10) -> Optional[float]:
    """Measured bf16 FLOP/s of an n x n x n matmul (median of reps after warm-up); None off GPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device)[0] for _ in range(reps)]
    return 2 * n ** 3 / statistics.median(times)


def measure(name: str, mcfg: ModelConfig, run: RunConfig, args, device: torch.device,
            peak: Optional[float], measured_peak: Optional[float]) -> Dict:
    """Build the model, run warm-up + timed training steps on one fixed batch, report."""
    torch.manual_seed(run.train.seed)
    dtype = DT[args.dtype]
    row: Dict = dict(name=name, pattern=mcfg.pattern, layers=layer_kinds(mcfg), d_model=mcfg.d_model,
                     n_layers=mcfg.n_layers, vocab_size=mcfg.vocab_size, dtype=args.dtype)
    model = HybridLM(mcfg).to(device=device, dtype=dtype).train()
    n_params = model.num_params()
    B, T = args.micro_batch, args.seq_len
    fpt = monitor.flops_per_token(mcfg, n_params, T)
    row.update(n_params=n_params, tokens_per_step=B * T, flops_per_token=fpt)
    opt = torch.optim.AdamW(model.parameters(), lr=run.train.lr, betas=(run.train.beta1, run.train.beta2),
                            eps=run.train.eps, weight_decay=run.train.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    loss_fn, row["loss_path"] = loss_function(model)
    from llm_lru.kernels.loss.op import loss_route
    row["loss_route"] = loss_route(device, True)  # the head's route under model.loss in training
    ids, labels, doc_start = make_batch(B, T, mcfg.vocab_size, args.doc_len, device, run.train.seed)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ids, labels, doc_start)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.grad_clip)
        opt.step()
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t, loss = timed(step, device)
        losses.append(float(loss))
        if i == 0:
            row["first_step_s"] = t  # includes compiling the kernels
        if i >= args.warmup:
            times.append(t)
    step_s = statistics.median(times)
    tps = B * T / step_s
    row.update(status="measured" if not args.smoke else "smoke: ran, not a timing",
               step_time_s=step_s, step_times_s=times, tokens_per_s=tps,
               achieved_tflops=tps * fpt / 1e12,
               mfu=tps * fpt / peak if peak else None,
               mfu_vs_measured_matmul=tps * fpt / measured_peak if measured_peak else None,
               peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                else monitor.memory_gb()),
               peak_memory_kind="CUDA allocator peak" if device.type == "cuda" else "process max RSS (CPU)",
               loss_first=losses[0], loss_last=losses[-1], losses=losses)
    return row


def loss_routes(mcfg: ModelConfig, args, device: torch.device, chunk_tokens: int) -> Dict:
    """Both loss routes, fwd + bwd, on the same batch: {routes: {name: row}, trainer_route}."""
    from llm_lru.kernels.loss.op import ChunkedLinearCrossEntropy, fla_loss_class, loss_route
    dtype = DT[args.dtype]
    M, D, V = args.micro_batch * args.seq_len, mcfg.d_model, mcfg.vocab_size
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(M, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * D ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (M,), generator=g).to(device)
    labels[::97] = -100  # a few ignored positions, as padding gives
    fla = fla_loss_class() if device.type == "cuda" else None
    runs: Dict[str, Callable] = {
        "chunked": lambda: ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, -100)}
    if fla is not None:
        fused = fla(ignore_index=-100, reduction="sum", num_chunks=max(1, -(-M // chunk_tokens)))
        runs["fla"] = lambda: fused(hidden, labels, weight)
    out: Dict = dict(tokens=M, d_model=D, vocab_size=V, dtype=args.dtype, chunk_tokens=chunk_tokens,
                     trainer_route=loss_route(device, True), routes={})
    for name, fn in runs.items():
        def step(fn=fn):
            hidden.grad = weight.grad = None
            loss = fn()
            loss.backward()
            return loss.detach()
        try:
            for _ in range(max(args.warmup, 1)):  # the first compiles fla's kernels
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times, loss = [], None
            for _ in range(args.steps):
                t, loss = timed(step, device)
                times.append(t)
            out["routes"][name] = dict(
                status="measured" if not args.smoke else "smoke: ran, not a timing", time_s=statistics.median(times),
                loss=float(loss), grad_norm_hidden=float(hidden.grad.float().norm()),
                peak_memory_gib=((torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda"
                                 else None))
        except Exception as e:  # noqa: BLE001 - a failing route is a result
            out["routes"][name] = dict(status=f"failed: {type(e).__name__}: {e}"[:500])
    if fla is None:
        out["routes"]["fla"] = dict(status="not run: " + ("fla is not installed" if device.type == "cuda"
                                                          else "fla's kernels need CUDA"))
    r = out["routes"]
    if "time_s" in r.get("fla", {}) and "time_s" in r["chunked"]:
        out["fla_over_chunked_time"] = r["fla"]["time_s"] / r["chunked"]["time_s"]
        out["loss_difference"] = abs(r["fla"]["loss"] - r["chunked"]["loss"])
    return out


def write_markdown(path: Path, result: Dict) -> None:
    meta = result["meta"]
    lines = ["# One training step (bench/gpu_train_step.py)", "",
             f"{meta['device']}, {meta['dtype']}, {meta['config']}: micro batch {meta['micro_batch']} x "
             f"seq {meta['seq_len']}, vocab {meta['vocab_size']}, documents of mean length {meta['doc_len']}; "
             f"median of {meta['steps']} steps after {meta['warmup']} warm-up. torch {meta['torch']}.", "",
             "| model | pattern | params (M) | step (ms) | tokens/s | TFLOP/s | MFU | MFU vs matmul | peak mem (GiB) | loss | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{v:.1%}" if v is not None else "n/a"  # noqa: E731
    for r in result["models"]:
        if "step_time_s" not in r:
            lines.append(f"| {r['name']} | {r['pattern']} | | | | | | | | | {r['status']} |")
            continue
        lines.append(f"| {r['name']} | {r['pattern']} | {r['n_params'] / 1e6:.1f} | {r['step_time_s'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.1f} | {pct(r['mfu'])} | "
                     f"{pct(r['mfu_vs_measured_matmul'])} | {r['peak_memory_gib']:.2f} | "
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {r['status']} |")
    lines += [""] + [f"{x['ratio']}: {x['value']:.2f}" for x in result["ratios"]] + [""]
    routes = result.get("loss_routes")
    if routes:
        lines += [f"Loss routes (fwd + bwd of the head's cross-entropy, {routes['tokens']} tokens, D {routes['d_model']}, "
                  f"V {routes['vocab_size']}, {routes['dtype']}, chunks of {routes['chunk_tokens']}); the trainer uses "
                  f"**{routes['trainer_route']}** here:", "", "| route | ms | peak mem (GiB) | loss | status |",
                  "|---|---|---|---|---|"]
        for name, r in routes["routes"].items():
            mem = r.get("peak_memory_gib")
            lines.append(f"| {name} | {r['time_s'] * 1e3:.2f} | {'' if mem is None else f'{mem:.2f}'} | "
                         f"{r['loss']:.4f} | {r['status']} |" if "time_s" in r else f"| {name} | | | | {r['status']} |")
        lines.append("")
    peak = meta.get("peak_flops_datasheet")
    mm = meta.get("matmul_flops_measured")
    lines.append(f"Peaks: datasheet bf16 {peak / 1e12:.0f} TFLOP/s" if peak else "Peaks: no datasheet peak for this device")
    lines[-1] += f"; measured bf16 8192^3 matmul {mm / 1e12:.0f} TFLOP/s." if mm else "; no matmul measured."
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "hybrid-125m.yaml"))
    ap.add_argument("--dtype", choices=sorted(DT), default="bf16")
    ap.add_argument("--micro-batch", type=int, help="sequences per step (default: train.micro_batch_size)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: train.seq_len)")
    ap.add_argument("--vocab", type=int, help=f"vocabulary (default: model.vocab_size, else {DEFAULT_VOCAB})")
    ap.add_argument("--doc-len", type=int, help="mean document length in the packed rows (default 1024; 0: one per row)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model of the config's pattern, on any device: "
                    "checks the loop and the report (not a timing)")
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_train_step.json"),
                    help="JSON results (and a .md beside it)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the loss routes and measured models of an existing --out, measure the rest")
    args = ap.parse_args(argv)
    run = load_run(args.config, args.smoke)
    defaults = SMOKE if args.smoke else dict(
        micro_batch=run.train.micro_batch_size or run.train.global_batch_size, seq_len=run.train.seq_len,
        vocab=run.model.vocab_size or DEFAULT_VOCAB, doc_len=1024, warmup=3, steps=10)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
        least = 0 if key in ("doc_len", "warmup") else 1
        if getattr(args, key) < least:
            raise ValueError(f"--{key.replace('_', '-')}: must be >= {least}, got {getattr(args, key)}")
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.smoke:
        print("gpu_train_step: no CUDA device: nothing measured, nothing written (--smoke checks the loop here)")
        return 0
    device = torch.device("cuda" if has_cuda else "cpu")
    vocab = args.vocab
    hybrid = dataclasses.replace(run.model, vocab_size=vocab)
    peak = monitor.peak_flops() if has_cuda else None
    measured_peak = matmul_flops(device)
    if has_cuda:
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(device) if has_cuda else f"cpu ({platform.machine()})",
                torch=torch.__version__, cuda=torch.version.cuda, config=args.config, dtype=args.dtype,
                micro_batch=args.micro_batch, seq_len=args.seq_len, vocab_size=vocab, doc_len=args.doc_len,
                warmup=args.warmup, steps=args.steps, smoke=args.smoke,
                peak_flops_datasheet=peak, matmul_flops_measured=measured_peak,
                note="plain torch loop on one device (no DeepSpeed); optimizer on the model-dtype weights")
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models: List[Dict] = []
    ratios: List[Dict] = []
    routes: Dict = {}
    if args.resume and out.is_file():
        try:
            old = json.loads(out.read_text())
        except ValueError:
            old = {}
        models = [r for r in old.get("models", []) if "tokens_per_s" in r]
        routes = old.get("loss_routes") or {}
        print(f"--resume: kept {[r['name'] for r in models]} and {'the' if routes else 'no'} loss routes from {out}")

    def save() -> None:  # after each part: a run killed at its time budget keeps what it measured
        result = dict(meta=meta, loss_routes=routes, models=models, ratios=ratios)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)
        write_markdown(out.with_suffix(".md"), result)

    chunk_tokens = run.train.loss_chunk_tokens if isinstance(run.train.loss_chunk_tokens, int) else 4096
    if not routes:
        routes.update(loss_routes(hybrid, args, device, chunk_tokens))
        if has_cuda:
            torch.cuda.empty_cache()
        for name, r in routes["routes"].items():
            print(f"loss route {name:8s} " + (f"{r['time_s'] * 1e3:9.2f} ms  loss {r['loss']:.4f}" if "time_s" in r
                                              else r["status"]), flush=True)
        print(f"the trainer's loss route here: {routes['trainer_route']}", flush=True)
        save()
    for name, mcfg in (("hybrid", hybrid), ("attention", attention_only(hybrid))):
        if any(r["name"] == name for r in models):
            continue
        try:
            row = measure(name, mcfg, run, args, device, peak, measured_peak)
        except Exception as e:  # noqa: BLE001 - one model failing must not hide the other's numbers
            row = dict(name=name, pattern=mcfg.pattern, status=f"failed: {type(e).__name__}: {e}"[:500])
        if has_cuda:
            torch.cuda.empty_cache()  # the model, its optimizer and activations are gone: start clean
        models.append(row)
        if "tokens_per_s" in row:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            print(f"{name:9s} {row['pattern']:6s} {row['n_params'] / 1e6:7.1f}M params  step {row['step_time_s'] * 1e3:9.1f} ms  "
                  f"{row['tokens_per_s']:12,.0f} tok/s  MFU {mfu:>6s}  "
                  f"peak {row['peak_memory_gib']:6.2f} GiB  loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}  "
                  f"[{row['loss_path']}, {row['loss_route']}]", flush=True)
        else:
            print(f"{name:9s} {row['status']}", flush=True)
        save()
    models.sort(key=lambda r: ["hybrid", "attention"].index(r["name"]))
    tps = {r["name"]: r.get("tokens_per_s") for r in models}
    if tps.get("hybrid") and tps.get("attention"):
        ratios.append(dict(ratio="hybrid / attention tokens_per_s", value=tps["hybrid"] / tps["attention"]))
        print(f"hybrid / attention tokens/s = {ratios[0]['value']:.2f}")
        save()
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if all("tokens_per_s" in r for r in models) else 1

if __name__ == "__main__":
    sys.exit(main())
