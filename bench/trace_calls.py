"""How many places a reader crosses to follow one BD-LRU block forward: a call trace of the project's
own functions (sys.setprofile), sequence parallel over two gloo processes on CPU.

    .venv/bin/python bench/trace_calls.py [--tokens 64] [--d-model 32] [--rank 0] [--out FILE.json]

Each of --sp processes (gloo, one thread) builds the same tiny HybridLM with one BD-LRU layer
(pattern B, m = 4, softmax gates), wraps it for sequence parallelism (`parallelize`, the all-gather
carry, training mode) and runs its first block (norm, BD-LRU mixer, norm, MLP) once on its slice of
a packed sequence (document starts inside it) to warm up, then once more under a profiler, forward
only. Counted on rank --rank: every Python call whose code lives under the repository root (torch,
numpy and the standard library are not counted), as

- calls: call events of project code;
- functions: distinct project functions (file, first line, name);
- files: distinct project files;
- file switches: consecutive project calls whose files differ (the jumps a reader makes between
  files when reading the calls in order).

The script imports the tree it sits in (its parent folder goes first on sys.path), so a copy of it
in another checkout measures that checkout: the before/after of bench/results/layout_trace.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# An installed llm_lru (its lm-eval hook is imported at interpreter start) may be another checkout:
# drop it, so that this tree's own package is the one imported.
for _name in [n for n in sys.modules if n == "llm_lru" or n.startswith("llm_lru.")]:
    if not str(getattr(sys.modules[_name], "__file__", "") or "").startswith(str(ROOT)):
        del sys.modules[_name]

import torch  # noqa: E402

from tests.distributed import run_world  # noqa: E402


def _worker(rank, world, tokens, d_model, root):
    from llm_lru.config import ModelConfig, ParallelConfig
    from llm_lru.models import HybridLM
    from llm_lru.parallel import build_mesh, parallelize

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=d_model, n_layers=1, pattern="B", block_size=4, n_heads=4)
    mesh = build_mesh(sp=world)
    model = parallelize(HybridLM(cfg), mesh, ParallelConfig(carry="allgather"), final_state=False)
    block = model.layers[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, d_model, generator=g)
    docs = torch.zeros(1, tokens, dtype=torch.bool)
    docs[:, 0] = True
    docs[:, tokens // 3] = True  # one document boundary inside a slice
    x, docs = mesh.local_slice(x), mesh.local_slice(docs)
    x.requires_grad_()
    pos = mesh.pos_offset(x.shape[1])  # outside the trace: the harness's call, not the block's
    block(x, docs, None, pos)  # warm-up: first-call imports and caches

    events = []
    root = str(root) + "/"
    where = {}  # code file -> its path in the tree (links of an editable install resolved), or None

    def project_file(name):
        if name not in where:
            real = os.path.realpath(name) if os.path.isabs(name) else ""  # not "<frozen os>" and the like
            inside = real.startswith(root) and not real[len(root):].startswith((".venv", "build/"))
            where[name] = real[len(root):] if inside else None
        return where[name]

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            f = project_file(code.co_filename)
            if f is not None:
                events.append((f, code.co_firstlineno, code.co_qualname))

    sys.setprofile(profile)
    try:
        block(x, docs, None, pos)
    finally:
        sys.setprofile(None)
    return events


def summarise(events):
    """{calls, functions, files, file_switches, file_order, per_file} of one rank's call events."""
    files = [e[0] for e in events]
    order = []
    for f in files:
        if not order or order[-1] != f:
            order.append(f)
    per_file = {}
    for f in files:
        per_file[f] = per_file.get(f, 0) + 1
    return {"calls": len(events), "functions": len(set(events)), "files": len(set(files)),
            "file_switches": len(order) - 1, "file_order": order, "per_file": per_file,
            "functions_list": sorted({f"{e[0]}:{e[1]} {e[2]}" for e in events})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens of the whole sequence (split over --sp)")
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--rank", type=int, default=0, help="whose trace to report")
    ap.add_argument("--out", default=None, help="also write the summary here (JSON)")
    args = ap.parse_args(argv)
    per_rank = run_world(_worker, args.sp, args.tokens, args.d_model, str(ROOT))
    s = summarise(per_rank[args.rank])
    s["tree"] = str(ROOT)
    print(f"{ROOT}: {s['calls']} project calls, {s['functions']} functions, {s['files']} files, "
          f"{s['file_switches']} file switches (rank {args.rank} of sp = {args.sp})")
    print("files, in call order: " + " -> ".join(s["file_order"]))
    for f, n in sorted(s["per_file"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d}  {f}")
    if args.out:
        Path(args.out).write_text(json.dumps(s, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
