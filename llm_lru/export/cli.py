"""`llm-lru export RUN_OR_CHECKPOINT --out DIR [--dtype bf16|fp32]`: an HF-format folder."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-lru export", description=(
        "Export a checkpoint (run dir -> its latest complete checkpoint, a trainer checkpoint dir, or a "
        "DeepSpeed checkpoint folder of any ZeRO stage and world size) to a folder that "
        "transformers loads with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)."))
    p.add_argument("source", help="run dir, checkpoint dir or DeepSpeed checkpoint folder")
    p.add_argument("--out", required=True, help="export folder (must be empty or absent)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype (default fp32)")
    p.add_argument("--config", help="run config YAML, for a DeepSpeed folder without config.yaml beside it")
    p.add_argument("--tokenizer", help="tokenizer.json or folder (default: the run's data manifest)")
    p.add_argument("--report", help="eval report.json for the model card (default: found with the run)")
    p.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this size (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `llm-lru export`; returns the exit status."""
    args = parser().parse_args(argv)
    from .exporter import export

    try:
        out = export(args.source, args.out, dtype=args.dtype, config=args.config, tokenizer=args.tokenizer,
                     max_shard_size=args.max_shard_size, overwrite=args.overwrite, report=args.report)
    except ValueError as e:
        print(f"llm-lru export: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
