"""`task` suite (and its aliases `mqar`, `state-tracking`, `selective-copy`): the answer accuracy of a
checkpoint trained on a synthetic task, on fresh samples of that task (llm_lru.data_prep.tasks).

    acc = task_accuracy(model, "mqar", {"num_kv_pairs": 8}, seq_len=128, n=256)

The recall lab that trains models and scores them with it is llm_lru.lab.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import torch

from llm_lru.data_prep.synthetic import task_batch

from .common import table
from .ppl import context_positions
from .prefill import token_logprobs


SPLIT_SEED = 9_999  # eval samples: seeded apart from the training stream


@torch.no_grad()
def task_accuracy(model, task: str, task_args: Dict[str, Any], seq_len: int, n: int = 256, seed: int = 0,
                  chunk_size: int = 0, batch_size: int = 64) -> Dict[str, Any]:
    """Greedy accuracy on the scored (answer) positions of n fresh samples of `task`.

    Returns {"accuracy": answers right / answers, "sequence_accuracy": samples with every answer
    right / samples, "answers": count, "accuracy_by_position": {"[lo, hi)": accuracy} over the
    answers' context positions}. chunk_size 0 reads each batch in one forward.
    """
    was_training = model.training
    model.eval()
    data = task_batch(task, task_args, seq_len, n, seed + SPLIT_SEED, model.cfg.vocab_size)
    device = model.embed.weight.device
    right = total = seq_right = 0
    by_pos: Dict[int, List[int]] = {}
    for s in range(0, n, batch_size):
        tok = torch.from_numpy(data["tokens"][s:s + batch_size]).to(device)
        mask = torch.from_numpy(data["mask"][s:s + batch_size]).to(device)
        starts = torch.from_numpy(data["starts"][s:s + batch_size]).to(device)
        labels = torch.from_numpy(data["targets"][s:s + batch_size]).to(device)
        ids = tok[:, :-1]
        targets = torch.where(mask, labels, torch.full_like(ids, -100))
        _, greedy = token_logprobs(model, ids, chunk_size or ids.shape[1], doc_start=starts, targets=targets)
        m = mask.cpu()
        right += int(greedy[m].sum())
        total += int(m.sum())
        seq_right += int(((greedy | ~m).all(1)).sum())
        # context position of each answer (tokens since its document began): for s3/s5 it is
        # the episode length, for mqar the query's offset
        pos = context_positions(starts.cpu())[m]
        for p_, g in zip(pos.tolist(), greedy[m].tolist()):
            b = 1 << max(0, int(p_)).bit_length() - 1 if p_ > 0 else 0
            by_pos.setdefault(b, [0, 0])
            by_pos[b][0] += int(g)
            by_pos[b][1] += 1
    model.train(was_training)
    bins = {f"[{b}, {2 * b if b else 1})": round(r / c, 4) for b, (r, c) in sorted(by_pos.items())}
    return {"accuracy": right / max(total, 1), "sequence_accuracy": seq_right / n, "answers": total,
            "accuracy_by_position": bins}


def run_suite(target, ecfg, out: Path, suite: str = "task", accept=None) -> Dict[str, Any]:
    """`task` suite: accuracy of a checkpoint trained on a synthetic task, on that task.
    (`mqar`, `state-tracking`, `selective-copy`: the same, checking the run's task is one of them.)"""
    cfg = target.cfg
    if cfg is None or cfg.data.source != "synthetic" or not cfg.data.task:
        raise ValueError(f"suite '{suite}': the target's run config has no synthetic data.task (mqar, s3, s5, ...)")
    if accept and cfg.data.task not in accept:
        raise ValueError(f"suite '{suite}': the run was trained on data.task '{cfg.data.task}', not {' or '.join(accept)}")
    res = task_accuracy(target.model, cfg.data.task, dict(cfg.data.task_args), cfg.train.seq_len,
                        ecfg.task_samples, ecfg.seed, ecfg.chunk_size)
    rows = [[cfg.data.task, json.dumps(dict(cfg.data.task_args)), cfg.train.seq_len, res["answers"],
             res["accuracy"], res["sequence_accuracy"]]]
    return {"suite": suite, "metrics": res,
            "tables": [table("synthetic task accuracy", ["task", "args", "seq_len", "answers", "accuracy", "seq_accuracy"], rows)],
            "plots": [], "settings": {"samples": ecfg.task_samples, "seed": ecfg.seed}}


def run_mqar(target, ecfg, out: Path) -> Dict[str, Any]:
    return run_suite(target, ecfg, out, "mqar", ("mqar",))


def run_state_tracking(target, ecfg, out: Path) -> Dict[str, Any]:
    return run_suite(target, ecfg, out, "state-tracking", ("s3", "s5", "word_problem"))


def run_selective_copy(target, ecfg, out: Path) -> Dict[str, Any]:
    return run_suite(target, ecfg, out, "selective-copy", ("selective_copy",))
