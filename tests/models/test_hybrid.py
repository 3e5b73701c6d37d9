"""The hybrid LM: step mode and chunked prefill equal the full forward; packed documents equal
separate runs; L1-normalised gates keep states bounded; parameter counts match a formula."""
import pytest
import torch

from llm_lru.config import ConfigError, ModelConfig, from_dict, layer_kinds
from llm_lru.kernels import BLOCK, COMPANION, normalize_rows
from llm_lru.models import HybridLM, ffn_width

V = 37


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=16, n_layers=6, pattern="BAHGLS", n_heads=4, n_kv_heads=2,
                window=4, block_size=2, d_state=8)
    base.update(kw)
    return from_dict({"data": {"source": "random"}, "model": base}).model


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def build(**kw):
    return HybridLM(model_cfg(**kw)).double().eval()


@pytest.mark.parametrize("pattern", ["BAHGLS", "B", "H", "L", "G", "A", "S"])
def test_step_mode_equals_full_forward(pattern):
    model = build(pattern=pattern, n_layers=len(pattern) if len(pattern) > 1 else 2)
    ids = torch.randint(0, V, (3, 12))
    full = model(ids)
    state = model.init_state(3)
    steps = []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-9, atol=1e-9)
    assert state.pos == 12


def test_chunked_prefill_equals_full_forward():
    model = build(window=3)
    ids = torch.randint(0, V, (2, 17))
    ds = torch.zeros(2, 17, dtype=torch.bool)
    ds[0, 8] = True
    full = model(ids, ds)
    state, outs = None, []
    for a, b in [(0, 5), (5, 6), (6, 13), (13, 17)]:
        logits, state = model(ids[:, a:b], ds[:, a:b], state=state, return_state=True)
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal,pattern", [(True, "BAHGLS"), (False, "RA")])
def test_packed_documents_equal_separate_runs(causal, pattern):
    model = build(causal=causal, pattern=pattern)
    d1, d2 = torch.randint(0, V, (2, 7)), torch.randint(0, V, (2, 9))
    packed = torch.cat([d1, d2], 1)
    ds = torch.zeros_like(packed, dtype=torch.bool)
    ds[:, 0] = True
    ds[:, 7] = True
    out = model(packed, ds)
    torch.testing.assert_close(out[:, :7], model(d1), rtol=1e-9, atol=1e-9)
    # The second document does not see the first: equal to running it alone (positions shifted
    # by 7, to which RoPE attention is invariant).
    torch.testing.assert_close(out[:, 7:], model(d2, pos_offset=7), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[:, 7:], model(d2), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("norm", ["softmax", "sigmoid", "relu", "tanh"])
def test_states_stay_bounded_over_100k_steps(norm):
    # Rows of (A_t, a0) have unit L1 norm, so |h_t|_inf <= max(|h_{t-1}|_inf, |v_t|_inf) <= 1.
    T, N, m = 100_000, 2, 3
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(1, T, N, m, m + 1, generator=g)
    v = torch.rand(1, T, N, m, generator=g) * 2 - 1
    P = normalize_rows(logits, norm)
    h, _ = BLOCK(P[..., :m], P[..., m] * v)
    assert h.abs().max() <= 1 + 1e-4
    assert torch.isfinite(h).all()
    lg = 3 * torch.randn(1, T, N, m + 1, generator=g)
    Q = normalize_rows(lg, norm)
    y, _ = COMPANION(Q[..., :m], Q[..., m] * v[..., 0])
    assert y.abs().max() <= 1 + 1e-4


def expected_params(cfg: ModelConfig) -> int:
    D, V_, F = cfg.d_model, cfg.vocab_size, ffn_width(cfg.d_model, cfg.ffn_dim)
    S, m = cfg.d_state or D, cfg.block_size
    hd, H, Hkv = D // cfg.n_heads, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    per_kind = {
        "attn": D * H * hd * 2 + 2 * D * Hkv * hd,
        "lru": 2 * (S // 2) + 2 * D * S + D,
        "glru": 3 * D * S + S,
        # gates: Linear(D, .) with bias, or (non-selective) one logit table; H-LRU's 'state'
        # readout is Linear(S * m, D) over the last m values
        "bdlru": (D + 1 if cfg.selective else 1) * (S // m) * m * (m + 1) + 2 * D * S,
        "hlru": (D + 1 if cfg.selective else 1) * S * (m + 1) + D * S + D * S * (m if cfg.hlru_readout == "state" else 1),
    }
    per_kind["swa"] = per_kind["attn"]
    per_kind["blur"] = 2 * per_kind["lru"]
    total = V_ * D + D + (0 if cfg.tie_embeddings else V_ * D)
    for kind in layer_kinds(cfg):
        total += per_kind[kind] + 2 * D + 3 * D * F
    return total


@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_embeddings=False, pattern="BBA", n_layers=5, block_size=4, d_state=16, ffn_dim=40),
    dict(pattern="RA", causal=False),
    dict(pattern="HBA", block_size=4, hlru_readout="last"),
    dict(pattern="HBA", block_size=3, d_state=12, selective=False),
])
def test_parameter_count_matches_formula(kw):
    cfg = model_cfg(**kw)
    assert HybridLM(cfg).num_params() == expected_params(cfg)


def test_blur_refused_in_causal_stack_and_no_step_mode():
    with pytest.raises(ConfigError, match="model.pattern"):
        model_cfg(pattern="RA")
    model = build(pattern="RA", causal=False)
    with pytest.raises(ValueError, match="blur"):
        model.init_state(1)


def test_vocab_size_must_be_resolved():
    with pytest.raises(ValueError, match="model.vocab_size"):
        HybridLM(model_cfg(vocab_size=0))


def test_bf16_step_mode_runs_with_fp32_recurrent_state():
    model = HybridLM(model_cfg()).to(torch.bfloat16).eval()
    state = model.init_state(2)
    assert state.layers[1]["k"].dtype == torch.bfloat16      # attention cache in the weights' dtype
    assert state.layers[0].dtype == torch.float32            # recurrent state accumulates in fp32
    ids = torch.randint(0, V, (2, 5))
    full = model(ids)
    for t in range(5):
        logits, state = model.step(ids[:, t], state)
    assert state.layers[0].dtype == torch.float32
    torch.testing.assert_close(logits, full[:, -1], rtol=0.05, atol=0.05)
