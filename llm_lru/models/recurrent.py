"""Recurrent mixers. Each one reduces to a block-diagonal linear recurrence (DESIGN.md §2)

    h_t[n] = A_t[n] h_{t-1}[n] + u_t[n]

and runs it through `self.scan`, a llm_lru.kernels ScanOp. Sequence parallelism replaces
`self.scan` with a wrapper that passes carries between ranks; the mixers never see it.

All mixers map x: (B, T, D) -> y: (B, T, D) and take an optional state (the recurrent state
before x) and document starts (B, T) bool, where the state resets exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_lru.kernels import BLOCK, DIAG
from llm_lru.kernels.gated import GatedBlockScan, GatedCompanionScan


class LRU(nn.Module):
    """Orvieto et al. 2023 linear recurrent unit, time invariant, as 2x2 real blocks.

    lambda = exp(-exp(nu) + i exp(theta)), |lambda| initialised uniformly on the ring
    [r_min, r_max]; the input is scaled by gamma = sqrt(1 - |lambda|^2). The complex input and
    output maps are real linear maps on (re, im) pairs. State: (B, N, 2), N = d_state / 2.
    `reverse` runs it backwards in time (the second half of BLUR).
    """

    def __init__(self, d_model: int, d_state: int, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = 6.283, reverse: bool = False):
        super().__init__()
        self.n = d_state // 2
        self.reverse = reverse
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        self.nu_log = nn.Parameter(torch.empty(self.n))
        self.theta_log = nn.Parameter(torch.empty(self.n))
        self.in_proj = nn.Linear(d_model, 2 * self.n, bias=False)   # B (complex) as (re, im)
        self.out_proj = nn.Linear(2 * self.n, d_model, bias=False)  # Re(C h)
        self.skip = nn.Parameter(torch.empty(d_model))               # D x
        self.scan = BLOCK
        self.init_special()

    @torch.no_grad()
    def init_special(self) -> None:
        """Ring initialisation of the eigenvalues (Orvieto et al., Lemma 3.2)."""
        u1, u2 = torch.rand(self.n), torch.rand(self.n)
        self.nu_log.copy_(torch.log(-0.5 * torch.log(u1 * (self.r_max ** 2 - self.r_min ** 2) + self.r_min ** 2)))
        self.theta_log.copy_(torch.log(self.max_phase * u2))
        self.skip.normal_(0.0, 1.0)

    def transition(self) -> torch.Tensor:
        """(N, 2, 2) rotation-scaling blocks of lambda, and gamma (N,)."""
        r = torch.exp(-torch.exp(self.nu_log))
        theta = torch.exp(self.theta_log)
        c, s = r * torch.cos(theta), r * torch.sin(theta)
        A = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        gamma = torch.sqrt(1 - r ** 2)
        return A, gamma

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        B, T, _ = x.shape
        A, gamma = self.transition()
        u = (self.in_proj(x).view(B, T, self.n, 2) * gamma[:, None])
        A = A.expand(B, T, self.n, 2, 2)
        h, h_last = self.scan(A, u, state, self.reverse, doc_start)
        y = self.out_proj(h.to(x.dtype).reshape(B, T, 2 * self.n)) + self.skip * x
        return y, h_last

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.n, 2, device=device, dtype=torch.promote_types(dtype, torch.float32))


class GLRU(nn.Module):
    """Selective gated diagonal recurrence (HGRN-like, m = 1).

    a_t = sigmoid(W_a x_t + b_a), h_t = a_t * h_{t-1} + (1 - a_t) * (W_v x_t), y_t = W_o h_t.
    State: (B, N), N = d_state.
    """

    def __init__(self, d_model: int, d_state: int):
        super().__init__()
        self.n = d_state
        self.gate = nn.Linear(d_model, d_state)
        self.value = nn.Linear(d_model, d_state, bias=False)
        self.out_proj = nn.Linear(d_state, d_model, bias=False)
        self.scan = DIAG
        self.init_special()

    @torch.no_grad()
    def init_special(self) -> None:
        # Forget gates start between 0.73 and 0.98: memory over tens of tokens at init.
        self.gate.bias.uniform_(1.0, 4.0)

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        acc = torch.promote_types(x.dtype, torch.float32)  # gates and state in fp32 or better
        a = torch.sigmoid(self.gate(x).to(acc))
        u = (1 - a) * self.value(x).to(acc)
        h, h_last = self.scan(a, u, state, False, doc_start)
        return self.out_proj(h.to(x.dtype)), h_last

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.n, device=device, dtype=torch.promote_types(dtype, torch.float32))


class BDLRU(nn.Module):
    """Selective block-diagonal LRU (arXiv 2602.12021): N blocks of size m.

    Gate logits G_t = W_g x_t + b_g: (N, m, m+1), each row normalised over its m+1 entries;
    A_t = P[..., :m], u_t = P[..., m] * (W_v x_t); y_t = W_o vec(h_t). State: (B, N, m).
    """

    def __init__(self, d_model: int, d_state: int, m: int, norm: str = "softmax"):
        super().__init__()
        self.m, self.n = m, d_state // m
        self.gate = nn.Linear(d_model, self.n * m * (m + 1))
        self.value = nn.Linear(d_model, self.n * m, bias=False)
        self.out_proj = nn.Linear(self.n * m, d_model, bias=False)
        self.scan = GatedBlockScan(norm)
        self.init_special()

    @torch.no_grad()
    def init_special(self) -> None:
        # Favour each state's own past (the diagonal of A) so that memory starts long.
        bias = torch.zeros(self.n, self.m, self.m + 1)
        bias[:, torch.arange(self.m), torch.arange(self.m)] = 3.0
        self.gate.bias.copy_(bias.flatten())

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        B, T, _ = x.shape
        logits = self.gate(x).view(B, T, self.n, self.m, self.m + 1)
        v = self.value(x).view(B, T, self.n, self.m)
        h, h_last = self.scan(logits, v, state, False, doc_start)
        return self.out_proj(h.to(x.dtype).reshape(B, T, self.n * self.m)), h_last

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.n, self.m, device=device, dtype=torch.promote_types(dtype, torch.float32))


class HLRU(nn.Module):
    """Selective higher-order LRU (arXiv 2602.12021): per channel, order m.

    m+1 logits per channel, normalised, give a_{t,1..m} and a_{t,0};
    h_t = sum_k a_{t,k} h_{t-k} + a_{t,0} v_t, y_t = W_o h_t. State: (B, N, m), the last m values.
    """

    def __init__(self, d_model: int, d_state: int, m: int, norm: str = "softmax"):
        super().__init__()
        self.m, self.n = m, d_state
        self.gate = nn.Linear(d_model, self.n * (m + 1))
        self.value = nn.Linear(d_model, self.n, bias=False)
        self.out_proj = nn.Linear(self.n, d_model, bias=False)
        self.scan = GatedCompanionScan(norm)
        self.init_special()

    @torch.no_grad()
    def init_special(self) -> None:
        # Favour the previous value (a_1) so that memory starts long.
        bias = torch.zeros(self.n, self.m + 1)
        bias[:, 0] = 3.0
        self.gate.bias.copy_(bias.flatten())

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        B, T, _ = x.shape
        logits = self.gate(x).view(B, T, self.n, self.m + 1)
        v = self.value(x)
        y, s_last = self.scan(logits, v, state, False, doc_start)
        return self.out_proj(y.to(x.dtype)), s_last

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.n, self.m, device=device, dtype=torch.promote_types(dtype, torch.float32))


class BLUR(nn.Module):
    """Bidirectional LRU (arXiv 2504.08964): a forward and a reverse-time LRU over the same
    input, summed. Not causal: encoder stacks only (the config refuses it in a causal stack)."""

    def __init__(self, d_model: int, d_state: int, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = 6.283):
        super().__init__()
        self.fwd = LRU(d_model, d_state, r_min, r_max, max_phase, reverse=False)
        self.bwd = LRU(d_model, d_state, r_min, r_max, max_phase, reverse=True)

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        if state is not None:
            raise ValueError("blur: a bidirectional layer has no left-to-right state (no step mode or chunked prefill)")
        y_f, _ = self.fwd(x, doc_start)
        y_b, _ = self.bwd(x, doc_start)
        return y_f + y_b, None
