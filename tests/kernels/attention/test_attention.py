"""local_attention (the tiled CPU route, the flex route) against the dense-mask reference
`dense_attention`: values and the gradients of q, k and v on random document layouts (a
different one per batch row), windows (1, small, larger than T), queries offset into the keys
(Tq < Tk, as with gathered keys and KV caches), Tq = 1, grouped KV heads, bidirectional, T not a
multiple of the tile. Plus: no tensor of Tq x Tk entries is ever created, and the tiles computed
are those a window or a document layout allows (O(T x W), O(sum doc_len^2)).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm_lru.kernels.attention import dense_attention, local_attention, tile_plan, tiled_attention
from llm_lru.kernels.attention import flex as kflex
from llm_lru.kernels.attention import op as A

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def random_docs(B, T, p, gen):
    """(B, T) document starts, a different random layout per row (row 0 may start mid-document)."""
    return torch.rand(B, T, generator=gen) < p


def inputs(B, H, Hkv, Tq, Tk, hd, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, hd, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, hd, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, hd, generator=gen, dtype=torch.float64)
    g = torch.randn(B, H, Tq, hd, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], g.to(dtype), gen


def compare(fn, B, H, Hkv, Tq, Tk, window, causal, p_doc, dtype, seed=0, hd=8):
    """fn's values and q/k/v gradients against dense_attention on the same inputs."""
    (q, k, v), g, gen = inputs(B, H, Hkv, Tq, Tk, hd, dtype, seed)
    docs = random_docs(B, Tk, p_doc, gen) if p_doc else None
    res = []
    for f in (fn, dense_attention):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*x, doc_start=docs, window=window, causal=causal)
        out.backward(g)
        res.append([out] + [t.grad for t in x])
    ref = res[1]
    if dtype == torch.bfloat16:  # bf16 rounds inputs, tile joins and the reference alike: judge against fp64
        x = [t.double().requires_grad_() for t in (q, k, v)]
        out = dense_attention(*x, doc_start=docs, window=window, causal=causal)
        out.backward(g.double())
        ref = [out] + [t.grad for t in x]
    for name, a, b in zip(("out", "dq", "dk", "dv"), res[0], ref):
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def tiled(tile):
    return lambda q, k, v, doc_start, window, causal: tiled_attention(q, k, v, doc_start, window, causal, tile=tile)


# (B, H, Hkv, Tq, Tk, window, causal, p_doc): tiles of 8, so these span many tiles, none a multiple of 8.
CASES = [
    (2, 4, 2, 37, 37, 0, True, 0.1),      # packed documents, full causal, GQA
    (2, 4, 1, 37, 37, 5, True, 0.1),      # sliding window, MQA
    (2, 2, 2, 45, 45, 1, True, 0.1),      # window 1: each query sees itself
    (1, 4, 4, 29, 29, 100, True, 0.0),    # window > T, no documents
    (2, 4, 2, 13, 50, 0, True, 0.1),      # queries offset into the keys (gathered K/V, a cache)
    (2, 4, 2, 13, 50, 9, True, 0.05),     # offset + window (the SWA halo)
    (2, 4, 2, 1, 50, 0, True, 0.1),       # Tq = 1: one decoding step
    (2, 4, 2, 1, 50, 7, True, 0.1),
    (2, 4, 2, 20, 20, 0, True, 0.0),      # nothing but causality: only the diagonal tiles masked
    (2, 4, 2, 9, 40, 0, True, 0.0),       # offset, no documents: no SDPA shortcut applies
    (2, 4, 2, 40, 40, 0, False, 0.1),     # bidirectional with documents
    (2, 4, 2, 40, 40, 6, False, 0.0),     # bidirectional window
    (3, 2, 1, 64, 64, 0, True, 0.3),      # many short documents, T a multiple of the tile
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_tiled_matches_dense(case, dtype):
    compare(tiled(8), *case, dtype=dtype)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], CASES[10]])
def test_tiled_matches_dense_bf16(case):
    compare(tiled(8), *case, dtype=torch.bfloat16)


@pytest.mark.parametrize("seed", range(4))
def test_local_attention_random_layouts(seed):
    """The public function (default tile) on random shapes, windows, offsets and layouts."""
    gen = torch.Generator().manual_seed(100 + seed)
    Tk = int(torch.randint(130, 400, (1,), generator=gen))
    Tq = Tk if seed % 2 else int(torch.randint(1, Tk, (1,), generator=gen))
    window = [0, 1, 37, 1000][seed]
    compare(local_attention, 2, 4, 2, Tq, Tk, window, True, 0.02, torch.float32, seed=seed)


def test_whole_documents_and_no_documents():
    """Documents that all start on tile boundaries (every tile fully visible or empty), a row
    without any start, and doc_start=None through the SDPA shortcut."""
    (q, k, v), g, _ = inputs(2, 4, 2, 48, 48, 8, torch.float64, 3)
    docs = torch.zeros(2, 48, dtype=torch.bool)
    docs[0, ::16] = True
    for d in (docs, None):
        torch.testing.assert_close(tiled_attention(q, k, v, d, 0, True, tile=16), dense_attention(q, k, v, d, 0, True))
        torch.testing.assert_close(local_attention(q, k, v, d, 0, False), dense_attention(q, k, v, d, 0, False))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("window,causal,offset", [(0, True, 0), (300, True, 0), (0, True, 1000), (0, False, 0)])
def test_no_tq_by_tk_tensor(window, causal, offset):
    """At T = 2048 (16 tiles), no op in forward or backward returns Tq x Tk entries or more (a mask
    or score matrix); the dense reference, watched the same way, does (so the watch can fail)."""
    B, H, Hkv, Tk, hd = 1, 2, 1, 2048, 16
    Tq = Tk - offset
    (q, k, v), g, gen = inputs(B, H, Hkv, Tq, Tk, hd, torch.float32, 0)
    docs = random_docs(B, Tk, 0.002, gen)
    for fn, small in ((local_attention, True), (dense_attention, False)):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        with LargestTensor() as watch:
            fn(*x, doc_start=docs, window=window, causal=causal).backward(g)
        assert (watch.largest < Tq * Tk // 8) == small, (fn.__name__, watch.largest, Tq * Tk)
    assert any("backward" in op for op in watch.ops)  # the watch saw the backward too


def plan_entries(plan):
    return sum((qe - qs) * (ke - ks) for qs, qe, segs in plan for ks, ke, _ in segs)


def test_window_costs_t_times_w():
    """A sliding window computes O(T x (W + tile)) query-key entries, not T^2."""
    T, tile = 4096, 64
    for W in (1, 64, 300):
        assert plan_entries(tile_plan(T, T, None, W, True, tile)) <= T * (W + 2 * tile)
    assert plan_entries(tile_plan(T, T, None, 0, True, tile)) >= T * T // 2  # full causal: all of it


def test_packed_documents_cost_sum_of_squares():
    """Tiles whose queries and keys share no document in any row are skipped: the entries computed
    are at most sum over documents of (len + 2 tile)^2, with a different layout per row."""
    T, tile = 4096, 64
    gen = torch.Generator().manual_seed(0)
    docs = random_docs(3, T, 1 / 300, gen)
    docs[:, 0] = True
    ids = A.doc_ids(docs)
    bound = 0
    for row in docs:
        cuts = row.nonzero().flatten().tolist() + [T]
        bound += sum((b - a + 2 * tile) ** 2 for a, b in zip(cuts, cuts[1:]))
    entries = plan_entries(tile_plan(T, T, ids, 0, False, tile))
    assert entries <= bound < T * T
    # one row alone skips more than the three together
    assert plan_entries(tile_plan(T, T, ids[:1], 0, False, tile)) < entries


def test_cpu_selects_tiled_route(monkeypatch):
    """On CPU the masked cases go to tiled_attention: never to flex, never to the dense mask."""
    def refuse(*a, **k):
        raise AssertionError("wrong route")
    monkeypatch.setattr(A, "flex_attention_route", refuse)
    monkeypatch.setattr(A, "dense_attention", refuse)
    (q, k, v), _, gen = inputs(1, 2, 1, 20, 30, 8, torch.float32, 0)
    local_attention(q, k, v, random_docs(1, 30, 0.1, gen), 5, True)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("hd", [16, 12])  # 12: zero-padded to 16 for flex's kernels
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], CASES[7], CASES[10]])
def test_flex_mask_mod_matches_dense_forward(case, hd):
    """The CUDA route's mask_mod and BlockMask, run eagerly on CPU (flex is forward-only there)."""
    B, H, Hkv, Tq, Tk, window, causal, p_doc = case
    (q, k, v), _, gen = inputs(B, H, Hkv, Tq, Tk, hd, torch.float32, 0)
    docs = random_docs(B, Tk, p_doc, gen) if p_doc else None
    out = A.flex_attention_route(q, k, v, docs, window, causal, compiled=False)
    torch.testing.assert_close(out, dense_attention(q, k, v, docs, window, causal), **TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_built_once_per_doc_start(monkeypatch):
    """The layers of one forward share their doc_start: one BlockMask for all of them. A new
    batch (another tensor, even with equal values) or an in-place edit builds a new one, and every
    output still equals the dense reference of the documents it was given."""
    import torch.nn.attention.flex_attention as flex

    built = []
    real = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    monkeypatch.setattr(kflex, "_block_masks", kflex.BlockMaskMemo())
    (q, k, v), _, gen = inputs(2, 2, 1, 40, 40, 16, torch.float32, 0)

    def check(docs):
        out = kflex.flex_attention_route(q, k, v, docs, 0, True, compiled=False)
        torch.testing.assert_close(out, dense_attention(q, k, v, docs, 0, True), **TOL[torch.float32])

    docs = random_docs(2, 40, 0.2, gen)
    for _layer in range(3):
        check(docs)
    assert len(built) == 1
    check(docs.clone())                      # a new batch with the same values
    assert len(built) == 2
    other = random_docs(2, 40, 0.2, gen)
    check(other)                             # other documents: a stale mask would fail the check
    assert len(built) == 3
    other[:, 7] = ~other[:, 7]               # an in-place edit of the cached tensor
    check(other)
    assert len(built) == 4
    check(None)
    check(None)
    assert len(built) == 5


def test_bad_input_names_the_tensor():
    (q, k, v), _, _ = inputs(1, 4, 2, 10, 8, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        local_attention(q, k, v)
    with pytest.raises(ValueError, match="doc_start"):
        local_attention(q[:, :, :8], k, v, torch.zeros(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="Hkv dividing H"):
        local_attention(q[:, :, :8], k[:, :1].expand(1, 3, 8, 8), v[:, :1].expand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="window"):
        local_attention(q[:, :, :8], k, v, window=-1)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[4], CASES[5], CASES[6], CASES[10]])
def test_cuda_route_matches_dense(case, dtype, monkeypatch):
    """local_attention on CUDA (compiled flex_attention with a BlockMask) against the dense mask
    (in float64), which the route itself must not call."""
    def refuse(*a, **k):
        raise AssertionError("the CUDA route fell back to the dense mask")
    monkeypatch.setattr(A, "dense_attention", refuse)
    B, H, Hkv, Tq, Tk, window, causal, p_doc = case
    (q, k, v), g, gen = inputs(B, H, Hkv, 4 * Tq, 4 * Tk, 16, dtype, 0)
    docs = random_docs(B, 4 * Tk, p_doc / 4, gen) if p_doc else None
    q, k, v, g = (t.cuda() for t in (q, k, v, g))
    docs = docs.cuda() if docs is not None else None
    res = []
    for f, dt in ((local_attention, dtype), (dense_attention, torch.float64)):
        x = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = f(*x, doc_start=docs, window=window, causal=causal)
        out.backward(g.to(dt))
        res.append([out] + [t.grad for t in x])
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    for name, a, b in zip(("out", "dq", "dk", "dv"), *res):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window", [0, 512])
def test_cuda_route_memory_is_not_quadratic(window):
    """fwd + bwd at 32K tokens with packed documents: the peak above the inputs stays far below
    one byte per query-key pair (a dense boolean mask alone would be 1 GiB)."""
    T = 32768
    (q, k, v), g, gen = inputs(1, 4, 2, T, T, 64, torch.bfloat16, 0)
    docs = random_docs(1, T, 1 / 2000, gen).cuda()
    q, k, v, g = (t.cuda() for t in (q, k, v, g))
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    local_attention(*x, doc_start=docs, window=window).backward(g)  # compile outside the measurement
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    local_attention(*x, doc_start=docs, window=window).backward(g)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < T * T // 8
