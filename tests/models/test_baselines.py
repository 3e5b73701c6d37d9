"""The baseline mixers (LSTM, DeltaNet) against float64 references written from their formulas:
values and gradients, document starts, state passing (chunked prefill = one pass), and the
refusals (sequence parallelism, Triton)."""
import pytest
import torch
import torch.nn.functional as F

from llm_lru.config import ConfigError, ModelConfig, from_dict
from llm_lru.kernels import get_backend, set_backend
from llm_lru.kernels.delta import delta_rule_ref
from llm_lru.models.baselines import LSTM, DeltaNet
from llm_lru.models.hybrid import HybridLM


def lstm_ref(mod: LSTM, x, reset=None):
    """The LSTM equations, one step at a time (PyTorch's gate order i, f, g, o)."""
    W_ih, W_hh = mod.lstm.weight_ih_l0, mod.lstm.weight_hh_l0
    b = mod.lstm.bias_ih_l0 + mod.lstm.bias_hh_l0
    B, T, _ = x.shape
    h = x.new_zeros(B, mod.n)
    c = x.new_zeros(B, mod.n)
    ys = []
    for t in range(T):
        if reset is not None:
            keep = (~reset[:, t]).to(x.dtype)[:, None]
            h, c = h * keep, c * keep
        i, f, g, o = (x[:, t] @ W_ih.T + h @ W_hh.T + b).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h @ mod.out_proj.weight.T)
    return torch.stack(ys, 1)


def deltanet_ref(mod: DeltaNet, x, reset=None):
    B, T, _ = x.shape
    q = F.normalize(F.silu(x @ mod.q_proj.weight.T).view(B, T, mod.h, mod.dk), dim=-1)
    k = F.normalize(F.silu(x @ mod.k_proj.weight.T).view(B, T, mod.h, mod.dk), dim=-1)
    v = (x @ mod.v_proj.weight.T).view(B, T, mod.h, mod.dk)
    beta = torch.sigmoid(x @ mod.b_proj.weight.T + mod.b_proj.bias)
    o, _ = delta_rule_ref(q, k, v, beta, None, reset)
    return o.reshape(B, T, -1) @ mod.out_proj.weight.T


def mixers():
    torch.manual_seed(0)
    return [("lstm", LSTM(6, 5).double(), lstm_ref), ("deltanet", DeltaNet(6, 8, 2).double(), deltanet_ref)]


@pytest.mark.parametrize("with_resets", [False, True])
@pytest.mark.parametrize("i", [0, 1])
def test_mixer_matches_float64_reference(i, with_resets):
    name, mod, ref = mixers()[i]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, 6, generator=g, dtype=torch.float64, requires_grad=True)
    reset = None
    if with_resets:
        reset = torch.zeros(3, 37, dtype=torch.bool)
        reset[:, 0] = True
        reset[1, 12] = reset[2, 30] = True
    w = torch.randn(3, 37, 6, generator=g, dtype=torch.float64)
    y, _ = mod(x, reset)
    y_ref = ref(mod, x, reset)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    params = [x] + list(mod.parameters())
    got = torch.autograd.grad((y * w).sum(), params)
    want = torch.autograd.grad((y_ref * w).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("i", [0, 1])
def test_state_passing_equals_one_pass(i):
    _, mod, _ = mixers()[i]
    x = torch.randn(2, 20, 6, dtype=torch.float64)
    y, last = mod(x)
    y1, s = mod(x[:, :7])
    y2, last2 = mod(x[:, 7:], None, s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last2, last, rtol=1e-12, atol=1e-12)
    assert mod.init_state(2).shape == last.shape


@pytest.mark.parametrize("pattern", ["CA", "DA"])
def test_hybrid_with_baselines_trains_a_step_and_steps_like_forward(pattern):
    cfg = ModelConfig(vocab_size=11, d_model=16, n_layers=2, pattern=pattern, n_heads=2, d_state=8)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    ids = torch.randint(0, 11, (2, 9))
    loss = model.loss(ids, ids)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(2)
        for t in range(9):
            logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-5)


def test_refusals():
    base = {"model": {"vocab_size": 11, "d_model": 16, "n_layers": 2, "pattern": "D", "n_heads": 2},
            "train": {"seq_len": 8}, "data": {"source": "random"}}
    with pytest.raises(ConfigError, match="parallel.sp"):
        from_dict({**base, "parallel": {"sp": 2}})
    with pytest.raises(ConfigError, match="model.n_heads"):
        from_dict({**base, "model": {**base["model"], "n_heads": 3, "d_state": 16}})
    prev = get_backend()
    set_backend("triton")
    try:
        for mod in (LSTM(4, 4), DeltaNet(4, 4, 1)):
            with pytest.raises(ValueError, match="triton"):
                mod(torch.randn(1, 3, 4))
    finally:
        set_backend(prev)
