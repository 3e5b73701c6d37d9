"""`llm-lru` (also `python -m llm_lru`): one command, one subcommand per job.

Each subcommand lives with the package that owns it and exposes `main(argv) -> int`;
they are imported lazily so that `llm-lru prep` never pays for DeepSpeed or Triton.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from llm_lru.config import ConfigError

COMMANDS = {
    "prep": ("llm_lru.data_prep.cli", "corpora -> tokenizer -> packed WebDataset shards; --verify DIR"),
    "train": ("llm_lru.train.cli", "train a model: llm-lru train CONFIG.yaml key=value ..."),
    "eval": ("llm_lru.eval.cli", "run eval suites on a run, checkpoint or export"),
    "export": ("llm_lru.export.cli", "export a checkpoint to an HF-format folder"),
    "generate": ("llm_lru.export.generate", "stream text from an exported model"),
    "plan": ("llm_lru.plan", "predict per-GPU memory of a training config and the longest context that fits"),
    "demo": ("llm_lru.demo", "the CPU demo: prep, train, export, generate"),
}


def usage() -> str:
    lines = ["usage: llm-lru COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llm-lru: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"llm-lru {name}: not available in this build ({module_name} is missing)", file=sys.stderr)
        return 2
    try:
        return int(module.main(rest) or 0)
    except ConfigError as e:
        print(f"llm-lru {name}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
