"""arXiv 2602.12021's findings as one reproducible table at CPU scale (issue 30): runs (or
resumes) the sweep of configs/sweeps/paper_table.yaml through bench/recall_sweep.py and writes
bench/results/paper_table.{md,json,png}: state tracking by block size and length generalisation,
A5 / S5 at m = 4 against m = 5, compression at matched parameters, and a verdict per claim.

    nice -n 15 python bench/paper_table.py [--jobs K] [--fresh] [--render-only]

--render-only rewrites the .md from the .json without running anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recall_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/sweeps/paper_table.yaml"
NAME = "paper_table"


def render(results, meta) -> str:
    """The paper table (see module doc); falls back to the sweep's own table if it cannot."""
    try:
        import paper_report

        return paper_report.render(results, meta)
    except Exception as e:  # a report bug must not stop a running sweep: the JSON is what counts
        return f"(paper report failed: {type(e).__name__}: {e}; the sweep table follows)\n\n" + \
            recall_sweep.markdown(results, meta)


def plot(results, path) -> None:
    """The paper table's plot (paper_report.plot); the sweep's own plot if it cannot."""
    try:
        import paper_report

        paper_report.plot(results, path)
    except Exception as e:  # never stop a running sweep for a plot
        print(f"paper_table: plot failed ({type(e).__name__}: {e}); the sweep's own plot instead")
        recall_sweep.plot(results, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--runs-dir", default="/tmp/llm_lru_recall_sweep")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once, in worker processes of one thread each")
    ap.add_argument("--fresh", action="store_true", help="rerun every cell, even those done in the .json")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render_only:
        data = json.loads((out / f"{NAME}.json").read_text())
        (out / f"{NAME}.md").write_text(render(data["results"], data["meta"]))
        plot(data["results"], out / f"{NAME}.png")
        return 0
    sweep = recall_sweep.load_sweep(args.config)
    recall_sweep.run(sweep, args.config, out, NAME, args.runs_dir, args.jobs, args.fresh, render=render, plotter=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
