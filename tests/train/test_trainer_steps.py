"""The trainer's small pieces on their own: the batch copy to the device and the save decision."""
import torch

from llm_lru.parallel.mesh import single_mesh
from llm_lru.train import trainer


class _Copied(torch.Tensor):
    """A tensor that records the keyword arguments of every .to() call made on it."""

    calls: list = []

    def to(self, *args, **kwargs):
        _Copied.calls.append(kwargs)
        return super().to(*args, **kwargs)


def test_the_batch_copy_is_asynchronous():
    """From pinned memory a non_blocking copy lets the host run ahead of the device: the training
    forward's call path must ask for it for every tensor of the batch."""
    _Copied.calls = []
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long),
             "doc_start": torch.zeros(2, 8, dtype=torch.bool)}
    batch = {k: v.as_subclass(_Copied) for k, v in batch.items()}
    seen = {}

    def engine(ids, **kwargs):
        seen.update(kwargs, ids=ids)
        return torch.tensor(0.0)

    trainer._forward(engine, batch, single_mesh(), torch.device("cpu"), chunk_tokens=16)
    assert len(_Copied.calls) == 3 and all(c.get("non_blocking") is True for c in _Copied.calls)
    assert seen["ids"].shape == (2, 8) and seen["labels"].shape == (2, 8) and seen["pos_offset"] == 0


def test_save_due_follows_every_signals_and_the_last_step():
    from types import SimpleNamespace

    from llm_lru.config import from_dict
    from llm_lru.train.checkpoint import SaveSignals

    cfg = from_dict({"data": {"source": "random"}, "model": {"vocab_size": 8},
                     "train": {"max_steps": 10}, "checkpoint": {"every": 4}})
    run = SimpleNamespace(cfg=cfg, mesh=single_mesh(), device="cpu")
    quiet, signalled = SaveSignals([]), SaveSignals([])
    signalled.received = "SIGTERM"

    def due(step, signals=quiet, bad=0):
        return trainer.save_due(run, trainer.TrainState(step=step, bad_in_row=bad), signals, last_save=0.0)

    assert due(3) == (False, False) and due(4) == (True, False) and due(10) == (True, False)
    assert due(8, bad=1) == (False, False)              # never a periodic save right after a skipped step
    assert due(3, signalled) == (True, True)            # save the step in progress and stop
    assert due(10, signalled) == (True, False)          # the last step: just finish
