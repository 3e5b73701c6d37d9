"""Sequence parallelism on CPU: memory and step time per rank at a fixed total length.

    .venv/bin/python bench/sp.py [--tokens 16384] [--sp 1,2,4] [--steps 3] [--pattern BHGL]
                                 [--modes independent,allgather,ring,...] [--name sp] [--rounds 3]

Baseline: sp = 1 (one process, the unsplit model) measured in the same run. For sp = 2 and 4:
the all-gather carry, the ring carry, the all-gather carry under activation checkpointing
(every block recomputed in backward), all three as in training (final_state=False), and the ring carry
that also serves the sequence's final state (final_state=True: a broadcast per layer, which
stops the ranks from pipelining). One thread per rank (torch.set_num_threads(1)); gloo.
Per rank, for one forward + backward of the tiny model on one sequence of --tokens tokens:
- held: resident memory held after the forward (activations kept for backward, and logits),
  malloc_trim'd before and after; peak: the step's peak RSS (VmHWM) above the same baseline;
- step time: median of --steps timed steps after one warm-up (the slowest rank's), wall clock
  (and the fastest timed step: the one the machine's other tenants disturbed least), and process CPU time (the work one rank does; gloo waits block, they cost no CPU). On a
  shared machine the wall-clock ratio mostly measures the other jobs: every layer's collective
  waits for the rank the scheduler starved; the CPU ratio is what a core per rank would give
  if communication were free;
- carry bytes: what each rank's SP scans send and receive per layer per step (forward +
  backward), counted at the collectives, next to the size of one layer's activation (B, T/sp, D).
A ceiling row per sp ("independent"): sp processes started together, each running the unsplit model
on T/sp tokens with no communication at all: what this machine gives concurrent processes, the best
any SP scheme could do here. Each SP row's "of ceiling" is that row's time against it.
--rounds: every row is run that many times, all rows once per round, and each round's ratios are
taken against that round's sp = 1 and ceiling; the table gives the median and (min-max) over rounds.
Writes bench/results/NAME.json and NAME.md (NAME: --name, default sp). Ratios are against sp = 1 in this run.
The machine's other load moves the times: the ratios are only as good as the quiet they ran in.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.distributed import run_world  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _rss() -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is what is held
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")


def _peak() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


class _Counter:
    """Counts the bytes SP scans exchange, by wrapping the collectives llm_lru.parallel.scan uses."""

    def __init__(self):
        import llm_lru.parallel.scan as S
        self.bytes, self.calls, self.S = 0, 0, S
        for name in ("all_gather", "all_reduce", "send", "send_async", "recv", "broadcast"):
            setattr(S, name, self._wrap(getattr(S, name)))
        call = S.SPScan.__call__

        def counted(op, *a, **k):
            self.calls += 1
            return call(op, *a, **k)
        S.SPScan.__call__ = counted

    def _wrap(self, fn):
        def wrapped(x, *a, **k):
            out = fn(x, *a, **k)
            got = out if isinstance(out, torch.Tensor) else x  # send returns None: count what left
            self.bytes += got.numel() * got.element_size()
            return out
        return wrapped


def _worker(rank, world, cfg_kw, tokens, steps, carry, checkpointed, final_state):
    import torch.distributed as dist

    from llm_lru.config import ModelConfig, ParallelConfig
    from llm_lru.models import HybridLM
    from llm_lru.parallel import build_mesh, parallelize, sp_dp_loss

    torch.set_num_threads(1)
    counter = _Counter() if world > 1 else None
    mesh = build_mesh(sp=world)
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**cfg_kw))
    independent = carry == "independent"  # the machine's ceiling: no SP, no exchange, same slice sizes
    if not independent:
        model = parallelize(model, mesh, ParallelConfig(carry=carry), activation_checkpointing=checkpointed,
                            final_state=final_state)
    ids, labels, docs = batch(cfg_kw, tokens)
    t_local = mesh.check_length(tokens, "--tokens")
    ids, labels, docs = mesh.local_slice(ids), mesh.local_slice(labels), mesh.local_slice(docs)

    def step(measure=False):
        model.zero_grad(set_to_none=True)
        if measure:
            base = _rss()
            _reset_peak()
        logits = model(ids, docs, pos_offset=mesh.pos_offset(t_local))
        if independent:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            value = loss.detach()
        else:
            loss, value = sp_dp_loss(logits, labels, mesh)
        held = _rss() - base if measure else 0
        loss.backward()
        peak = _peak() - base if measure else 0
        return float(value), held, peak

    step()  # warm-up
    if counter:
        counter.bytes = counter.calls = 0
    value, held, peak = step(measure=True)
    exchanged, scans = (counter.bytes, counter.calls) if counter else (0, 0)
    times, cpu = [], []
    for _ in range(steps):
        if world > 1:
            dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return dict(loss=value, held=held, peak=peak, step_s=statistics.median(times), cpu_s=statistics.median(cpu),
                step_min_s=min(times),
                exchanged=exchanged,
                scans=scans, act_layer=t_local * cfg_kw["d_model"] * 4)


# name -> (carry, activation checkpointing, final_state); training needs no final state (final_state=False).
# "independent": sp processes each train the unsplit model on their T/sp tokens with no exchange
# at all, started together: the most any SP scheme can reach on this machine (shared caches and
# memory bandwidth slow concurrent processes down), the ceiling the SP rows are read against.
MODES = {"independent": ("independent", False, False), "allgather": ("allgather", False, False),
         "ring": ("ring", False, False), "allgather+ckpt": ("allgather", True, False),
         "ring+final_state": ("ring", False, True)}


def _measure(sp, carry, checkpointed, final_state, tokens, steps, cfg_kw) -> dict:
    t0 = time.time()
    per_rank = run_world(_worker, sp, cfg_kw, tokens, steps, carry if sp > 1 else "allgather", checkpointed,
                         final_state, timeout=1800)
    name = carry + ("+ckpt" if checkpointed else "") + ("+final_state" if final_state else "")
    row = dict(sp=sp, carry=name, loss=per_rank[0]["loss"],
               held_mb=max(r["held"] for r in per_rank) / 2**20,
               peak_mb=max(r["peak"] for r in per_rank) / 2**20,
               step_s=max(r["step_s"] for r in per_rank), cpu_s=max(r["cpu_s"] for r in per_rank),
               step_min_s=max(r["step_min_s"] for r in per_rank),
               carry_kb_per_layer=(max(r["exchanged"] / max(r["scans"], 1) for r in per_rank) / 1024),
               act_kb_per_layer=per_rank[0]["act_layer"] / 1024, wall_s=time.time() - t0)
    print(json.dumps(row), flush=True)
    return row


def run(tokens: int, sps, steps: int, cfg_kw: dict, mode_names=tuple(MODES), rounds: int = 1):
    """Every variant once per round, rounds one after another; each round's ratios are against
    that round's own sp = 1 and ceiling (so slow drift in the machine's load cancels), and each
    row reports the median over rounds with the range."""
    modes = [MODES[m] for m in mode_names]
    variants = [(1, ("none", False, False))] + [(sp, mode) for sp in sps if sp > 1 for mode in modes]
    by_round = []
    for _ in range(rounds):
        rows = [_measure(sp, *mode, tokens, steps, cfg_kw) for sp, mode in variants]
        base = rows[0]
        for row in rows:
            row["held_vs_sp1"] = row["held_mb"] / base["held_mb"]
            row["peak_vs_sp1"] = row["peak_mb"] / base["peak_mb"]
            row["speedup_vs_sp1"] = base["step_s"] / row["step_s"]
            row["fastest_speedup_vs_sp1"] = base["step_min_s"] / row["step_min_s"]
            row["cpu_speedup_vs_sp1"] = base["cpu_s"] / row["cpu_s"]
            ceiling = next((c for c in rows if c["sp"] == row["sp"] and c["carry"] == "independent"), None)
            row["of_ceiling"] = ceiling["step_s"] / row["step_s"] if ceiling and row["sp"] > 1 else None
            row["fastest_of_ceiling"] = (ceiling["step_min_s"] / row["step_min_s"]
                                         if ceiling and row["sp"] > 1 else None)
        by_round.append(rows)
    out = []
    for i in range(len(variants)):
        runs = [rows[i] for rows in by_round]
        row = dict(runs[0])
        for key in ("held_mb", "peak_mb", "held_vs_sp1", "peak_vs_sp1"):
            row[key] = max(r[key] for r in runs)  # memory: the worst round
        for key in ("step_s", "cpu_s", "speedup_vs_sp1", "cpu_speedup_vs_sp1", "of_ceiling", "step_min_s",
                    "fastest_speedup_vs_sp1", "fastest_of_ceiling"):
            if row[key] is not None:
                vals = [r[key] for r in runs]
                row[key], row[key + "_range"] = statistics.median(vals), [min(vals), max(vals)]
        row["rounds"] = runs
        out.append(row)
    return out


def _ranged(row, key) -> str:
    lo, hi = row.get(key + "_range", [row[key]] * 2)
    return f"{row[key]:.2f}" if lo == hi else f"{row[key]:.2f} ({lo:.2f}-{hi:.2f})"


def write(rows, meta, name="sp"):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [f"# Sequence parallelism on CPU ({meta['tokens']} tokens, model {meta['model']})", "",
             f"Baseline: sp = 1 in the same run. {meta['note']}", "",
             "| sp | carry | held MB/rank | x sp1 | peak MB/rank | x sp1 | step s (wall) | speedup | "
             "of ceiling | fastest step: speedup | of ceiling | CPU s/rank | CPU speedup | carry KB/layer/step | "
             "activation KB/layer | loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sp']} | {r['carry']} | {r['held_mb']:.1f} | {r['held_vs_sp1']:.2f} | {r['peak_mb']:.1f} | "
                     f"{r['peak_vs_sp1']:.2f} | {r['step_s']:.2f} | {_ranged(r, 'speedup_vs_sp1')} | "
                     f"{'-' if r['of_ceiling'] is None else _ranged(r, 'of_ceiling')} | "
                     f"{_ranged(r, 'fastest_speedup_vs_sp1')} | "
                     f"{'-' if r['fastest_of_ceiling'] is None else _ranged(r, 'fastest_of_ceiling')} | "
                     f"{r['cpu_s']:.2f} | {r['cpu_speedup_vs_sp1']:.2f} | "
                     f"{r['carry_kb_per_layer']:.1f} | {r['act_kb_per_layer']:.0f} | "
                     f"{'(own slice)' if r['carry'] == 'independent' else format(r['loss'], '.6f')} |")
    lines += ["", "independent: sp processes started together, each training the unsplit model on its T/sp tokens "
              "with no exchange (its loss is its own slice's): the most any SP scheme can reach on this machine. "
              "'of ceiling' = independent step time / this row's step time (same sp). "
              "fastest step: the same ratios from each run's fastest timed step (the slowest rank's) instead of "
              "its median: the least disturbed by the other tenants of a shared machine."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--tokens, --pattern, --d-model: the sequence and the tiny model the SP benches train."""
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--pattern", default="BHGL")
    ap.add_argument("--d-model", type=int, default=64)


def batch(cfg_kw: dict, tokens: int):
    """(ids, labels, doc starts) of one sequence, the same on every rank: a few documents, some across ranks."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg_kw["vocab_size"], (1, tokens), generator=g)
    labels = torch.randint(0, cfg_kw["vocab_size"], (1, tokens), generator=g)
    docs = torch.rand(1, tokens, generator=g) < 1 / 2048
    docs[:, 0] = True
    return ids, labels, docs


def model_config(args) -> dict:
    return dict(vocab_size=256, d_model=args.d_model, n_layers=len(args.pattern), pattern=args.pattern,
                block_size=4, n_heads=4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--sp", default="1,2,4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES), help="which rows per sp > 1, of: " + ",".join(MODES))
    ap.add_argument("--name", default="sp", help="results file stem under bench/results/")
    ap.add_argument("--rounds", type=int, default=3, help="run every variant this many times, in rounds")
    args = ap.parse_args(argv)
    mode_names = args.modes.split(",")
    unknown = [m for m in mode_names if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    cfg_kw = model_config(args)
    sps = [int(s) for s in args.sp.split(",")]
    rows = run(args.tokens, sps, args.steps, cfg_kw, mode_names, args.rounds)
    load = os.getloadavg()
    meta = dict(tokens=args.tokens, model=cfg_kw, steps=args.steps, rounds=args.rounds, cpus=os.cpu_count(),
                loadavg=load, torch=torch.__version__,
                note=(f"{os.cpu_count()} CPU cores, one thread per rank, load average {load[0]:.1f} at the end "
                      "(other jobs shared the machine); sp = 4 runs 4 ranks on these cores. "
                      f"{args.rounds} rounds of every row: times are medians over rounds, speedup and 'of ceiling' "
                      "the median of each round's ratio to that round's sp = 1 and ceiling, (min-max) over rounds; "
                      "memory the largest round."))
    write(rows, meta, args.name)
    for r in rows:
        print(f"sp={r['sp']} {r['carry']:>20}: held {r['held_vs_sp1']:.2f}x, peak {r['peak_vs_sp1']:.2f}x, "
              f"speedup {r['speedup_vs_sp1']:.2f}x (CPU {r['cpu_speedup_vs_sp1']:.2f}x), carry {r['carry_kb_per_layer']:.1f} KB/layer vs "
              f"activation {r['act_kb_per_layer']:.0f} KB/layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
