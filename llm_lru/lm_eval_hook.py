"""Registers `llm_lru` with lm-evaluation-harness, so the bare `lm_eval --model llm_lru ...` works.

lm-eval 0.4 has no plugin entry points: its CLI only knows models listed in `lm_eval.models`.
The installed `llm_lru_lm_eval.pth` imports this module at interpreter start (as pytest-cov's
.pth does); it only puts a finder on sys.meta_path — no lm_eval or torch import — which waits
for `lm_eval.models` to be imported and then adds `llm_lru` to the model registry as a lazy
"module:Class" entry, like lm-eval's own models. Any failure here is swallowed: a broken hook
must never break an unrelated Python process.
"""
from __future__ import annotations

import sys

WATCHED = "lm_eval.models"
MODEL_NAME = "llm_lru"
MODEL_PATH = "llm_lru.eval.lm_eval_adapter:LLMLRULM"


def register() -> None:
    """Add the lazy `llm_lru` entry to lm-eval's model registry (no-op if it is there)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_PATH)


class _RegisteringLoader:  # duck-typed: importlib.abc costs ~10 ms at every interpreter start
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            register()
        except Exception:  # noqa: BLE001 - see the module doc
            pass


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:  # the spec the rest of the import system would give
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Called by the .pth file; also safe to call by hand (once is enough)."""
    try:
        if WATCHED in sys.modules:  # lm_eval already imported its models: register now
            register()
        elif not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # noqa: BLE001 - see the module doc
        pass
