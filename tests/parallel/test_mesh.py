"""The mesh and the loss in a single process: world of one, slicing, refusals, the loss's scale."""
import pytest
import torch
import torch.nn.functional as F

from llm_lru.parallel import Mesh, build_mesh, init_mesh, parallelize, resolve_backend, single_mesh, sp_dp_loss


def test_world_of_one():
    mesh = init_mesh(sp=1, backend="gloo")
    assert (mesh.world_size, mesh.dp, mesh.sp, mesh.sp_group) == (1, 1, 1, None)
    model = torch.nn.Linear(2, 2)
    assert parallelize(model, mesh) is model  # nothing to wrap at sp = 1


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
