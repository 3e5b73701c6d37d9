"""The eval `task` suite's measure (llm_lru.eval.task): answer accuracy counted exactly against a
model whose answers are known, and well formed on a random model."""
import numpy as np
import pytest
import torch

from llm_lru.data_prep.synthetic import task_batch
from llm_lru.eval import task as suite

from .helpers import tiny_model


class Oracle(torch.nn.Module):
    """Knows the answer of each scored position of a fixed batch: logits one-hot on the target
    where `right`, on another token elsewhere (a stand-in whose accuracy is known exactly).
    labels (n, T): the target of each input position."""

    def __init__(self, labels, right, vocab):
        super().__init__()
        self.cfg = type("C", (), {"vocab_size": vocab})()
        self.embed = torch.nn.Embedding(1, 1)
        self.labels, self.right, self.vocab, self.row = labels, right, vocab, 0

    def forward(self, ids, doc_start=None, state=None, return_state=False):
        B, T = ids.shape
        start = 0 if state is None else state
        nxt = self.labels[self.row:self.row + B, start:start + T]
        ok = self.right[self.row:self.row + B, start:start + T]
        pred = torch.where(ok, nxt, (nxt + 1) % self.vocab)
        logits = torch.nn.functional.one_hot(pred, self.vocab).float()
        if start + T == self.labels.shape[1]:
            self.row += B
        return (logits, start + T) if return_state else logits


@pytest.mark.parametrize("task,args,V,per_sample", [("mqar", {"num_kv_pairs": 4}, 32, 4),
                                                     ("word_problem", {"group": "A", "n": 4}, 26, 40)])
def test_task_accuracy_counts_exactly(task, args, V, per_sample):
    n, T = 10, 40
    data = task_batch(task, args, T, n, seed=suite.SPLIT_SEED, vocab_size=V)
    tok = torch.from_numpy(data["tokens"])
    if task == "mqar":  # the targets of a next-token task are the next tokens
        assert (torch.from_numpy(data["targets"]) == tok[:, 1:]).all()
    rng = np.random.default_rng(0)
    right = torch.from_numpy(rng.random((n, T)) < 0.6)
    mask = torch.from_numpy(data["mask"])
    model = Oracle(torch.from_numpy(data["targets"]), right, V)
    res = suite.task_accuracy(model, task, args, T, n=n, seed=0, chunk_size=7, batch_size=4)
    assert res["answers"] == int(mask.sum()) == per_sample * n
    assert res["accuracy"] == pytest.approx(float(right[mask].float().mean()))
    assert res["sequence_accuracy"] == pytest.approx(float((right | ~mask).all(1).float().mean()))


def test_task_accuracy_on_random_model_is_low_and_well_formed():
    m = tiny_model(vocab_size=16, n_layers=2, pattern="BA")
    res = suite.task_accuracy(m, "s3", {"max_len": 8}, 48, n=8)
    assert 0 <= res["accuracy"] <= 0.5 and res["answers"] > 8
    assert set(res["accuracy_by_position"]) <= {"[1, 2)", "[2, 4)", "[4, 8)", "[8, 16)"}
