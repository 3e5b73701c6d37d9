"""bench/paper_report.py's verdicts from hand-made cells: a claim the cells support is
"reproduced", one they contradict "not reproduced", cells at chance "inconclusive"; empty cells
are marked with the command that fills them."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import paper_report  # noqa: E402

META = {"config": "configs/sweeps/paper_table.yaml", "machine": "test"}


def rows(task, mixer, accs, length_accs=None, params=1000):
    out = []
    for seed, a in enumerate(accs, 1):
        r = {"task": task, "mixer": mixer, "seed": seed, "accuracy": a, "params": params, "seconds": 1.0,
             "d_state": 32}
        if length_accs is not None:
            r["by_length"] = {L: {"accuracy": la[seed - 1], "accuracy_by_position": {"[0, 1)": 1.0}}
                              for L, la in length_accs.items()}
        out.append(r)
    return out


def verdict(results, start):
    sweep = paper_report.recall_sweep.load_sweep(str(paper_report.ROOT / META["config"]))
    found = [v for c, v, _ in paper_report.verdicts(paper_report.Cells(results, sweep)) if c.startswith(start)]
    assert len(found) == 1
    return found[0]


def test_parity_claim_follows_the_cells():
    good = []
    for t in ("parity_T32", "parity_T64"):
        good += rows(t, "bdlru_m2", [1.0, 1.0, 0.995]) + rows(t, "bdlru_m1", [0.8, 0.85, 0.7])
    assert verdict(good, "Parity") == "reproduced at CPU scale"
    bad = [dict(r, accuracy=0.6 if r["mixer"] == "bdlru_m2" else 0.9) for r in good]
    assert verdict(bad, "Parity") == "not reproduced"
    assert verdict(good[:6], "Parity") == "inconclusive"  # parity_T64 not run


def test_group5_at_chance_is_inconclusive_and_compression_compares_at_equal_params():
    chance = []
    for t in ("a5_T16", "s5_T16"):
        for m in ("bdlru_m1", "bdlru_m4", "bdlru_m5"):
            chance += rows(t, m, [0.08, 0.075, 0.09])  # the first position right (1/16), the rest guessed
    assert verdict(chance, "A5") == "inconclusive"
    m5_wins = [dict(r, accuracy=0.995) if r["mixer"] == "bdlru_m5" else r for r in chance]
    assert verdict(m5_wins, "A5") == "reproduced at CPU scale"
    m4_too = [dict(r, accuracy=0.995) if r["mixer"] in ("bdlru_m4", "bdlru_m5") else r for r in chance]
    assert verdict(m4_too, "A5") == "not reproduced"
    comp = rows("compression", "hlru_m4", [0.3, 0.28, 0.27]) + rows("compression", "bdlru_m4", [0.07, 0.06, 0.07])
    assert verdict(comp, "H-LRU") == "reproduced at CPU scale"
    flipped = [dict(r, accuracy=0.5 if r["mixer"] == "bdlru_m4" else 0.1) for r in comp]
    assert verdict(flipped, "H-LRU") == "not reproduced"


def test_render_marks_empty_cells_and_length_columns():
    res = rows("parity_T32", "bdlru_m2", [1.0, 1.0, 1.0], {"32": [1.0, 1.0, 1.0], "128": [1.0, 0.9, 0.95]})
    md = paper_report.render(res, META)
    assert "| BD-LRU m=2 | 1000 | 1.00 (1.00-1.00) 3/3 solved | 0.95 (0.90-1.00) 1/3 solved |" in md
    assert "not run (time)" in md and paper_report.COMMAND in md
    assert "runs done: 3 of 168" in md
