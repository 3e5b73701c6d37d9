"""Every suite on a tiny random model through `llm-lru eval`, plus the prompt builders."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_lru.cli import main as llm_lru_main
from llm_lru.config import EvalConfig
from llm_lru.data_prep.tokenizer import make_tokenizer
from llm_lru.eval import niah, passkey
from llm_lru.eval.haystack import PASSKEY_FILLER, assemble, make_haystack
from llm_lru.eval.load import load_target
from llm_lru.eval.ppl import context_positions

from .helpers import fake_run, is_png

# Two layers (block-diagonal recurrence + attention): the suites' loops, not the mixers, are
# under test here (test_prefill covers every mixer kind).
SMALL = {"vocab_size": 258, "d_model": 32, "n_layers": 2, "pattern": "BA", "n_heads": 2, "block_size": 2}

TOK = make_tokenizer("bytes")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "run"
    fake_run(d, {"model": SMALL, "data": {"source": "random"}, "train": {"seq_len": 24}})
    return d


def test_load_target_reads_the_checkpoint(run_dir):
    target = load_target(run_dir)
    ref = fake_run(run_dir.parent / "again", {"model": SMALL, "data": {"source": "random"}, "train": {"seq_len": 24}})
    ids = torch.randint(0, 258, (1, 10))
    torch.testing.assert_close(target.model(ids), ref(ids))
    assert target.train_len == 24 and target.tokenizer is None


def test_cli_all_suites_write_well_formed_reports(run_dir, tmp_path):
    out = tmp_path / "report"
    rc = llm_lru_main(["eval", str(run_dir), "--suite", "ppl,passkey,niah", "--out", str(out), "--tokenizer", "bytes",
                       "--chunk-size", "64", "--no-progress", "ppl_batches=2", "passkey_lengths=[300,400]",
                       "passkey_depths=[0.0,1.0]", "passkey_trials=1", "niah_lengths=[600]", "niah_trials=1"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    by = {r["suite"]: r for r in rep["suites"]}
    assert set(by) == {"ppl", "passkey", "niah"} and not any("error" in r for r in by.values())
    # ppl: 4 x train length by default, per-position bins that add up to the tokens scored
    assert by["ppl"]["settings"]["length"] == 96
    rows = by["ppl"]["tables"][0]["rows"]
    assert sum(r[1] for r in rows) == by["ppl"]["metrics"]["tokens"] == 2 * 96
    assert 0 < by["ppl"]["metrics"]["val_loss"] < 20
    # passkey: a full grid, accuracies in [0, 1]
    grid = by["passkey"]["tables"][0]["rows"]
    assert [(r[0], r[1]) for r in grid] == [(300, 0.0), (300, 1.0), (400, 0.0), (400, 1.0)]
    assert all(r[2] == 1 and 0 <= r[3] <= 1 for r in grid)
    tasks_run = {r[0] for r in by["niah"]["tables"][0]["rows"] if r[3] is not None}
    assert tasks_run == set(niah.TASKS)
    for p in ("ppl_by_position.png", "passkey.png", "niah.png"):
        assert is_png(out / p)
    md = (out / "report.md").read_text()
    assert "## ppl" in md and "## passkey" in md and "## niah" in md and "![passkey.png](passkey.png)" in md


def test_cli_errors(run_dir, tmp_path, capsys):
    assert llm_lru_main(["eval", str(run_dir), "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "eval.suites" in capsys.readouterr().err
    assert llm_lru_main(["eval", str(run_dir), "--suite", "ppl", "--out", str(tmp_path), "bogus=1"]) == 2
    assert "eval.bogus" in capsys.readouterr().err
    # a suite that cannot run is reported, the others still run, and the exit status says so
    rc = llm_lru_main(["eval", str(run_dir), "--suite", "passkey,ppl", "--out", str(tmp_path), "--no-progress",
                       "ppl_batches=1"])
    assert rc == 1
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "tokenizer" in rep["suites"][0]["error"] and "metrics" in rep["suites"][1]


def test_passkey_prompt_exact_length_and_depth():
    filler = TOK.encode(PASSKEY_FILLER) * 40
    for L in (300, 1000):
        for d in (0.0, 0.5, 1.0):
            ids = passkey.passkey_prompt(TOK, L, d, 12345, filler)
            assert len(ids) == L and ids[0] == TOK.bos_id
            text = TOK.decode(ids[1:])
            at = text.index("The pass key is 12345")
            head, tail = len(passkey.PREFIX), len(text) - len(passkey.QUESTION)
            frac = (at - head) / (tail - head - len(passkey.NEEDLE.format(key=12345)))
            assert abs(frac - d) < 0.05
            assert text.endswith(passkey.QUESTION)
    assert passkey.passkey_prompt(TOK, 50, 0.5, 12345, filler) is None
    assert passkey.first_number(" 12345. Remember") == 12345 and passkey.first_number("none") is None


def test_assemble_keeps_needles_whole_and_ordered():
    out = assemble(20, [1], [0] * 30, [[7, 7], [8, 8, 8]], [0.9, 0.1], [9])
    assert len(out) == 20 and out[0] == 1 and out[-1] == 9
    s = "".join(map(str, out))
    assert s.index("888") < s.index("77")
    assert assemble(5, [1], [0] * 30, [[7, 7, 7, 7]], [0.5], [9]) is None


@pytest.mark.parametrize("task", niah.TASKS)
def test_niah_prompts_hold_their_answers(task):
    hay = make_haystack("fallback", TOK, None, 3000, seed=0)
    rng = np.random.default_rng(0)
    ids, refs = niah.build(task, TOK, hay, 3000, rng)
    assert len(ids) == 3000 and ids[0] == TOK.bos_id
    text = TOK.decode(ids)
    for r in refs:
        assert r in text
    if task == "multikey":
        assert text.count("special magic numbers for") == 4  # the needle and 3 distractors
        key = re.search(r"magic number for (\w+) mentioned", text).group(1)
        assert f"for {key} is: {refs[0]}." in text
    if task == "multivalue":
        assert len(set(refs)) == 4
    if task == "vt":
        # the chain runs forward in the text: VAR X1 = value first, each later one names the previous
        first = text.index(f"VAR {refs[0]} = ")
        for a, b in zip(refs, refs[1:]):
            assert text.index(f"VAR {b} = VAR {a}.") > first
    if task == "cwe":
        words = re.findall(r"\d+\. (\w+)", text)
        counts = {w: words.count(w) for w in set(words)}
        top = sorted(counts, key=counts.get, reverse=True)[:10]
        assert set(top) == set(refs) and min(counts[w] for w in refs) > max(
            (c for w, c in counts.items() if w not in refs), default=0)
    assert niah.score(" " + ", ".join(refs), refs) == 1.0
    assert niah.score("nothing", refs) == 0.0


def test_context_positions():
    ds = torch.tensor([[False, False, True, False, False, True]])
    assert context_positions(ds).tolist() == [[0, 1, 0, 1, 2, 0]]


def test_max_length_caps_lengths(run_dir, tmp_path):
    target = load_target(run_dir, "bytes")
    res = passkey.run(target, EvalConfig(passkey_lengths=[300, 5000], passkey_depths=[0.5], passkey_trials=1,
                                         max_length=400, progress=False), tmp_path)
    assert res["settings"]["lengths"] == [300]


@pytest.mark.slow  # transformers' remote-code loading: ~15-50 s here
def test_eval_reads_an_export(run_dir, tmp_path):
    """`llm-lru eval EXPORT_DIR`: the export issue's HF folder loads to the same model."""
    from llm_lru.export.exporter import export

    tok_file = tmp_path / "tokenizer.json"
    TOK.hf.save(str(tok_file))
    exp = export(run_dir, tmp_path / "export", tokenizer=str(tok_file))
    target = load_target(exp)
    ref = load_target(run_dir)
    ids = torch.randint(0, 258, (1, 12))
    torch.testing.assert_close(target.model(ids), ref.model(ids))
    assert target.train_len == 24 and target.tokenizer.eos_id == TOK.eos_id
    out = tmp_path / "rep"
    assert llm_lru_main(["eval", str(exp), "--suite", "passkey", "--out", str(out), "--no-progress",
                         "passkey_lengths=[300]", "passkey_depths=[0.5]", "passkey_trials=1"]) == 0
    assert json.loads((out / "report.json").read_text())["model"]["kind"] == "export"


@pytest.mark.slow  # a real prep (webdataset shards) takes ~10-20 s here
def test_ppl_and_niah_on_prepared_data(tmp_path):
    """ppl past the training length on real shards (documents longer than train.seq_len), and
    niah's haystack from the held-out split; the tokenizer comes from the data manifest."""
    from llm_lru.data_prep import PrepConfig, run_prep

    files = []
    for i in range(4):
        f = tmp_path / f"doc{i}.txt"
        f.write_text(("The grass is green. The sky is blue. " * (30 + 10 * i)) + f"End {i}.")
        files.append(str(f))
    prep = tmp_path / "prep"
    run_prep(PrepConfig(inputs=files, tokenizer="bytes", seq_len=32, shard_size=50, val_fraction=0.5), prep,
             progress=False)
    run = tmp_path / "run"
    fake_run(run, {"model": SMALL, "data": {"source": "shards", "path": str(prep)}, "train": {"seq_len": 32}})
    out = tmp_path / "rep"
    rc = llm_lru_main(["eval", str(run), "--suite", "ppl,niah", "--out", str(out), "--no-progress", "ppl_batches=2",
                       "ppl_length=256", "niah_tasks=[single]", "niah_lengths=[400]", "niah_trials=1"])
    assert rc == 0
    by = {r["suite"]: r for r in json.loads((out / "report.json").read_text())["suites"]}
    m = by["ppl"]["metrics"]
    assert m["tokens_beyond_train_len"] > 0 and m["max_context_position"] >= 32
    assert m["loss_beyond_train_len"] is not None
    assert by["niah"]["settings"]["haystack"].startswith("data")


class TextOracle(torch.nn.Module):
    """A byte-level 'model' that reads its context as text and spells out solve(prompt) after it:
    an end-to-end check that the prompts hold the answer their question asks for and that the
    suites score a right answer as right. State: (ids read, prompt length or None)."""

    def __init__(self, solve):
        super().__init__()
        self.embed = torch.nn.Embedding(1, 1)
        self.solve = solve

    def _next(self, hist, prompt_len):
        try:
            want = TOK.encode(self.solve(TOK.decode(hist[:prompt_len]))) + [TOK.eos_id]
        except (AttributeError, IndexError):  # the question is not read yet (prefill chunks)
            return None
        return want[min(len(hist) - prompt_len, len(want) - 1)]

    def forward(self, ids, doc_start=None, state=None, return_state=False):
        hist = (state or ([], None))[0] + ids[0].tolist()
        logits = torch.zeros(1, ids.shape[1], 258)
        nxt = self._next(hist, len(hist))
        if nxt is not None:
            logits[0, -1, nxt] = 1.0
        return (logits, (hist, None)) if return_state else logits

    def step(self, tokens, state):
        hist, prompt_len = state
        prompt_len = prompt_len if prompt_len is not None else len(hist)  # generation starts here
        hist = hist + tokens.tolist()
        logits = torch.zeros(1, 258)
        logits[0, self._next(hist, prompt_len)] = 1.0
        return logits, (hist, prompt_len)


def _oracle_target(solve):
    from llm_lru.eval.load import EvalTarget

    return EvalTarget(TextOracle(solve), TOK)


def test_passkey_and_niah_score_a_right_answer_as_right(tmp_path):
    def passkey_solver(text):
        return " " + re.search(r"The pass key is (\d+)", text).group(1) + "."

    target = _oracle_target(passkey_solver)
    res = passkey.run(target, EvalConfig(passkey_lengths=[300, 500], passkey_depths=[0.0, 1.0], passkey_trials=1,
                                         progress=False, chunk_size=37), tmp_path)
    assert res["metrics"]["accuracy"] == 1.0

    def niah_solver(text):
        key = re.search(r"magic numbers? for (\w+) mentioned", text).group(1)
        return " " + ", ".join(re.findall(rf"for {key} is: (\d+)", text)) + "."

    target = _oracle_target(niah_solver)
    res = niah.run(target, EvalConfig(niah_tasks=["single", "multikey", "multivalue"], niah_lengths=[800],
                                      niah_trials=1, haystack="fallback", progress=False), tmp_path)
    assert all(res["metrics"][t] == 1.0 for t in ("single", "multikey", "multivalue"))
    # and a wrong answer scores zero: the solver answers with a number that is not in the text
    target = _oracle_target(lambda text: " 1234567.")
    res = niah.run(target, EvalConfig(niah_tasks=["single"], niah_lengths=[800], niah_trials=2, haystack="fallback",
                                      progress=False), tmp_path)
    assert res["metrics"]["single"] == 0.0
