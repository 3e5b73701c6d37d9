"""A real ZeRO-3 checkpoint of 2 gloo processes, for the export tests.

`train_and_save` (run by tests.distributed.run_world) trains a tiny HybridLM for two optimizer
steps under DeepSpeed ZeRO-3, saves a DeepSpeed checkpoint, and returns the live engine's logits
on fixed inputs (the reference the export must reproduce).
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def train_and_save(rank: int, world: int, cfg_dict: dict, ds_dir: str, probe: torch.Tensor, stage: int = 3):
    """Two AdamW steps under ZeRO-`stage`, engine.save_checkpoint(ds_dir); returns rank 0's logits on probe."""
    import deepspeed
    import deepspeed.ops

    from llm_lru.config import from_dict
    from llm_lru.models import HybridLM

    # The CPU shm comm op serves inference all-reduce only; skipping its JIT build saves ~50 s.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed imports its Muon optimizer module only to ask isinstance(optimizer, MuonWithAuxAdam),
    # and that import runs torch.compile (~12 s of inductor imports per process). The test passes
    # AdamW, so a stand-in class answers the question.
    muon = types.ModuleType("deepspeed.runtime.zero.muon.muon_optimizer")
    muon.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
    sys.modules.setdefault(muon.__name__, muon)
    cfg = from_dict(cfg_dict)
    torch.manual_seed(cfg.train.seed)
    model = HybridLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(0, cfg.model.vocab_size, (1, 17), generator=g)
        logits = engine(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ds_dir, tag="state")
    engine.eval()
    with torch.no_grad():
        live = engine(probe)  # every rank runs it: ZeRO-3 gathers parameters collectively
    # numpy: a torch tensor would travel as shared memory that dies with this process.
    return live.numpy() if rank == 0 else None


def env_for_deepspeed(repo: Path) -> None:
    """Share DeepSpeed's JIT builds with the Makefile's folder; quiet tokenizers in workers."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(repo / ".torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
