"""The installed layout is one that editors and static analysers can follow: `make setup` installs
llm_lru in setuptools' strict editable mode, a tree of links on sys.path, so that `llm_lru.kernels`
(the top-level kernels/ folder, DESIGN.md §5) resolves by walking directories, with no import hook.

Checked without the import system's hooks: the distribution's editable .pth must name a directory
(not run an `import` line, which is how the lenient mode installs its finder), and in that
directory every source file of every package in pyproject's package-dir must sit at its
`llm_lru...` path and be the repository's own file (a link to it), found by the plain path finder.
"""
import ast
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


# ---- import cycles ----------------------------------------------------------------------------
# The trees whose modules must not import each other in a circle (DESIGN.md §5), every import
# counted, module-level or inside a function: a lazy import only hides a circle until it runs.
TREES = {"llm_lru.kernels": "kernels", "llm_lru.data_prep": "data_prep", "llm_lru.eval": "eval"}


def _tree_modules(root: Path, trees) -> dict:
    """{module name: (path, is_package)} of every source file under the trees."""
    out = {}
    for package, folder in trees.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("")
            if "__pycache__" in rel.parts:
                continue
            parts = package.split(".") + list(rel.parts)
            is_package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imported(module: str, is_package: bool, tree: ast.AST, known) -> set:
    """The modules of `known` that this module's source imports anywhere in it."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target)
    return {m for m in found if m in known and m != module}


def import_graph(root: Path = REPO, trees=None) -> dict:
    """{module: set of modules it imports}, over the modules of `trees` ({package: folder})."""
    mods = _tree_modules(root, trees or TREES)
    return {name: _imported(name, is_pkg, ast.parse(path.read_text()), mods) for name, (path, is_pkg) in mods.items()}


def find_cycle(graph: dict):
    """One import cycle of the graph as [m0, m1, ..., m0], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 10
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_lazy_cycle(tmp_path):
    """The check itself: a circle closed by an import inside a function is found, and a chain is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("x = 1\n")
    (pkg / "a.py").write_text("from .sub import leaf\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    trees = {"top.pkg": "pkg"}
    assert find_cycle(import_graph(tmp_path, trees)) is None
    (pkg / "sub" / "leaf.py").write_text("x = 1\n\n\ndef g():\n    from ..b import f\n    return f\n")
    cycle = find_cycle(import_graph(tmp_path, trees))
    assert cycle is not None and cycle[0] == cycle[-1] and "top.pkg.b" in cycle and "top.pkg.a" in cycle
