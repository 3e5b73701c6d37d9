"""The delta rule, one sequence, one head and one step at a time: the float64 reference that the
fast forms are tested against (slow: Python loops over B, H and T).

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      o_t = S_t^T q_t

S: (K, V) per head (fla's layout: o = q S). A reset at t zeroes S before step t (a document start).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def delta_rule_ref(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, h0: Optional[Tensor] = None,
                   reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """q, k: (B, T, H, K)  v: (B, T, H, V)  beta: (B, T, H)  h0: (B, H, K, V) or None (zeros)
    reset: (B, T) bool or None. Returns o: (B, T, H, V), h_last: (B, H, K, V), in float64
    (float32 inputs are promoted: this is the reference, not a fast path)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = torch.float64
    eye = torch.eye(K, dtype=dt, device=k.device)
    outs, lasts = [], []
    for b in range(B):
        o_b, last_b = [], []
        for h in range(H):
            S = h0[b, h].to(dt) if h0 is not None else torch.zeros(K, V, dtype=dt, device=k.device)
            o_bh = []
            for t in range(T):
                if reset is not None and bool(reset[b, t]):
                    S = torch.zeros_like(S)
                kt, vt, qt, bt = k[b, t, h].to(dt), v[b, t, h].to(dt), q[b, t, h].to(dt), beta[b, t, h].to(dt)
                S = (eye - bt * torch.outer(kt, kt)) @ S + bt * torch.outer(kt, vt)
                o_bh.append(S.T @ qt)
            o_b.append(torch.stack(o_bh))       # (T, V)
            last_b.append(S)
        outs.append(torch.stack(o_b, 1))        # (T, H, V)
        lasts.append(torch.stack(last_b))       # (H, K, V)
    return torch.stack(outs), torch.stack(lasts)
