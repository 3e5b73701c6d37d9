"""The lm-evaluation-harness adapter against direct model calls, and lm-eval on local task files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Hubs are unreachable here: datasets must not try them (set before lm_eval imports datasets).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402

from llm_lru.cli import main as llm_lru_main  # noqa: E402
from llm_lru.data_prep.tokenizer import make_tokenizer  # noqa: E402
from llm_lru.eval.lm_eval_adapter import LLMLRULM  # noqa: E402
from llm_lru.eval.load import EvalTarget  # noqa: E402

from .helpers import fake_run, tiny_model  # noqa: E402

TOK = make_tokenizer("bytes")
DOCS = [
    {"question": "The sky is", "choices": [" blue", " green"], "label": 0, "text": "The grass is green. The sky is blue.", "target": " blue"},
    {"question": "Two plus two is", "choices": [" four", " five"], "label": 0, "text": "Here we go.", "target": " four"},
]
TASKS = {
    "tiny_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
               "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n",
    "tiny_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "tiny_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{target}}'\n"
                "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 5\nmetric_list:\n  - metric: exact_match\n",
}


def write_tasks(folder: Path) -> Path:
    """Local task YAMLs over a local JSON-lines file (hubs are unreachable)."""
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}")
    return folder


def _req(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def lm():
    return LLMLRULM(target=EvalTarget(tiny_model(), TOK), chunk_size=5)


def _direct(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lsm = torch.log_softmax(model(ids).double(), -1)[0]
    n = len(ctx)
    lp = sum(float(lsm[n - 1 + i, t]) for i, t in enumerate(cont))
    greedy = all(int(lsm[n - 1 + i].argmax()) == t for i, t in enumerate(cont))
    return lp, greedy


def test_loglikelihood_matches_direct_forward(lm):
    got = lm.loglikelihood([_req("loglikelihood", ("The sky is", " blue")), _req("loglikelihood", ("", "abc"))])
    for (lp, greedy), (ctx, cont) in zip(got, [("The sky is", " blue"), ("", "abc")]):
        ref_lp, ref_greedy = _direct(lm.model, [TOK.bos_id] + TOK.encode(ctx), TOK.encode(cont))
        assert lp == pytest.approx(ref_lp, abs=1e-3) and greedy == ref_greedy


def test_rolling_and_generate(lm):
    (lp,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", ("Here we go again.",))])
    assert lp == pytest.approx(_direct(lm.model, [TOK.bos_id], TOK.encode("Here we go again."))[0], abs=1e-3)
    (text,) = lm.generate_until([_req("generate_until", ("The sky", {"until": ["zzz"], "max_gen_toks": 4}))])
    ids = torch.tensor([[TOK.bos_id] + TOK.encode("The sky")])
    ref = []
    for _ in range(4):  # greedy by recomputing the whole sequence
        nxt = int(lm.model(ids)[0, -1].argmax())
        ref.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    expect = TOK.decode(ref[: ref.index(TOK.eos_id)] if TOK.eos_id in ref else ref)
    assert text == expect.split("zzz")[0]


def test_lm_eval_suite_on_local_tasks(tmp_path):
    run = tmp_path / "run"
    fake_run(run, {"model": {"vocab_size": 258, "d_model": 32, "n_layers": 2, "pattern": "BA", "n_heads": 2,
                             "block_size": 2}, "data": {"source": "random"}, "train": {"seq_len": 24}})
    (tmp_path / "tasks").mkdir()
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    rc = llm_lru_main(["eval", str(run), "--suite", "lm-eval", "--out", str(out), "--tokenizer", "bytes", "--no-progress",
                       "lm_eval_tasks=[tiny_mc,tiny_rolling,tiny_gen]", f"lm_eval_include={tasks}"])
    assert rc == 0
    (res,) = json.loads((out / "report.json").read_text())["suites"]
    m = res["metrics"]
    assert 0 <= m["tiny_mc/acc"] <= 1 and 0 <= m["tiny_gen/exact_match"] <= 1
    assert m["tiny_rolling/bits_per_byte"] > 0


def _fresh_python(code: str) -> str:
    """stdout of a new interpreter of this environment (its site-packages .pth files active)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_installed_hook_registers_llm_lru_with_lm_eval():
    """The installed llm_lru_lm_eval.pth: lm-eval's own registry lookup finds `llm_lru` (as the bare
    `lm_eval --model llm_lru` does), and lm-eval's built-in names are still there."""
    got = _fresh_python("from lm_eval.api.registry import get_model, model_registry\n"
                        "print(get_model('llm_lru').__name__, 'hf' in model_registry, 'dummy' in model_registry)")
    assert got == "LLMLRULM True True"


def test_installed_hook_imports_nothing_heavy_at_startup():
    got = _fresh_python("import sys; print([m for m in ('torch', 'lm_eval', 'llm_lru.eval') if m in sys.modules])")
    assert got == "[]"


def test_hook_registers_when_lm_eval_models_was_imported_first():
    """install() after lm_eval.models is loaded registers at once (no finder needed)."""
    got = _fresh_python("import sys\n"
                        "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_Finder']\n"
                        "import lm_eval.models\n"
                        "from lm_eval.api.registry import model_registry\n"
                        "before = 'llm_lru' in model_registry\n"
                        "from llm_lru import lm_eval_hook; lm_eval_hook.install()\n"
                        "print(before, 'llm_lru' in model_registry)")
    assert got == "False True"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["bare", "adapter"])
def test_lm_eval_command_line(tmp_path, launcher):
    """`lm_eval --model llm_lru ...` (bare: lm-eval's own console script, nothing of ours in between)
    and `python -m llm_lru.eval.lm_eval_adapter run --model llm_lru ...` (adapter), on a local task."""
    run = tmp_path / "run"
    fake_run(run, {"model": {"vocab_size": 258, "d_model": 32, "n_layers": 2, "pattern": "BA", "n_heads": 2,
                             "block_size": 2}, "data": {"source": "random"}, "train": {"seq_len": 24}})
    (tmp_path / "tasks").mkdir()
    tasks = write_tasks(tmp_path / "tasks")
    command = ([str(Path(sys.executable).parent / "lm_eval")] if launcher == "bare"
               else [sys.executable, "-m", "llm_lru.eval.lm_eval_adapter", "run"])
    proc = subprocess.run(command + ["--model", "llm_lru",
                                     "--model_args", f"pretrained={run},tokenizer=bytes", "--tasks", "tiny_mc",
                                     "--include_path", str(tasks), "--output_path", str(tmp_path / "res")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_mc" in proc.stdout and "acc" in proc.stdout
