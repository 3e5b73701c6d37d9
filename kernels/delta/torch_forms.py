"""The delta rule in plain PyTorch (differentiable by autograd): a sequential form (any resets)
and a chunked form (the WY representation of DeltaNet, Yang et al. 2024, arXiv 2406.06484:
one triangular solve per chunk, then C x C matrix products instead of C sequential steps).

Layout as fla's: q, k (B, T, H, K), v (B, T, H, V), beta (B, T, H), state S (B, H, K, V), o = q S.
The state accumulates in float32 or better.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _acc(*ts: Optional[Tensor]) -> torch.dtype:
    dt = torch.float32
    for t in ts:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def delta_rule_sequential(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, h0: Optional[Tensor] = None,
                          reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One step at a time over T, batched over B and H: S <- S + beta k (v - S^T k)^T, o = S^T q.
    reset (B, T) bool zeroes the state before the step where it is set."""
    B, T, H, K = k.shape
    dt = _acc(q, k, v, beta, h0)
    S = h0.to(dt) if h0 is not None else k.new_zeros(B, H, K, v.shape[-1], dtype=dt)
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    outs = []
    for t in range(T):
        if reset is not None:
            S = S * (~reset[:, t]).to(dt)[:, None, None, None]
        kt = k[:, t]
        old = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + (beta[:, t, :, None, None] * kt[..., :, None]) * (v[:, t] - old)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, h0: Optional[Tensor] = None,
                       chunk_size: int = 32) -> Tuple[Tensor, Tensor]:
    """The same recurrence chunk by chunk (no resets inside the sequence). Within a chunk of C
    steps, the updates compose to S_C = S_0 + K^T (U - W S_0) with W = T (beta K), U = T (beta V),
    T = (I + tril(diag(beta) K K^T, -1))^-1; outputs o = Q S_0 + tril(Q K^T) (U - W S_0)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = _acc(q, k, v, beta, h0)
    C = max(1, min(chunk_size, T))
    pad = (-T) % C
    # Padding steps have k = 0, beta = 0: they leave the state alone.
    q, k, v, beta = (F.pad(x.to(dt), (0, 0) * (x.dim() - 2) + (0, pad)) for x in (q, k, v, beta))
    n = (T + pad) // C
    # (B, H, n, C, .)
    q, k, v = (x.view(B, n, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    beta = beta.view(B, n, C, H).permute(0, 3, 1, 2)
    kb, vb = k * beta[..., None], v * beta[..., None]
    strict = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    lower = torch.eye(C, dtype=dt, device=k.device) + (kb @ k.transpose(-1, -2)) * strict
    w = torch.linalg.solve_triangular(lower, kb, upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(lower, vb, upper=False, unitriangular=True)
    causal = strict | torch.eye(C, dtype=torch.bool, device=k.device)
    S = h0.to(dt) if h0 is not None else k.new_zeros(B, H, K, V, dtype=dt)
    outs = []
    for i in range(n):
        new = u[:, :, i] - w[:, :, i] @ S
        scores = (q[:, :, i] @ k[:, :, i].transpose(-1, -2)) * causal
        outs.append(q[:, :, i] @ S + scores @ new)
        S = S + k[:, :, i].transpose(-1, -2) @ new
    o = torch.stack(outs, 2).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    return o, S
