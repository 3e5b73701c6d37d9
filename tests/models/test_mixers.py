"""Each mixer against a plain per-step loop written here, from the equations in DESIGN.md §2."""
import math

import pytest
import torch

from llm_lru.models import BDLRU, BLUR, GLRU, HLRU, LRU, Attention

B, T, D = 2, 11, 12


def norm_rows(g, norm):
    """The paper's row normalisations, written out independently of kernels.common.scan."""
    if norm == "softmax":
        e = torch.exp(g - g.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)
    if norm == "sigmoid":
        s = 1 / (1 + torch.exp(-g))
        return s / s.sum(-1, keepdim=True)
    if norm == "relu":
        r = g.clamp(min=0)
        return r / (r.sum(-1, keepdim=True) + 1e-6)
    if norm == "lin_l1":
        return g / (g.abs().sum(-1, keepdim=True) + 1e-6)
    t = torch.tanh(g)
    return t / (t.abs().sum(-1, keepdim=True) + 1e-6)


def doc_starts(b, t, at):
    ds = torch.zeros(b, t, dtype=torch.bool)
    for p in at:
        ds[:, p] = True
    return ds


def lru_loop(mod: LRU, x, ds=None):
    lam = torch.exp(torch.complex(-torch.exp(mod.nu_log), torch.exp(mod.theta_log)))
    gamma = torch.sqrt(1 - lam.abs() ** 2)
    bx = mod.in_proj(x).view(B, T, mod.n, 2)
    bx = torch.complex(bx[..., 0], bx[..., 1]) * gamma
    h = torch.zeros(B, mod.n, dtype=torch.complex128)
    hs = [None] * T
    order = range(T - 1, -1, -1) if mod.reverse else range(T)
    for t in order:
        if ds is not None:
            cut = ds[:, t] if not mod.reverse else (ds[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=torch.bool))
            h = torch.where(cut[:, None], torch.zeros_like(h), h)
        h = lam * h + bx[:, t]
        hs[t] = h
    h = torch.stack(hs, 1)
    return mod.out_proj(torch.stack([h.real, h.imag], -1).reshape(B, T, -1)) + mod.skip * x


def glru_loop(mod: GLRU, x, ds=None):
    a = torch.sigmoid(mod.gate(x))
    v = mod.value(x)
    h = torch.zeros(B, mod.n)
    ys = []
    for t in range(T):
        if ds is not None:
            h = h * (~ds[:, t])[:, None]
        h = a[:, t] * h + (1 - a[:, t]) * v[:, t]
        ys.append(h)
    return mod.out_proj(torch.stack(ys, 1))


def gate_logits(mod, x, shape):
    """Selective: W_g x_t + b_g; non-selective: the same table at every step."""
    if isinstance(mod.gate, torch.nn.Linear):
        return mod.gate(x).view(B, T, *shape)
    return torch.stack([torch.stack([mod.gate.view(shape)] * T)] * B)


def bdlru_loop(mod: BDLRU, x, norm, ds=None):
    n, m = mod.n, mod.m
    P = norm_rows(gate_logits(mod, x, (n, m, m + 1)), norm)
    v = mod.value(x).view(B, T, n, m)
    h = torch.zeros(B, n, m)
    ys = []
    for t in range(T):
        if ds is not None:
            h = h * (~ds[:, t])[:, None, None]
        h = (P[:, t, :, :, :m] @ h[..., None])[..., 0] + P[:, t, :, :, m] * v[:, t]
        ys.append(h.reshape(B, n * m))
    return mod.out_proj(torch.stack(ys, 1))


def hlru_loop(mod: HLRU, x, norm, ds=None, state=None):
    """Per step; readout 'state': W_o over (h_t, ..., h_{t-m+1}) laid out (N, m), lag last."""
    n, m = mod.n, mod.m
    P = norm_rows(gate_logits(mod, x, (n, m + 1)), norm)
    v = mod.value(x)
    hist = [torch.zeros(B, n) if state is None else state[..., k] for k in range(m)]  # hist[k-1] = h_{t-k}
    ys = []
    for t in range(T):
        if ds is not None:
            hist = [h * (~ds[:, t])[:, None] for h in hist]
        h = sum(P[:, t, :, k] * hist[k] for k in range(m)) + P[:, t, :, m] * v[:, t]
        hist = [h] + hist[:-1]
        if mod.readout == "last":
            ys.append(h)
        else:
            ys.append(torch.stack(hist, -1).reshape(B, n * m))  # index n*m + k holds h_{t-k}
    return torch.stack(ys, 1) @ mod.out_proj.weight.T


def rope_complex(x, pos, theta):
    """RoPE as complex multiplication of (x[:hd/2] + i x[hd/2:]) by exp(i pos w)."""
    hd = x.shape[-1]
    w = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * torch.exp(1j * pos[:, None] * w)
    return torch.cat([z.real, z.imag], -1)


def attention_loop(mod: Attention, x, ds=None):
    H, Hkv, hd = mod.n_heads, mod.n_kv_heads, mod.head_dim
    pos = torch.arange(T, dtype=torch.float64)
    q = rope_complex(mod.q_proj(x).view(B, T, H, hd).transpose(1, 2), pos, mod.rope_theta)
    k = rope_complex(mod.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2), pos, mod.rope_theta)
    v = mod.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    doc = torch.cumsum(ds.long(), 1) if ds is not None else torch.zeros(B, T, dtype=torch.long)
    out = torch.zeros(B, H, T, hd)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(T):
                js = [j for j in range(T) if j <= i and doc[b, j] == doc[b, i] and (not mod.window or i - j < mod.window)]
                s = torch.stack([q[b, h, i] @ k[b, g, j] for j in js]) / math.sqrt(hd)
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[c] * v[b, g, j] for c, j in enumerate(js))
    return mod.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))


@pytest.fixture(autouse=True)
def float64_and_seed():
    # Float64 so the loops here are exact references; restored so other modules are unaffected.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("with_docs", [False, True])
def test_lru_matches_complex_loop(with_docs):
    mod = LRU(D, 8)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [4, 9]) if with_docs else None
    torch.testing.assert_close(mod(x, ds)[0], lru_loop(mod, x, ds))


@pytest.mark.parametrize("with_docs", [False, True])
def test_glru_matches_loop(with_docs):
    mod = GLRU(D, 6)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [3]) if with_docs else None
    torch.testing.assert_close(mod(x, ds)[0], glru_loop(mod, x, ds))


@pytest.mark.parametrize("norm", ["softmax", "sigmoid", "relu", "tanh", "lin_l1"])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_bdlru_matches_loop(norm, m):
    mod = BDLRU(D, 4 * m, m, norm)
    torch.nn.init.normal_(mod.gate.weight, std=0.5)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [5])
    torch.testing.assert_close(mod(x, ds)[0], bdlru_loop(mod, x, norm, ds))
    torch.testing.assert_close(mod(x)[0], bdlru_loop(mod, x, norm))


@pytest.mark.parametrize("readout", ["state", "last"])
@pytest.mark.parametrize("norm", ["softmax", "tanh", "lin_l1"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_hlru_matches_loop(norm, m, readout):
    mod = HLRU(D, 5, m, norm, readout=readout)
    torch.nn.init.normal_(mod.gate.weight, std=0.5)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [2, 7])
    torch.testing.assert_close(mod(x, ds)[0], hlru_loop(mod, x, norm, ds))
    torch.testing.assert_close(mod(x)[0], hlru_loop(mod, x, norm))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_hlru_state_readout_reads_every_lag(m):
    mod = HLRU(D, 5, m, "softmax", readout="state")
    assert mod.out_proj.weight.shape == (D, 5 * m)
    torch.nn.init.normal_(mod.gate.weight, std=0.5)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [0, 2, 7])
    ds[1, 8] = True  # rows differ
    torch.testing.assert_close(mod(x, ds)[0], hlru_loop(mod, x, "softmax", ds))
    torch.testing.assert_close(mod(x)[0], hlru_loop(mod, x, "softmax"))
    # from a state: the lags before the slice are the state's entries
    s0 = torch.randn(B, 5, m)
    torch.testing.assert_close(mod(x, None, s0)[0], hlru_loop(mod, x, "softmax", None, s0))
    # a lag that a document start separates from t does not count, even one from the state
    ds0 = doc_starts(B, T, [0, 6])
    torch.testing.assert_close(mod(x, ds0, s0)[0], hlru_loop(mod, x, "softmax", ds0, s0))


def test_hlru_state_readout_weights_each_lag():
    # W_o = e_{n*m + k}: the output is h_{t-k}[n] alone, against the 'last' readout's outputs
    m, n = 3, 2
    mod = HLRU(D, n, m, readout="state")
    last = HLRU(D, n, m, readout="last")
    last.load_state_dict({k: v for k, v in mod.state_dict().items() if k != "out_proj.weight"}, strict=False)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        last.out_proj.weight.copy_(torch.eye(D, n))
        h = last(x)[0][..., :n]  # (B, T, N): h_t
        for k in range(m):
            mod.out_proj.weight.zero_()
            mod.out_proj.weight[0, 1 * m + k] = 1.0
            want = torch.cat([torch.zeros(B, k), h[:, : T - k, 1]], 1)
            torch.testing.assert_close(mod(x)[0][..., 0], want)


@pytest.mark.parametrize("kind", ["bdlru", "hlru"])
@pytest.mark.parametrize("norm", ["softmax", "lin_l1"])
def test_non_selective_and_options_match_loop(kind, norm):
    m = 2
    if kind == "bdlru":
        mod = BDLRU(D, 4 * m, m, norm, gate_init="uniform", selective=False)
        assert isinstance(mod.gate, torch.nn.Parameter) and mod.gate.shape == (4 * m * (m + 1),)
    else:
        mod = HLRU(D, 5, m, norm, gate_init="uniform", selective=False)
        assert isinstance(mod.gate, torch.nn.Parameter) and mod.gate.shape == (5 * (m + 1),)
    with torch.no_grad():
        mod.gate.normal_(0.0, 1.0)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [4])
    loop = bdlru_loop if kind == "bdlru" else hlru_loop
    torch.testing.assert_close(mod(x, ds)[0], loop(mod, x, norm, ds))
    # time-constant transitions: the gate gets a gradient through the table alone
    mod(x, ds)[0].sum().backward()
    assert mod.gate.grad is not None and mod.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("selective", [True, False])
def test_gate_init(selective):
    torch.manual_seed(1)
    for cls, args, own_past in ((BDLRU, (D, 8, 2), lambda b: b[:, [0, 1], [0, 1]]), (HLRU, (D, 4, 2), lambda b: b[:, 0])):
        uni = cls(*args, gate_init="uniform", selective=selective)
        long = cls(*args, gate_init="long_memory", selective=selective)
        tab = lambda mod: (mod.gate.bias if selective else mod.gate).view(*mod.shape)  # noqa: E731
        assert (tab(uni) == 0).all()
        assert (own_past(tab(long)) == 3.0).all() and tab(long).sum() == 3.0 * own_past(tab(long)).numel()
        if selective:
            assert abs(float(uni.gate.weight.detach().std()) - 0.02) < 0.005
    with pytest.raises(ValueError, match="gate_init"):
        BDLRU(D, 8, 2, gate_init="warm")
    with pytest.raises(ValueError, match="hlru_readout"):
        HLRU(D, 4, 2, readout="all")


@pytest.mark.parametrize("with_docs", [False, True])
def test_blur_is_forward_plus_reverse_lru(with_docs):
    mod = BLUR(D, 8)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [6]) if with_docs else None
    torch.testing.assert_close(mod(x, ds)[0], lru_loop(mod.fwd, x, ds) + lru_loop(mod.bwd, x, ds))


@pytest.mark.parametrize("window,n_kv", [(0, 4), (0, 2), (4, 1)])
def test_attention_matches_loop(window, n_kv):
    mod = Attention(D * 2, 4, n_kv, window=window)
    x = torch.randn(B, T, D * 2)
    ds = doc_starts(B, T, [6])
    torch.testing.assert_close(mod(x, ds)[0], attention_loop(mod, x, ds))
    torch.testing.assert_close(mod(x)[0], attention_loop(mod, x))


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("kind", ["hlru_state", "hlru_last", "bdlru"])
def test_step_mode_and_chunked_prefill_equal_full_forward(kind, selective):
    m = 3
    mod = (BDLRU(D, 2 * m, m, selective=selective) if kind == "bdlru"
           else HLRU(D, 4, m, selective=selective, readout=kind.split("_")[1]))
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [5])
    ds[1, 7] = True
    full, last = mod(x, ds)
    for cuts in ([(0, 4), (4, 5), (5, 9), (9, T)], [(t, t + 1) for t in range(T)]):  # chunks, steps
        state, outs = mod.init_state(B), []
        for a, b in cuts:
            y, state = mod(x[:, a:b], ds[:, a:b], state)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), full)
        torch.testing.assert_close(state, last)


def test_lin_l1_guards_the_all_zero_row():
    from llm_lru.kernels import normalize_rows

    mod = BDLRU(D, 4, 2, "lin_l1", gate_init="uniform", selective=False)  # an all-zero logit table
    y, h = mod(torch.randn(B, T, D))
    assert torch.isfinite(y).all() and (h == 0).all()  # no input weight, no transition: the state stays 0
    P = normalize_rows(torch.tensor([[0.5, -1.5, 2.0], [0.0, 0.0, 0.0]]), "lin_l1")
    torch.testing.assert_close(P, torch.tensor([[0.125, -0.375, 0.5], [0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


def test_config_keys_are_validated_by_name():
    from llm_lru.config import ConfigError, from_dict

    def model(**kw):
        return from_dict({"data": {"source": "random"}, "model": {"vocab_size": 16, **kw}}).model

    m = model(gate_norm="lin_l1", gate_init="uniform", selective=False, hlru_readout="last")
    assert (m.gate_norm, m.gate_init, m.selective, m.hlru_readout) == ("lin_l1", "uniform", False, "last")
    assert (model().gate_init, model().selective, model().hlru_readout) == ("long_memory", True, "state")
    for key, bad in (("gate_init", "warm"), ("hlru_readout", "all"), ("gate_norm", "l2"), ("selective", "maybe")):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            model(**{key: bad})
