"""`lm-eval` suite: lm-evaluation-harness tasks through the llm_lru adapter, into the report.

Needs the `eval` extra (pip install 'llm_lru[eval]'). Hubs are unreachable on many clusters:
name local task YAMLs with eval.lm_eval_include (datasets from local files).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict

from .common import need_tokenizer, table


def run(target, ecfg, out: Path) -> Dict[str, Any]:
    need_tokenizer(target, "lm-eval")
    if not ecfg.lm_eval_tasks:
        raise ValueError("eval.lm_eval_tasks: name at least one lm-eval task for suite 'lm-eval'")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("suite 'lm-eval' needs lm-evaluation-harness: pip install 'llm_lru[eval]'") from None
    from .lm_eval_adapter import LLMLRULM

    lm = LLMLRULM(target=target, chunk_size=ecfg.chunk_size)
    tm = TaskManager(include_path=ecfg.lm_eval_include or None)
    res = simple_evaluate(model=lm, tasks=list(ecfg.lm_eval_tasks), task_manager=tm,
                          limit=ecfg.lm_eval_limit or None, random_seed=ecfg.seed, numpy_random_seed=ecfg.seed,
                          torch_random_seed=ecfg.seed, fewshot_random_seed=ecfg.seed, log_samples=False,
                          bootstrap_iters=0)
    rows, metrics = [], {}
    for task, vals in sorted(res["results"].items()):
        for key, v in sorted(vals.items()):
            if key == "alias" or "_stderr" in key or not isinstance(v, (int, float)):
                continue
            metric = key.split(",")[0]
            v = float(v)
            metrics[f"{task}/{metric}"] = v if math.isfinite(v) else None
            rows.append([task, metric, metrics[f"{task}/{metric}"]])
    return {"suite": "lm-eval", "metrics": metrics, "tables": [table("lm-eval results", ["task", "metric", "value"], rows)],
            "plots": [], "settings": {"tasks": list(ecfg.lm_eval_tasks), "include": ecfg.lm_eval_include,
                                      "limit": ecfg.lm_eval_limit, "lm_eval_version": _version()}}


def _version() -> str:
    import importlib.metadata as md

    return md.version("lm_eval")
