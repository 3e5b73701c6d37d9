import os

# Tests use one intra-op thread per process: 2 cores are shared by multi-rank tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Triton kernels run without a GPU only under the interpreter, set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)


def _link_new_modules() -> None:
    """A strict editable install (make setup) links each file once: link modules added since (and
    drop links to deleted ones), as the next `make setup` would, so tests never import a stale tree."""
    from pathlib import Path

    import llm_lru

    tree = Path(llm_lru.__file__).resolve().parent   # the repo's llm_lru/ (files are symlinks)
    installed = Path(llm_lru.__file__).parent
    if installed == tree or "__editable__" not in str(installed):
        return
    repo = tree.parent
    for link in installed.rglob("*.py"):
        if link.is_symlink() and not link.exists():   # its module was deleted
            link.unlink()
    for sub, src in (("", "llm_lru"), ("kernels", "kernels"), ("data_prep", "data_prep"), ("eval", "eval")):
        for f in (repo / src).rglob("*.py"):
            dst = installed / sub / f.relative_to(repo / src)
            if "__pycache__" not in f.parts and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(f)


_link_new_modules()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def stdlib_shards(tmp_path_factory):
    """make(seq_len) -> a shard folder from `llm-lru prep --corpus python-stdlib --tokenizer bytes`
    (the command a new user runs first), made once per seq_len per session: launch, signal, restart
    and resume tests run on real shards with loader workers, never only on generated data."""
    import subprocess
    import sys
    from pathlib import Path

    made = {}
    repo = Path(__file__).resolve().parents[1]

    def make(seq_len: int) -> Path:
        if seq_len not in made:
            out = tmp_path_factory.mktemp(f"stdlib{seq_len}") / "data"
            cmd = [sys.executable, "-m", "llm_lru.cli", "prep", "--corpus", "python-stdlib", "--tokenizer", "bytes",
                   "--seq-len", str(seq_len), "--max-bytes", "256K", "--val-fraction", "0.2", "--out", str(out), "--quiet"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo,
                                  env={**os.environ, "PYTHONPATH": str(repo)})
            assert done.returncode == 0, done.stdout + done.stderr
            made[seq_len] = out
        return made[seq_len]

    return make
