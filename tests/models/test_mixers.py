"""Each mixer against a plain per-step loop written here, from the equations in DESIGN.md §2."""
import math

import pytest
import torch

from llm_lru.models import BDLRU, BLUR, GLRU, HLRU, LRU, Attention

B, T, D = 2, 11, 12


def norm_rows(g, norm):
    """The paper's row normalisations, written out independently of kernels.gates."""
    if norm == "softmax":
        e = torch.exp(g - g.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)
    if norm == "sigmoid":
        s = 1 / (1 + torch.exp(-g))
        return s / s.sum(-1, keepdim=True)
    if norm == "relu":
        r = g.clamp(min=0)
        return r / (r.sum(-1, keepdim=True) + 1e-6)
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


def bdlru_loop(mod: BDLRU, x, norm, ds=None):
    n, m = mod.n, mod.m
    P = norm_rows(mod.gate(x).view(B, T, n, m, m + 1), norm)
    v = mod.value(x).view(B, T, n, m)
    h = torch.zeros(B, n, m)
    ys = []
    for t in range(T):
        if ds is not None:
            h = h * (~ds[:, t])[:, None, None]
        h = (P[:, t, :, :, :m] @ h[..., None])[..., 0] + P[:, t, :, :, m] * v[:, t]
        ys.append(h.reshape(B, n * m))
    return mod.out_proj(torch.stack(ys, 1))


def hlru_loop(mod: HLRU, x, norm, ds=None):
    n, m = mod.n, mod.m
    P = norm_rows(mod.gate(x).view(B, T, n, m + 1), norm)
    v = mod.value(x)
    hist = [torch.zeros(B, n) for _ in range(m)]  # hist[k-1] = h_{t-k}
    ys = []
    for t in range(T):
        if ds is not None:
            hist = [h * (~ds[:, t])[:, None] for h in hist]
        h = sum(P[:, t, :, k] * hist[k] for k in range(m)) + P[:, t, :, m] * v[:, t]
        hist = [h] + hist[:-1]
        ys.append(h)
    return mod.out_proj(torch.stack(ys, 1))


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


@pytest.mark.parametrize("norm", ["softmax", "sigmoid", "relu", "tanh"])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_bdlru_matches_loop(norm, m):
    mod = BDLRU(D, 4 * m, m, norm)
    torch.nn.init.normal_(mod.gate.weight, std=0.5)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [5])
    torch.testing.assert_close(mod(x, ds)[0], bdlru_loop(mod, x, norm, ds))
    torch.testing.assert_close(mod(x)[0], bdlru_loop(mod, x, norm))


@pytest.mark.parametrize("norm", ["softmax", "tanh"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_hlru_matches_loop(norm, m):
    mod = HLRU(D, 5, m, norm)
    torch.nn.init.normal_(mod.gate.weight, std=0.5)
    x = torch.randn(B, T, D)
    ds = doc_starts(B, T, [2, 7])
    torch.testing.assert_close(mod(x, ds)[0], hlru_loop(mod, x, norm, ds))
    torch.testing.assert_close(mod(x)[0], hlru_loop(mod, x, norm))


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
