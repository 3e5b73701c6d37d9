"""`llm-lru prep`: corpora -> tokenizer -> packed WebDataset shards; `--verify DIR` checks them.

    llm-lru prep --input PATH... | --corpus python-stdlib  --tokenizer bytes|bpe:N|PATH
                 --seq-len L --out DIR [--shard-size 1000] [--workers N] [--val-fraction F]
                 [--seed S] [--max-bytes 4M] [--text-field text] [--eos-token TOK]
    llm-lru prep --verify DIR
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def parse_size(s: str) -> int:
    """'4M', '512k', '1G', '1000' -> bytes."""
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower().rstrip("b")
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: '{s}' (e.g. 4M, 512k, 1G)") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-lru prep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", metavar="PATH", help="files, folders or globs (.txt .md .py .jsonl .parquet, .gz)")
    src.add_argument("--corpus", choices=["python-stdlib"], help="a built-in corpus")
    src.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest")
    p.add_argument("--tokenizer", default="bytes", help="bytes | bpe:N | path to tokenizer.json or its folder")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample input (each stores L+1)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="reader/tokenizer processes")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="fraction of documents for the val split (at least one sample while the corpus "
                        "has two; 0: no val split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--max-bytes", type=parse_size, default=0, help="cap the input (e.g. 4M) for quick runs")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--eos-token", default="", help="EOS token name for a tokenizer given by path")
    p.add_argument("--bpe-train-bytes", type=parse_size, default=256 << 20, help="text used to train bpe:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# A first `prep` then `train` should validate out of the box: a small held-out split by default.
DEFAULT_VAL_FRACTION = 0.005


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    from llm_lru.data_prep import prep as P

    try:
        if args.verify:
            problems = P.verify(args.verify)
            for line in problems:
                print(f"llm-lru prep --verify: {line}", file=sys.stderr)
            if not problems:
                from llm_lru.data_prep.manifest import read_manifest
                m = read_manifest(args.verify)
                n = sum(len(s["shards"]) for s in m["splits"].values())
                print(f"{args.verify}: {n} shards OK")
            return 1 if problems else 0
        if not (args.input or args.corpus):
            raise ValueError("give --input PATH... or --corpus python-stdlib (or --verify DIR)")
        if not args.out:
            raise ValueError("--out DIR is required")
        cfg = P.PrepConfig(inputs=list(args.input or []), corpus=args.corpus or "", tokenizer=args.tokenizer,
                           eos_token=args.eos_token, seq_len=args.seq_len, shard_size=args.shard_size,
                           val_fraction=args.val_fraction, seed=args.seed, max_bytes=args.max_bytes,
                           text_field=args.text_field, bpe_train_bytes=args.bpe_train_bytes)
        m = P.run_prep(cfg, args.out, workers=max(1, args.workers), command=P.command_line(argv),
                       progress=not args.quiet and sys.stderr.isatty())
    except ValueError as e:
        print(f"llm-lru prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (prep.py turns it into this)
        print(f"llm-lru prep: interrupted ({e or 'SIGINT'}); finished shards and the resume state are kept: "
              f"run the same command again to continue", file=sys.stderr)
        return 130
    st = m["stats"]
    for bad in st["bad_files"]:
        print(f"llm-lru prep: skipped unreadable file {bad['path']}: {bad['error']}", file=sys.stderr)
    if st["bad_records"]:
        print(f"llm-lru prep: skipped {st['bad_records']} bad records", file=sys.stderr)
    for name, s in m["splits"].items():
        print(f"{name}: {s['samples']} samples, {s['tokens']} tokens, {len(s['shards'])} shards")
    print(f"{st['documents']} documents, {st['bytes']} bytes, {len(st['bad_files'])} bad files -> {args.out}")
    return 0
