"""`lm-eval` suite: lm-evaluation-harness tasks through the llm_lru adapter, into the report.

Needs the `eval` extra (pip install 'llm_lru[eval]'). Hubs are unreachable on many clusters:
name local task YAMLs with eval.lm_eval_include (datasets from local files).
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from .common import need_tokenizer, table


def run(target, ecfg, out: Path) -> Dict[str, Any]:
    need_tokenizer(target, "lm-eval")
    if not ecfg.lm_eval_tasks:
        raise ValueError("eval.lm_eval_tasks: name at least one lm-eval task for suite 'lm-eval'")
    try:
        from lm_eval.evaluator import evaluate
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise ValueError("suite 'lm-eval' needs lm-evaluation-harness: pip install 'llm_lru[eval]'") from None
    from .lm_eval_adapter import LLMLRULM

    lm = LLMLRULM(target=target, chunk_size=ecfg.chunk_size)
    tasks = list(ecfg.lm_eval_tasks)
    tm = None
    if ecfg.lm_eval_include:
        # Indexing lm-eval's ~14k built-in task files takes minutes on a small CPU: try the
        # local folder alone first.
        tm = TaskManager(include_path=ecfg.lm_eval_include, include_defaults=False)
        if not set(tasks) <= set(tm.all_tasks):
            tm = None
    tm = tm or TaskManager(include_path=ecfg.lm_eval_include or None)
    random.seed(ecfg.seed)
    np.random.seed(ecfg.seed)
    torch.manual_seed(ecfg.seed)
    # evaluate() rather than simple_evaluate(): the latter also collects environment info
    # (pip, GPU probes), ~20 s here, which the report does not need.
    res = evaluate(lm=lm, task_dict=get_task_dict(tasks, tm), limit=ecfg.lm_eval_limit or None,
                   bootstrap_iters=0, log_samples=False)
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
