"""The model card (README.md) of an export: architecture, size, training, eval numbers."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from llm_lru.config import layer_kinds

KIND_NAMES = {"attn": "causal softmax attention", "swa": "sliding-window attention", "lru": "LRU (Orvieto et al. 2023)",
              "glru": "gated diagonal recurrence", "bdlru": "block-diagonal LRU", "hlru": "higher-order LRU",
              "blur": "bidirectional LRU"}


def _last_metrics(run_dir: Optional[Path], step: Optional[int]) -> Dict[str, Any]:
    """The metrics.jsonl record of `step` (or the last one) of a run, {} if none."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    last: Dict[str, Any] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if step is None or rec.get("step", 0) <= step:
            last = rec
    return last


def training_summary(src) -> Dict[str, Any]:
    """Step, tokens and last loss of the exported checkpoint, from meta.json and metrics.jsonl."""
    step = src.meta.get("step")
    rec = _last_metrics(src.run_dir, step)
    out = {"step": step if step is not None else rec.get("step"),
           "tokens": src.meta.get("tokens", rec.get("tokens")),
           "loss": rec.get("loss"), "seq_len": src.config.train.seq_len,
           "global_batch_size": src.config.train.global_batch_size}
    return {k: v for k, v in out.items() if v is not None}


def find_report(src, report: Optional[str] = None) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """An eval report.json given, or next to the checkpoint / in the run dir (also under eval/)."""
    if report:
        cands = [Path(report)]
    else:
        dirs = [d for d in (src.checkpoint, src.run_dir) if d is not None]
        cands = [d / sub / "report.json" for d in dirs for sub in ("", "eval")]
    for c in cands:
        if c.is_file():
            try:
                return c, json.loads(c.read_text())
            except ValueError as e:
                raise ValueError(f"{c}: eval report is not valid JSON: {e}") from None
    if report:
        raise ValueError(f"--report {report}: no such file")
    return None


def _numbers(d: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """Flatten the numeric leaves of a JSON object to (dotted key, value)."""
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _numbers(v, f"{prefix}{k}.")]
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return [(prefix[:-1], d)]
    return []


def model_card(cfg, meta: Dict[str, Any], report, has_tokenizer: bool) -> str:
    """README.md text for an export folder."""
    kinds = layer_kinds(cfg)
    counts = Counter(kinds)
    n, n_body = meta.get("num_params", 0), meta.get("num_params_no_embedding", 0)
    train = meta.get("training", {})
    lines = ["---", "library_name: transformers", "tags: [llm_lru, linear-recurrence, hybrid]", "---", "",
             "# llm_lru hybrid language model", "",
             f"A {n / 1e6:.2f}M-parameter causal language model ({n_body / 1e6:.2f}M "
             f"without embeddings) of {cfg.n_layers} residual blocks whose mixers are "
             + ", ".join(f"{c} x {KIND_NAMES.get(k, k)}" for k, c in counts.items()) + ".", "",
             "## Architecture", "",
             "| | |", "|---|---|",
             f"| layers (pattern `{cfg.pattern}`) | {' '.join(kinds)} |",
             f"| d_model / state width / block size | {cfg.d_model} / {cfg.d_state or cfg.d_model} / {cfg.block_size} |",
             f"| attention heads / KV heads / window | {cfg.n_heads} / {cfg.n_kv_heads or cfg.n_heads} / "
             f"{cfg.window if 'swa' in kinds else '-'} |",
             f"| gate normalisation | {cfg.gate_norm} |",
             f"| vocabulary | {cfg.vocab_size} (tied embeddings: {cfg.tie_embeddings}) |",
             f"| weights dtype | {meta.get('dtype')} |", "",
             "Generation keeps a fixed-size state per recurrent layer (memory does not grow with the "
             "text) and a key/value cache per attention layer.", "",
             "## Training", ""]
    if train:
        lines += [f"- {k.replace('_', ' ')}: {v:,}" if isinstance(v, int) else f"- {k.replace('_', ' ')}: {v:.4g}"
                  for k, v in train.items()]
    else:
        lines.append("- no training record found with the checkpoint")
    src = meta.get("source", {})
    lines += [f"- source checkpoint: `{src.get('checkpoint')}`", f"- llm_lru revision: `{meta.get('llm_lru_revision')}`", ""]
    lines += ["## Evaluation", ""]
    if report:
        path, data = report
        nums = _numbers(data)
        lines += [f"From `{path}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in nums[:60]]
        if len(nums) > 60:
            lines.append(f"| ... | {len(nums) - 60} more in the report |")
    else:
        lines.append("No eval report was found with the checkpoint.")
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)']
    if has_tokenizer:
        lines += ['tok = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
                  'ids = tok("def main():", return_tensors="pt").input_ids',
                  "print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))"]
    lines += ["```", "", "or `llm-lru generate PATH --prompt TEXT`. The modeling code in this folder is a copy of "
              "llm_lru's (no llm_lru install needed); loading checks the weight files against the sha256 "
              "sums in `llm_lru_export.json`.", ""]
    tf = meta.get("transformers")
    if tf:
        lines += [f"Exported with transformers {tf['exported_with']}; its generation cache is verified with "
                  f"transformers >={tf['supported_min']},<{tf['supported_below']} (loading under another version "
                  "warns).", ""]
    return "\n".join(lines)
