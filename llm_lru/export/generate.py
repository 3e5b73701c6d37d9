"""`llm-lru generate DIR --prompt TEXT`: stream text from an exported model.

Loads the folder the way any transformers user would (AutoModelForCausalLM with
trust_remote_code, AutoTokenizer) and prints tokens as they come (TextStreamer).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-lru generate", description="Stream text from an exported model folder.")
    p.add_argument("model", help="export folder (llm-lru export --out DIR)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="re-read the whole text for every token (slow; a check)")
    return p


def load(folder: str):
    """(model, tokenizer) of an export folder, model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return model, tok


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `llm-lru generate`; returns the exit status."""
    args = parser().parse_args(argv)
    import os

    import torch
    from transformers import TextStreamer

    if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        print(f"llm-lru generate: {args.model} has no tokenizer.json (exported without a tokenizer)", file=sys.stderr)
        return 2
    try:
        model, tok = load(args.model)
    except (ValueError, OSError) as e:
        print(f"llm-lru generate: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:  # generation needs at least one token to condition on
        ids = torch.tensor([[tok.bos_token_id]])
    sample = args.temperature > 0
    kw = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k or None) if sample else dict(do_sample=False)
    print(args.prompt, end="", flush=True)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer, use_cache=not args.no_cache,
                       pad_token_id=tok.pad_token_id, **kw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
