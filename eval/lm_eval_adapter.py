"""lm-evaluation-harness adapter: `llm_lru` as an lm-eval model (loglikelihood, rolling
loglikelihood, generate_until), every input read by chunked prefill, so no context window applies.

lm-eval 0.4 finds models only in its own registry (no plugin entry points); installing llm_lru
adds a .pth hook (llm_lru/lm_eval_hook.py) that registers this class lazily, so lm-eval's own
command runs it:

    lm_eval --model llm_lru \
        --model_args pretrained=RUN_OR_EXPORT_DIR[,tokenizer=bytes,chunk_size=1024] \
        --tasks my_task --include_path TASK_DIR

`python -m llm_lru.eval.lm_eval_adapter run ...` takes the same arguments (for environments where
.pth files are not processed, e.g. `python -S`), and `llm-lru eval TARGET --suite lm-eval
lm_eval_tasks=[...] lm_eval_include=DIR` puts the results into the report.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .prefill import cut_at_stop, greedy_generate, prefill, token_logprobs


@register_model("llm_lru")
class LLMLRULM(LM):
    """pretrained: RUN_DIR | CHECKPOINT | EXPORT_DIR, or target=an EvalTarget (in-process)."""

    def __init__(self, pretrained: Optional[str] = None, tokenizer: Optional[str] = None, chunk_size: int = 1024,
                 max_gen_toks: int = 256, target=None, **kwargs):
        super().__init__()
        if target is None:
            if not pretrained:
                raise ValueError("lm_eval model_args: pretrained=RUN_DIR|CHECKPOINT|EXPORT_DIR is required")
            from .load import load_target

            target = load_target(pretrained, tokenizer)
        if target.tokenizer is None:
            raise ValueError("lm_eval model_args: the model has no tokenizer; pass tokenizer=bytes|PREP_DIR|tokenizer.json")
        self.model, self.tok = target.model.eval(), target.tokenizer
        self.chunk_size, self.max_gen_toks = int(chunk_size), int(max_gen_toks)
        self._device = self.model.embed.weight.device

    @property
    def tokenizer_name(self) -> str:
        return f"llm_lru-{getattr(self.tok, 'kind', 'tokenizer')}"

    def _ids(self, prefix: List[int]) -> torch.Tensor:
        return torch.tensor([prefix], dtype=torch.long, device=self._device)

    def _score(self, ctx: List[int], cont: List[int]) -> Tuple[float, bool]:
        """Sum of log p(cont | ctx) and whether greedy decoding yields cont."""
        ids = self._ids(ctx + cont)
        targets = torch.full_like(ids, -100)
        n = len(cont)
        targets[0, len(ctx) - 1: len(ctx) - 1 + n] = ids[0, len(ctx):]
        lp, greedy = token_logprobs(self.model, ids, self.chunk_size, targets=targets)
        sel = targets[0].cpu() >= 0
        return float(lp[0][sel].double().sum()), bool(greedy[0][sel].all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = [self.tok.bos_id] + self.tok.encode(context)
            cont = self.tok.encode(continuation)
            if not cont:
                out.append((0.0, True))
                continue
            out.append(self._score(ctx, cont))
            self.cache_hook.add_partial("loglikelihood", req.args, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Whole documents, conditioned on BOS; the state carries across chunks (no windows)."""
        out = []
        for req in requests:
            (text,) = req.args
            ids = self.tok.encode(text)
            out.append(self._score([self.tok.bos_id], ids)[0] if ids else 0.0)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self._ids([self.tok.bos_id] + self.tok.encode(context))
            last, state = prefill(self.model, ids, self.chunk_size)
            new = greedy_generate(self.model, state, last, max_new, [self.tok.eos_id])
            text = self.tok.decode(cut_at_stop(new[0].tolist(), [self.tok.eos_id]))
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def main(argv: Optional[List[str]] = None) -> None:
    """lm-eval's own command line, with `llm_lru` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
