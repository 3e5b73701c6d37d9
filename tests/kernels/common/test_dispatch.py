"""The one backend choice (common.scan.resolve_backend): each level of precedence (the explicit
argument, the configured backend, LLM_LRU_SCAN, the device), the one rule for a missing Triton,
ops without Triton kernels, and every scan, split and gated op asking it and nothing else."""
import re
import warnings
from pathlib import Path

import pytest
import torch

import llm_lru.kernels as K
from llm_lru.kernels.common import scan

REPO = Path(__file__).resolve().parents[3]


class _Cuda:
    """Stands in for a CUDA tensor: the choice only reads .is_cuda."""

    is_cuda = True


@pytest.fixture
def clean(monkeypatch):
    """No configured backend, no LLM_LRU_SCAN, Triton installed, the warning not yet given."""
    monkeypatch.setattr(scan, "_configured", None)
    monkeypatch.delenv("LLM_LRU_SCAN", raising=False)
    monkeypatch.setattr(scan, "triton_installed", lambda: True)
    monkeypatch.setattr(scan, "_warned_no_triton", False)
    return monkeypatch


def test_precedence_argument_config_environment_device(clean):
    cpu = torch.zeros(1)
    assert K.resolve_backend("block", cpu) == "torch"            # the device: CPU
    assert K.resolve_backend("block", cpu, _Cuda()) == "triton"  # the device: any tensor on CUDA
    assert K.resolve_backend("block", None, cpu) == "torch"      # None (no h0) is no tensor
    clean.setenv("LLM_LRU_SCAN", "ref")                          # the environment over the device
    assert K.get_backend() == "ref"
    assert K.resolve_backend("block", _Cuda()) == "ref"
    K.set_backend("torch")                                       # the configured backend over the environment
    assert K.get_backend() == "torch"
    assert K.resolve_backend("block", _Cuda()) == "torch"
    assert K.resolve_backend("block", cpu, backend="ref") == "ref"  # the argument over everything
    assert K.resolve_backend("block", cpu, backend="auto") == "torch"
    K.set_backend(None)                                          # unset: the environment again
    assert K.resolve_backend("block", cpu) == "ref"


def test_ops_without_triton_kernels_run_their_pytorch_form(clean):
    for op in ("block_product", "companion_product"):
        assert K.resolve_backend(op, _Cuda()) == "torch"
        assert K.resolve_backend(op, torch.zeros(1), backend="triton") == "torch"
        assert K.resolve_backend(op, _Cuda(), backend="ref") == "ref"
    for op in scan.TRITON_OPS:
        assert K.resolve_backend(op, torch.zeros(1), backend="triton") == "triton"


def test_missing_triton_is_one_rule(clean):
    clean.setattr(scan, "triton_installed", lambda: False)
    with pytest.warns(UserWarning, match="triton is not installed"):
        assert K.resolve_backend("bdlru", _Cuda()) == "torch"    # auto: falls back, warns once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert K.resolve_backend("block", _Cuda()) == "torch"
    with pytest.raises(ImportError, match="the backend argument: backend 'triton'"):
        K.resolve_backend("block", torch.zeros(1), backend="triton")
    clean.setenv("LLM_LRU_SCAN", "triton")
    with pytest.raises(ImportError, match="LLM_LRU_SCAN: backend 'triton'"):
        K.resolve_backend("diag", torch.zeros(1))
    K.set_backend("triton")
    with pytest.raises(ImportError, match="set_backend: backend 'triton'"):
        K.resolve_backend("hlru", torch.zeros(1))
    # the gated ops ask the same rule: no fused kernel on CUDA without Triton
    K.set_backend(None)
    clean.delenv("LLM_LRU_SCAN")
    assert not K.GatedBlockScan().fused(_Cuda()) and not K.GatedCompanionScan(backend="auto").fused(_Cuda())


def test_unknown_backends_name_where_they_came_from(clean):
    clean.setenv("LLM_LRU_SCAN", "cuda")
    with pytest.raises(ValueError, match="^LLM_LRU_SCAN: unknown backend 'cuda'"):
        K.resolve_backend("block", torch.zeros(1))
    with pytest.raises(ValueError, match="^block: unknown backend 'gpu'"):
        K.resolve_backend("block", torch.zeros(1), backend="gpu")
    with pytest.raises(ValueError, match="^scan backend: unknown 'fast'"):
        K.set_backend("fast")


def test_an_op_s_own_backend_is_the_explicit_argument(clean):
    gen = torch.Generator().manual_seed(0)
    A, u = torch.rand(1, 6, 2, 2, 2, generator=gen) / 2, torch.randn(1, 6, 2, 2, generator=gen)
    calls = []
    clean.setattr(K.block.op, "block_scan_ref", lambda *a: calls.append("ref") or K.block_scan_ref(*a))
    K.set_backend("torch")
    h, _ = K.BlockScan(backend="ref")(A, u)
    assert calls == ["ref"]
    assert isinstance(K.BlockScan(backend="ref").local(A, u), K.TwoPassScan)
    torch.testing.assert_close(h, K.BLOCK(A, u)[0])


def test_no_other_backend_choice_in_the_kernels():
    """The environment and the configured backend are read in common/scan.py alone."""
    hits = []
    for path in sorted((REPO / "kernels").rglob("*.py")):
        if path.name == "scan.py" and path.parent.name == "common":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"LLM_LRU_SCAN|get_backend\(|_configured", line):
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
