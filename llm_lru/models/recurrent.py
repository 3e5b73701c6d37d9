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

from llm_lru.config import GATE_INITS, HLRU_READOUTS
from llm_lru.kernels import BLOCK, DIAG, CompanionLags, GatedBlockScan, GatedCompanionScan

# The paper's gate start (arXiv 2602.12021, gate_init=uniform): weights N(0, UNIFORM_STD), zero biases.
UNIFORM_STD = 0.02
# long_memory: the logit of each state's own past starts this much above the others.
LONG_MEMORY_BIAS = 3.0


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


def _check_choice(value: str, choices, key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key}: unknown '{value}' (one of {', '.join(choices)})")


class _GatedMixer(nn.Module):
    """What BD-LRU and H-LRU share: gate logits of shape `shape` per token, either from the input
    (selective: `gate` is Linear(d, prod(shape))) or a learned table with no input dependence
    (`gate` is a Parameter of prod(shape) logits, flat like a bias so that weight decay spares it:
    time-constant transitions), and their initialisation."""

    def _make_gate(self, d_model: int, shape, selective: bool, gate_init: str) -> None:
        _check_choice(gate_init, GATE_INITS, "gate_init")
        self.shape, self.selective, self.gate_init = tuple(shape), selective, gate_init
        n = math.prod(self.shape)
        self.gate = nn.Linear(d_model, n) if selective else nn.Parameter(torch.zeros(n))

    def _init_gate(self, long_memory_bias: torch.Tensor) -> None:
        """long_memory: `long_memory_bias` (shape `shape`) as the bias or table; uniform: the
        paper's start, every logit near zero (all rows nearly uniform)."""
        table = self.gate.bias if self.selective else self.gate
        if self.gate_init == "uniform":
            if self.selective:
                self.gate.weight.normal_(0.0, UNIFORM_STD)
            table.zero_()
        else:
            table.copy_(long_memory_bias.flatten())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits (B, T, *shape)."""
        B, T, _ = x.shape
        if self.selective:
            return self.gate(x).view(B, T, *self.shape)
        return self.gate.to(x.dtype).view(self.shape).expand(B, T, *self.shape)


class BDLRU(_GatedMixer):
    """Selective block-diagonal LRU (arXiv 2602.12021): N blocks of size m.

    Gate logits G_t = W_g x_t + b_g: (N, m, m+1), each row normalised over its m+1 entries;
    A_t = P[..., :m], u_t = P[..., m] * (W_v x_t); y_t = W_o vec(h_t). State: (B, N, m).
    selective=False: G_t = G, a learned table (N, m, m+1) with no input dependence.
    """

    def __init__(self, d_model: int, d_state: int, m: int, norm: str = "softmax",
                 gate_init: str = "long_memory", selective: bool = True):
        super().__init__()
        self.m, self.n = m, d_state // m
        self._make_gate(d_model, (self.n, m, m + 1), selective, gate_init)
        self.value = nn.Linear(d_model, self.n * m, bias=False)
        self.out_proj = nn.Linear(self.n * m, d_model, bias=False)
        self.scan = GatedBlockScan(norm)
        self.init_special()

    @torch.no_grad()
    def init_special(self) -> None:
        # long_memory favours each state's own past (the diagonal of A) so that memory starts long.
        bias = torch.zeros(self.n, self.m, self.m + 1)
        bias[:, torch.arange(self.m), torch.arange(self.m)] = LONG_MEMORY_BIAS
        self._init_gate(bias)

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        B, T, _ = x.shape
        v = self.value(x).view(B, T, self.n, self.m)
        h, h_last = self.scan(self.logits(x), v, state, False, doc_start)
        return self.out_proj(h.to(x.dtype).reshape(B, T, self.n * self.m)), h_last

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.n, self.m, device=device, dtype=torch.promote_types(dtype, torch.float32))


class StateReadout(nn.Linear):
    """H-LRU's readout of its whole state: Linear(N*m, D, bias=False) over the state laid out
    (N, m), lag last (input n*m + k reads y_{t-k}[n]), computed lag by lag from the shifted values.

    forward(y_ext (B, m - 1 + T, N), doc_start (B, T) bool or None) -> (B, T, D). Lag k reads y_ext
    shifted by k against the columns k::m; a lag that reaches back past a document start is zero
    in the state (the reset clears it), so its term is masked out. The weight is read inside this
    module's own forward, where DeepSpeed ZeRO-3 has gathered it.
    """

    def __init__(self, n: int, m: int, d_model: int):
        super().__init__(n * m, d_model, bias=False)
        self.m = m

    def forward(self, y_ext: torch.Tensor, doc_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.m
        T = y_ext.shape[1] - (m - 1)
        out = F.linear(y_ext[:, m - 1:], self.weight[:, 0::m])
        if m == 1:
            return out
        # starts[:, m - 1 + t] counts document starts up to t; lag k survives iff none in (t - k, t]
        starts = None if doc_start is None else F.pad(doc_start.long().cumsum(1), (m - 1, 0))
        for k in range(1, m):
            z = F.linear(y_ext[:, m - 1 - k: m - 1 - k + T], self.weight[:, k::m])
            if starts is not None:
                z = z * (starts[:, m - 1:] == starts[:, m - 1 - k: m - 1 - k + T]).unsqueeze(-1).to(z.dtype)
            out = out + z
        return out


class HLRU(_GatedMixer):
    """Selective higher-order LRU (arXiv 2602.12021): per channel, order m.

    m+1 logits per channel, normalised, give a_{t,1..m} and a_{t,0};
    h_t = sum_k a_{t,k} h_{t-k} + a_{t,0} v_t. State: (B, N, m), the last m values.
    readout="state" (the paper's): y_t = W_o s_t with W_o: Linear(N*m, D) over the state laid out
    (N, m), lag last: input n*m + k reads h_{t-k}[n], k = 0..m-1 (zero before a document start).
    readout="last": y_t = W_o h_t, Linear(N, D). selective=False: a learned logit table (N, m+1).
    """

    def __init__(self, d_model: int, d_state: int, m: int, norm: str = "softmax",
                 gate_init: str = "long_memory", selective: bool = True, readout: str = "state"):
        super().__init__()
        _check_choice(readout, HLRU_READOUTS, "hlru_readout")
        self.m, self.n, self.readout = m, d_state, readout
        self._make_gate(d_model, (self.n, m + 1), selective, gate_init)
        self.value = nn.Linear(d_model, self.n, bias=False)
        if readout == "state":
            self.out_proj = StateReadout(self.n, m, d_model)
        else:
            self.out_proj = nn.Linear(self.n, d_model, bias=False)
        scan = GatedCompanionScan(norm)
        self.scan = CompanionLags(scan, m) if readout == "state" else scan
        self.init_special()

    @torch.no_grad()
    def init_special(self) -> None:
        # long_memory favours the previous value (a_1) so that memory starts long.
        bias = torch.zeros(self.n, self.m + 1)
        bias[:, 0] = LONG_MEMORY_BIAS
        self._init_gate(bias)

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        y, s_last = self.scan(self.logits(x), self.value(x), state, False, doc_start)
        if self.readout == "last":
            return self.out_proj(y.to(x.dtype)), s_last
        return self.out_proj(y.to(x.dtype), doc_start), s_last

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
