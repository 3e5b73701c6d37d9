"""llm_lru: distributed pretraining of hybrid linear-recurrent / attention language models."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# Imported straight from a source checkout (the repository root first on sys.path: a script run
# from it, PYTHONPATH=repo), kernels/, data_prep/ and eval/ sit beside this folder rather than in
# it (pyproject's package-dir): let `llm_lru.kernels` etc. resolve there too. Installed trees
# (wheels, `make setup`'s strict editable links) hold them inside and skip this.
_here = _Path(__file__).parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels" / "common" / "scan.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (the package's own search path)
