"""The installed layout is one that editors and static analysers can follow: `make setup` installs
llm_lru in setuptools' strict editable mode, a tree of links on sys.path, so that `llm_lru.kernels`
(the top-level kernels/ folder, DESIGN.md §5) resolves by walking directories, with no import hook.

Checked without the import system's hooks: the distribution's editable .pth must name a directory
(not run an `import` line, which is how the lenient mode installs its finder), and in that
directory every source file of every package in pyproject's package-dir must sit at its
`llm_lru...` path and be the repository's own file (a link to it), found by the plain path finder.
"""
import importlib.machinery
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _editable_roots():
    """Directories that the distribution's editable .pth files put on sys.path (import lines skipped)."""
    # Every llm_lru distribution on sys.path: the tree's own llm_lru.egg-info (left by the editable
    # build, found first when the checkout is the working directory) lists no .pth files.
    dists = list(importlib.metadata.distributions(name="llm_lru"))
    if not dists:
        pytest.skip("llm_lru is not installed (run `make setup`)")
    roots, hooks = [], []
    for dist, f in ((d, f) for d in dists for f in d.files or []):
        if f.name.startswith("__editable__") and f.suffix == ".pth":
            for line in Path(dist.locate_file(f)).read_text().splitlines():
                line = line.strip()
                if line.startswith("import"):
                    hooks.append(f"{f.name}: {line}")
                elif line and not line.startswith("#"):
                    roots.append(Path(line))
    if not roots and not hooks:
        pytest.skip("llm_lru is not an editable install")
    return roots, hooks


def test_kernels_resolve_without_import_hooks():
    roots, hooks = _editable_roots()
    assert not hooks, f"the editable install uses an import hook (lenient mode): {hooks}"
    tree = [r for r in roots if (r / "llm_lru" / "kernels" / "__init__.py").is_file()]
    assert tree, f"no .pth directory holds llm_lru/kernels: {roots}"
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert package_dir["llm_lru.kernels"] == "kernels"
    checked = 0
    for package, src in package_dir.items():
        for path in sorted((REPO / src).rglob("*.py")):
            rel = path.relative_to(REPO / src)
            if "__pycache__" in rel.parts or (len(rel.parts) > 1 and not (path.parent / "__init__.py").is_file()):
                continue  # not part of an installed package
            parts = package.split(".") + list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            # The plain path finder: what a tool that walks sys.path directories sees.
            spec = None
            search = [str(tree[0])]
            for i in range(len(parts)):
                spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), search)
                assert spec is not None, (f"{'.'.join(parts)}: not found under {tree[0]} (from {path}; "
                                          "a module added since `make setup`? run it again)")
                search = list(spec.submodule_search_locations or [])
            assert Path(spec.origin).resolve() == path.resolve(), f"{'.'.join(parts)} -> {spec.origin}, not {path}"
            checked += 1
    assert checked > 20
