"""Input checks shared by every scan implementation: errors name the tensor and the shape."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

MAX_BLOCK_SIZE = 16


def _fail(name: str, expected: str, got: torch.Tensor) -> None:
    raise ValueError(f"{name}: expected shape {expected}, got {tuple(got.shape)}")


def check_tensor(name: str, x: torch.Tensor, expected: Sequence[Optional[int]], spec: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, x.shape)):
        _fail(name, spec, x)
    if not x.is_floating_point() and name not in ("reset",):
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors on different devices: " + ", ".join(f"{k}={v}" for k, v in devs.items()))


def check_block(A: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor]) -> None:
    """A: (B, T, N, m, m), u: (B, T, N, m), h0: (B, N, m) or None."""
    check_tensor("u", u, [None, None, None, None], "(B, T, N, m)")
    B, T, N, m = u.shape
    if not 1 <= m <= MAX_BLOCK_SIZE:
        raise ValueError(f"u: block size m={m} outside the supported 1..{MAX_BLOCK_SIZE}")
    if T < 1:
        raise ValueError("u: sequence length T must be at least 1")
    check_tensor("A", A, [B, T, N, m, m], f"(B, T, N, m, m) = {(B, T, N, m, m)}")
    if h0 is not None:
        check_tensor("h0", h0, [B, N, m], f"(B, N, m) = {(B, N, m)}")
    check_same_device(A=A, u=u, h0=h0)


def check_diag(a: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor]) -> None:
    """a: (B, T, N), u: (B, T, N), h0: (B, N) or None."""
    check_tensor("u", u, [None, None, None], "(B, T, N)")
    B, T, N = u.shape
    if T < 1:
        raise ValueError("u: sequence length T must be at least 1")
    check_tensor("a", a, [B, T, N], f"(B, T, N) = {(B, T, N)}")
    if h0 is not None:
        check_tensor("h0", h0, [B, N], f"(B, N) = {(B, N)}")
    check_same_device(a=a, u=u, h0=h0)


def check_companion(a: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor], reset: Optional[torch.Tensor]) -> None:
    """a: (B, T, N, m), x: (B, T, N), h0: (B, N, m) or None, reset: (B, T) bool or None."""
    check_tensor("x", x, [None, None, None], "(B, T, N)")
    B, T, N = x.shape
    if T < 1:
        raise ValueError("x: sequence length T must be at least 1")
    check_tensor("a", a, [B, T, N, None], f"(B, T, N, m) with B, T, N = {(B, T, N)}")
    m = a.shape[-1]
    if not 1 <= m <= MAX_BLOCK_SIZE:
        raise ValueError(f"a: order m={m} outside the supported 1..{MAX_BLOCK_SIZE}")
    if h0 is not None:
        check_tensor("h0", h0, [B, N, m], f"(B, N, m) = {(B, N, m)}")
    check_reset(reset, B, T)
    check_same_device(a=a, x=x, h0=h0, reset=reset)


def check_reset(reset: Optional[torch.Tensor], B: int, T: int) -> None:
    if reset is None:
        return
    if reset.dtype != torch.bool:
        raise TypeError(f"reset: expected a bool tensor, got {reset.dtype}")
    if tuple(reset.shape) != (B, T):
        raise ValueError(f"reset: expected shape (B, T) = {(B, T)}, got {tuple(reset.shape)}")


def acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    """State dtype: fp32 for half inputs, fp64 when any input is fp64."""
    dt = torch.float32
    for x in xs:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt
