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
