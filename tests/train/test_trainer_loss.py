"""The trainer's loss (chunked, through the engine's forward) against the plain full-logits loss.

One real training step on 2 gloo processes (dp = 2), under ZeRO-3 with an untied head (the loss
goes through the engine's forward), on the synthetic copy task (half of every row ignored, -100),
with loss chunks that do not divide a micro batch's tokens:
- the logged train loss of step 1 equals F.cross_entropy of the initial model's logits on the
  step's global batch (both ranks' rows);
- the logged val_loss of step 1 equals F.cross_entropy of the step-1 checkpoint's logits on both
  ranks' validation batches.
"""
from tests.distributed import run_world


def _logged_and_plain(rank, world, out):
    import torch
    import torch.nn.functional as F
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from llm_lru.train import trainer
    from tests.train.worlds import metrics, tiny_cfg

    cfg = tiny_cfg(out, data={"source": "synthetic", "task": "copy", "task_args": {"vocab_size": 64}},
                   model={"tie_embeddings": False},
                   train={"micro_batch_size": 4 // world, "max_steps": 1, "val_every": 1, "val_batches": 2,
                          "loss_chunk_tokens": 5},
                   deepspeed={"zero_stage": 3})
    summary = trainer.train(cfg)
    if rank != 0:
        return None
    logged = metrics(out)[0]

    def plain(model, batches):
        total = count = 0.0
        with torch.no_grad():
            for b in batches:
                logits = model(b["input_ids"], b["doc_start"])
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1),
                                         ignore_index=-100, reduction="sum").item()
                count += (b["labels"] != -100).sum().item()
        return total / count, count

    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    model = trainer.build_model(cfg).eval()
    loaders = {(split, r): iter(trainer.make_loader(cfg, split, r, world, 0, 1, 4 // world))
               for split in ("train", "val") for r in range(world)}
    train_batches = [next(loaders["train", r]) for r in range(world)]
    train_plain, train_count = plain(model, train_batches)
    sd = get_fp32_state_dict_from_zero_checkpoint(f"{summary['checkpoint']}/ds")
    model.load_state_dict(sd)  # strict: every weight of the untied model is in the checkpoint
    val_plain, _ = plain(model, [next(loaders["val", r]) for r in range(world) for _ in range(2)])
    return {"logged": logged, "train_plain": train_plain, "val_plain": val_plain, "train_count": train_count,
            "numel": sum(b["labels"].numel() for b in train_batches)}


def test_logged_losses_equal_the_plain_loss(tmp_path):
    r = run_world(_logged_and_plain, 2, str(tmp_path / "run"), timeout=600)[0]
    assert 0 < r["train_count"] < r["numel"]  # ignored positions in the batch
    assert abs(r["logged"]["loss"] - r["train_plain"]) <= 1e-6 * r["train_plain"]
    assert abs(r["logged"]["val_loss"] - r["val_plain"]) <= 1e-6 * r["val_plain"]
    assert r["logged"]["val_loss"] != r["logged"]["loss"]  # val was taken after the step, on other data
