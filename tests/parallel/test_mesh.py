"""The mesh and the loss in a single process: world of one, slicing, refusals, the loss's scale."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llm_lru.parallel import Mesh, build_mesh, init_mesh, parallelize, resolve_backend, single_mesh, sp_dp_loss
from llm_lru.parallel.loss import sp_dp_scale

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
       "TORCHELASTIC_RESTART_COUNT")


def test_world_of_one(monkeypatch):
    """Alone, init_mesh starts a process group of one (DeepSpeed needs one) and builds its mesh."""
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_initialized()
    mesh = init_mesh(sp=1, backend="gloo")
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert os.environ["WORLD_SIZE"] == "1"
        assert (mesh.world_size, mesh.dp, mesh.sp, mesh.sp_group, mesh.backend) == (1, 1, 1, None, "gloo")
        assert init_mesh(sp=1).world_size == 1  # a running world is joined, not started again
        model = torch.nn.Linear(2, 2)
        assert parallelize(model, mesh) is model  # nothing to wrap at sp = 1
    finally:
        dist.destroy_process_group()


def test_sp_without_a_world_is_refused():
    with pytest.raises(ValueError, match="parallel.sp=2"):
        build_mesh(sp=2)
    with pytest.raises(ValueError, match="parallel.backend"):
        resolve_backend("mpi")


def test_length_not_divisible_by_sp_is_refused():
    mesh = Mesh(world_size=4, rank=3, dp=1, sp=4)
    x = torch.arange(2 * 12).view(2, 12)
    assert mesh.local_slice(x).tolist() == x[:, 9:12].tolist()
    assert mesh.pos_offset(3) == 9
    with pytest.raises(ValueError, match="not divisible by parallel.sp=4"):
        mesh.local_slice(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="train.seq_len"):
        mesh.check_length(10)


def test_loss_is_the_token_mean_in_a_world_of_one():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :3] = -100
    loss, value = sp_dp_loss(logits, labels, single_mesh())
    ref = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(value, ref.detach())
    # a batch whose labels are all ignored: zero loss and gradient, no division by zero
    loss, value = sp_dp_loss(logits, torch.full((2, 5), -100), single_mesh())
    assert loss.item() == 0.0 and value.item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        sp_dp_loss(logits, labels[:, :4])


@pytest.mark.parametrize("num_tokens,average", [(None, None), (23, 4)])
def test_scale_of_a_summed_loss_equals_the_loss_of_its_logits(num_tokens, average):
    """sp_dp_scale(sum of token losses, count) is sp_dp_loss without the logits (the training path)."""
    from llm_lru.kernels import linear_cross_entropy

    h = torch.randn(2, 5, 3, requires_grad=True)
    w = torch.randn(7, 3, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 1:] = -100
    ref, ref_value = sp_dp_loss(F.linear(h, w), labels, single_mesh(), num_tokens=num_tokens,
                                grad_average_size=average)
    ref_grads = torch.autograd.grad(ref, (h, w))
    total = linear_cross_entropy(h, w, labels, reduction="sum", chunk_tokens=3)
    loss, value = sp_dp_scale(total, (labels != -100).sum(), single_mesh(), num_tokens=num_tokens,
                              grad_average_size=average)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(value, ref_value)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), ref_grads):
        torch.testing.assert_close(a, b)


def test_apply_sp_refuses_a_mixer_it_cannot_wrap():
    """A mixer that calls a kernel directly (no scan / attend seam) would scan each SP slice from a
    zero state: apply_sp names the layer instead of wrapping the rest and going on."""
    import pytest
    import torch.nn as nn

    from llm_lru.config import ModelConfig
    from llm_lru.models import HybridLM
    from llm_lru.parallel import apply_sp
    from llm_lru.parallel.mesh import Mesh

    mesh = Mesh(world_size=2, rank=0, dp=1, sp=2, backend="gloo")   # wrapping talks to no one
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=2, pattern="BA", n_heads=2, block_size=2)
    apply_sp(HybridLM(cfg), mesh)                                    # every mixer has its seam

    class Direct(nn.Module):
        def forward(self, x, doc_start=None, state=None, pos_offset=0):
            return x, state

    model = HybridLM(cfg)
    model.layers[1].mixer = Direct()
    with pytest.raises(ValueError, match=r"layers\.1\.mixer \(Direct\) has no scan or attend seam"):
        apply_sp(model, mesh)
