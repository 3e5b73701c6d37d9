"""The baselines arXiv 2602.12021 compares BD-LRU / H-LRU against, as mixers of the hybrid stack
(pattern letters in llm_lru.config.DEFAULT_KINDS): an LSTM and DeltaNet.

Both map x: (B, T, D) -> y: (B, T, D) with an optional state and document starts (B, T) bool,
like the recurrent mixers. Neither is a block-diagonal linear recurrence, so neither has a
`scan` seam: sequence parallelism refuses them (config validation), and neither has a Triton
kernel of this project (a Triton backend request is refused when the layer runs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_lru.kernels import get_backend
from llm_lru.kernels.delta import delta_rule, fla_available


class LSTM(nn.Module):
    """torch.nn.LSTM (one layer, hidden width d_state) and y_t = W_o h_t.

    State: (B, 2, d_state), the hidden and cell states. Document starts inside the sequence zero
    both before that step (run one step at a time then; without them cuDNN / the fused CPU kernel
    runs the whole sequence).
    """

    def __init__(self, d_model: int, d_state: int):
        super().__init__()
        self.n = d_state
        self.lstm = nn.LSTM(d_model, d_state, batch_first=True)
        self.out_proj = nn.Linear(d_state, d_model, bias=False)

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        if get_backend() == "triton":
            raise ValueError("kernels backend triton: the lstm mixer has no Triton kernel (it runs torch.nn.LSTM)")
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        h, c = state[:, 0].to(x.dtype)[None].contiguous(), state[:, 1].to(x.dtype)[None].contiguous()
        if doc_start is not None and bool(doc_start[:, 0].any()):
            keep = (~doc_start[:, 0]).to(x.dtype)[None, :, None]
            h, c = h * keep, c * keep
        if doc_start is None or not bool(doc_start[:, 1:].any()):
            out, (h, c) = self.lstm(x, (h, c))
        else:
            outs = []
            for t in range(T):
                if t:
                    keep = (~doc_start[:, t]).to(x.dtype)[None, :, None]
                    h, c = h * keep, c * keep
                o, (h, c) = self.lstm(x[:, t:t + 1], (h, c))
                outs.append(o)
            out = torch.cat(outs, 1)
        return self.out_proj(out), torch.stack([h[0], c[0]], 1)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, 2, self.n, device=device, dtype=dtype)


class DeltaNet(nn.Module):
    """DeltaNet (Yang et al. 2024, arXiv 2406.06484) over H heads of width d_state / H:
    q, k = L2norm(SiLU(W_q x)), L2norm(SiLU(W_k x)), v = W_v x, beta = sigmoid(W_b x) per head,
    the delta rule S_t = (I - beta k k^T) S_{t-1} + beta k v^T, o_t = S_t^T q_t, y = W_o o.
    (fla's layer adds a short convolution before q, k, v; left out: the mixer is the recurrence.)

    State: (B, H, K, V), K = V = d_state / H, in float32 or better. On CUDA with fla installed,
    fla's chunk kernel runs the recurrence (llm_lru.kernels.delta).
    """

    def __init__(self, d_model: int, d_state: int, n_heads: int):
        super().__init__()
        if n_heads < 1 or d_state % n_heads:
            raise ValueError(f"model.n_heads: deltanet needs n_heads to divide the state width {d_state}, got {n_heads}")
        self.h, self.dk = n_heads, d_state // n_heads
        self.q_proj = nn.Linear(d_model, d_state, bias=False)
        self.k_proj = nn.Linear(d_model, d_state, bias=False)
        self.v_proj = nn.Linear(d_model, d_state, bias=False)
        self.b_proj = nn.Linear(d_model, n_heads)
        self.out_proj = nn.Linear(d_state, d_model, bias=False)

    def forward(self, x, doc_start=None, state=None, pos_offset=0):
        if get_backend() == "triton" and not (x.is_cuda and fla_available()):
            raise ValueError("kernels backend triton: the deltanet mixer's only Triton kernel is fla's (CUDA, "
                             "flash-linear-attention installed)")
        B, T, _ = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        q = F.normalize(F.silu(self.q_proj(x)).view(B, T, self.h, self.dk).to(acc), dim=-1)
        k = F.normalize(F.silu(self.k_proj(x)).view(B, T, self.h, self.dk).to(acc), dim=-1)
        v = self.v_proj(x).view(B, T, self.h, self.dk).to(acc)
        beta = torch.sigmoid(self.b_proj(x).to(acc))
        o, last = delta_rule(q, k, v, beta, state, doc_start)
        return self.out_proj(o.reshape(B, T, self.h * self.dk).to(x.dtype)), last

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.h, self.dk, self.dk, device=device, dtype=torch.promote_types(dtype, torch.float32))
