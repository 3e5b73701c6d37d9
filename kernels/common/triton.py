"""Pieces shared by the Triton scan kernels: per-thread gate normalisations, tuple helpers,
launch choices, the fold of chunk carries, and the split-phase scan they all run (TritonLocal).

Every kernel gives each row (one (b, n) block) to one thread: the row's m-vector state, its
transition rows and its gate rows are tuples of (BLOCK_R,) vectors unrolled over m, so the time
loop is elementwise, with no cross-thread reduction (no shuffles, no barriers), the way fla's
fused_recurrent kernels keep theirs. The tuple lengths are constexprs (m, m + 1): nothing is
padded to a power of two.

The normalisation codes match common.scan.NORMS: 0 = none (transitions given),
1 softmax, 2 sigmoid/sum, 3 relu/sum, 4 tanh/sum|.|, 5 lin_l1 (g/sum|g|). The gates module is the definition; these
jit functions are tested against it through the fused scans.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .scan import EPS, NORMS, LocalGrad, LocalScan, ScanOp, acc_dtype, block_product_tree, check_norm

Tensor = torch.Tensor


NORM_CODE = {name: i + 1 for i, name in enumerate(NORMS)}


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# One row per thread: 4 warps of 32 rows. Fewer rows get a smaller tile (the grid, and
# pick_chunk's time split, fill the GPU instead).
ROWS_PER_WARP = 32


MAX_WARPS = 4


# P columns one program carries in a chunk's carry pass: 2 x m x NCOL accumulators (old and new
# product rows) stay near 64 registers for every m, so m = 8 and 16 split the columns over programs.
# The companion carry gets half (ptxas spilled its m = 8, 4-column form for sm_80 at 72 registers).
P_REGS = 32


def norm_code(norm: Optional[str]) -> int:
    """'softmax' -> 1, ...; None -> 0 (transitions given, no normalisation)."""
    if norm is None:
        return 0
    check_norm(norm)
    return NORM_CODE[norm]


@triton.jit
def zeros_tuple(like, N: tl.constexpr):
    """A tuple of N zero vectors shaped like `like`."""
    out = ()
    for _i in tl.static_range(N):
        out = out + (tl.zeros_like(like),)
    return out


@triton.jit
def load_tuple(ptr, off, mask, N: tl.constexpr, ACC: tl.constexpr):
    """(ptr[off + 0], ..., ptr[off + N - 1]) as ACC vectors: one thread reads its row's N values."""
    out = ()
    for j in tl.static_range(N):
        out = out + (tl.load(ptr + off + j, mask=mask, other=0.0).to(ACC),)
    return out


@triton.jit
def store_tuple(ptr, off, x, mask, N: tl.constexpr):
    for j in tl.static_range(N):
        tl.store(ptr + off + j, x[j], mask=mask)


@triton.jit
def normalize(g, W: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr):
    """Normalise one gate row g (a tuple of W vectors); returns (P, s, S) with P_j = s_j / S."""
    s = ()
    S = tl.zeros_like(g[0])
    if NORM == 1:
        mx = g[0]
        for j in tl.static_range(1, W):
            mx = tl.maximum(mx, g[j])
        for j in tl.static_range(W):
            e = tl.exp(g[j] - mx)
            s = s + (e,)
            S += e
    elif NORM == 2:
        for j in tl.static_range(W):
            e = tl.sigmoid(g[j])
            s = s + (e,)
            S += e
    elif NORM == 3:
        for j in tl.static_range(W):
            e = tl.maximum(g[j], 0.0)
            s = s + (e,)
            S += e
        S += EPS
    else:
        for j in tl.static_range(W):
            if NORM == 4:
                e = 2.0 * tl.sigmoid(2.0 * g[j]) - 1.0  # tanh
            else:
                e = g[j]  # lin_l1: the logits themselves
            s = s + (e,)
            S += tl.abs(e)
        S += EPS
    inv = 1.0 / S
    P = ()
    for j in tl.static_range(W):
        P = P + (s[j] * inv,)
    return P, s, S


@triton.jit
def normalize_bwd(dP, P, s, S, g, W: tl.constexpr, NORM: tl.constexpr):
    """Gradient of the logits row g (tuple of W) from dL/dP (P, s, S recomputed by `normalize`)."""
    dot = tl.zeros_like(S)
    for j in tl.static_range(W):
        dot += dP[j] * P[j]
    inv = 1.0 / S
    dg = ()
    for j in tl.static_range(W):
        if NORM == 1:
            d = (dP[j] - dot) * P[j]
        elif NORM == 2:
            d = (dP[j] - dot) * inv * s[j] * (1.0 - s[j])
        elif NORM == 3:
            d = tl.where(g[j] > 0.0, (dP[j] - dot) * inv, 0.0)
        else:  # tanh, lin_l1: dS/ds_j = sign(s_j); tanh also ds/dg = 1 - s^2
            sgn = tl.where(s[j] > 0.0, 1.0, tl.where(s[j] < 0.0, -1.0, 0.0))
            d = (dP[j] - sgn * dot) * inv
            if NORM == 4:
                d = d * (1.0 - s[j] * s[j])
        dg = dg + (d,)
    return dg


@triton.jit
def tile_rows(R, N, BLOCK_R: tl.constexpr, pid):
    """The rows of tile `pid`: (rows, mask, b, n), b and n as int64 for the offsets."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    return rows, rmask, (rows // N).to(tl.int64), (rows % N).to(tl.int64)


@triton.jit
def carry_index(b, c, n, C, N):
    """Index of row (b, n)'s chunk c in the (B, C, N) carry tensors, as int32: a value the kernel
    keeps across the time loop for the final store, and int64 made ptxas spill it (8 B of stack at
    m = 8 with resets on sm_90). Launch checks that B * C * N * M * M fits int32."""
    return ((b * C + c) * N + n).to(tl.int32)


def acc_triton_dtype(dt: torch.dtype):
    """Triton dtype of the state: fp32, fp64 only when the inputs are fp64."""
    return tl.float64 if dt == torch.float64 else tl.float32


def block_rows(R: int) -> int:
    """Rows per program (one per thread): 32 x warps, fewer for a small R."""
    return max(ROWS_PER_WARP, min(ROWS_PER_WARP * MAX_WARPS, triton.next_power_of_2(R)))


def num_warps_for(BLOCK_R: int) -> int:
    return max(1, BLOCK_R // ROWS_PER_WARP)


def p_columns(M: int, companion: bool = False) -> int:
    """Columns of the chunk product one program carries (see P_REGS)."""
    return max(1, min(M, (P_REGS // 2 if companion else P_REGS) // M))


def pick_chunk(T: int, R: int, BLOCK_R: int, device: torch.device, chunk: Optional[int]) -> Tuple[int, int]:
    """(chunk length L, number of chunks C). Explicit `chunk` wins; on CUDA, split T when the
    row tiles alone cannot fill the GPU (few B x N), keeping chunks >= 256 steps."""
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError(f"chunk: expected a positive chunk length, got {chunk}")
        L = min(int(chunk), T)
    elif device.type == "cuda":
        tiles = triton.cdiv(R, BLOCK_R)
        want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        C = max(1, min(triton.cdiv(want, tiles), T // 256))
        L = triton.cdiv(T, C)
    else:
        L = T
    return L, triton.cdiv(T, L)


def launch_options(BLOCK_R: int) -> dict:
    """num_warps for a launch (the interpreter takes none)."""
    return {} if INTERPRET else {"num_warps": num_warps_for(BLOCK_R)}


def scan_order_last_cut(reset: torch.Tensor, reverse: bool) -> torch.Tensor:
    """(B, T) int32: per scan step s, the last step <= s whose transition is cut, or -1."""
    B, T = reset.shape
    cut = reset.flip(1) if reverse else reset
    steps = torch.arange(T, device=reset.device, dtype=torch.int64).expand(B, T)
    return torch.where(cut, steps, torch.full_like(steps, -1)).cummax(1).values.to(torch.int32).contiguous()


@triton.jit
def _dot(a, x, M: tl.constexpr):
    """sum_j a[j] * x[j] over two M-tuples."""
    acc = a[0] * x[0]
    for j in tl.static_range(1, M):
        acc += a[j] * x[j]
    return acc


@triton.jit
def _fold_kernel(P, S, X0, OUT, C, N, R, M: tl.constexpr, BACKWARD: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sequential fold of chunk carries, one row per thread (C small steps, no launches):
    forward  OUT_0 = X0,     OUT_{c+1} = P_c OUT_c + S_c
    backward OUT_{C-1} = X0, OUT_{c-1} = P_c^T OUT_c + S_c."""
    rows, rmask, b, n = tile_rows(R, N, BLOCK_R, tl.program_id(0))
    x = load_tuple(X0, (b * N + n) * M, rmask, M, ACC)
    for i in range(0, C):
        if BACKWARD:
            c = C - 1 - i
        else:
            c = i
        cid = carry_index(b, c, n, C, N)
        store_tuple(OUT, cid * M, x, rmask, M)
        xn = load_tuple(S, cid * M, rmask, M, ACC)
        for r in tl.static_range(M):
            prow = load_tuple(P, cid * (M * M) + r * M, rmask, M, ACC)
            nxt = ()
            for j in tl.static_range(M):
                if BACKWARD:  # (P^T x)_j += P[r, j] x_r
                    nxt = nxt + (xn[j] + prow[j] * x[r],)
                elif j == r:
                    nxt = nxt + (xn[j] + _dot(prow, x, M),)
                else:
                    nxt = nxt + (xn[j],)
            xn = nxt
        x = xn


def _fold(P: Tensor, S: Tensor, x0: Tensor, backward: bool) -> Tensor:
    """P: (B, C, N, M, M), S: (B, C, N, M), x0: (B, N, M) -> carries entering each chunk (B, C, N, M)."""
    B, C, N, M = S.shape
    BLOCK_R = block_rows(B * N)
    out = torch.empty_like(S)
    _fold_kernel[(triton.cdiv(B * N, BLOCK_R),)](P, S, x0.contiguous(), out, C, N, B * N, M=M, BACKWARD=backward,
                                                 ACC=acc_triton_dtype(S.dtype), BLOCK_R=BLOCK_R,
                                                 **launch_options(BLOCK_R))
    return out


def _fold_forward(P: Tensor, s: Tensor, h0: Tensor) -> Tensor:
    """init_0 = h0, init_{c+1} = P_c init_c + s_c. P: (B, C, N, M, M), s: (B, C, N, M) -> (B, C, N, M)."""
    return _fold(P, s, h0, False)


def _fold_backward(P: Tensor, local: Tensor, lam_last: Tensor) -> Tensor:
    """Adjoint carries entering each chunk from its end: in_{C-1} = dh_last,
    in_c = P_{c+1}^T in_{c+1} + local_{c+1}. -> (B, C, N, M)."""
    return _fold(P, local, lam_last, True)


class Launch:
    """What a launch of the scan kernels chooses for R rows of size M over T steps."""

    def __init__(self, M: int, R: int, T: int, device: torch.device, chunk: Optional[int],
                 companion: bool = False):
        self.BLOCK_R = block_rows(R)
        self.L, self.C = pick_chunk(T, R, self.BLOCK_R, device, chunk)
        if R * self.C * M * M >= 2 ** 31:  # the kernels index carries (B, C, N, M, M) in int32
            raise ValueError(f"scan carries too large for int32 indexing: B * N = {R} rows x {self.C} chunks x "
                             f"m^2 = {M * M}; use fewer chunks (chunk = {self.L}) or a smaller batch")
        self.tiles = triton.cdiv(R, self.BLOCK_R)
        self.NCOL = p_columns(M, companion)
        self.opts = launch_options(self.BLOCK_R)

    def grid(self, M: int, want_p: bool):
        """Main and backward passes: (tiles, C); carry pass: the P column groups of a tile are
        neighbours in the grid, so they read the same transitions from L2."""
        groups = triton.cdiv(M, self.NCOL) if want_p else 1
        return (self.tiles * groups, self.C)


def scan_meta(M: int, W: int, NORM: int, reverse: bool, has_reset: bool, dt: torch.dtype, launch: Launch) -> dict:
    """The constexprs every block / companion kernel of one scan shares (the AOT compile uses it too)."""
    return dict(M=M, W=W, NORM=NORM, EPS=EPS, REVERSE=bool(reverse), HAS_RESET=bool(has_reset),
                ACC=acc_triton_dtype(dt), BLOCK_R=launch.BLOCK_R)


def _device(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else _nullctx()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TritonLocal(LocalScan):
    """The split-phase scan on the Triton kernels (DESIGN.md §3): the kernels' own two levels cut
    where the carry enters, so sequence parallelism pays no extra pass over its slice.

        part = BlockTritonLocal(op, G, U, reverse, reset, NORM, M)  # pass 1: chunks from zero, P_c, s_c
        part.P, part.s                                           # fold of the chunk maps (no pass)
        h, h_last = part.finish(h0)                              # fold from h0, pass 2 writes h
        grad = part.adjoint(g_h, part.saved())                   # adjoint chunks from zero (carry only)
        grad.a                                                   # fold of their carries (no pass)
        g_G, g_U, g_h0 = grad.finish(g_last)                     # fold from g_last, full adjoint pass

    Forward: pass 1 is the op's forward kernel with WANT_P over the C chunks of a Launch; the
    slice map is P = P_{C-1} ... P_0 (a log-depth product of the chunk maps) and
    s = P_{C-1} init_{C-1} + s_{C-1} with init the chunks' carries folded from zero. Only the fold
    from h0 and pass 2 wait for the carry; with one chunk (the interpreter, long rows on the GPU)
    pass 1 is the whole slice's carry pass and finish is pass 2 from h0.
    Backward: the carry-only adjoint pass from zero gives each chunk's local adjoint carry; folded
    from zero they give a = dL/dh0 for dL/dh_last = 0; finish folds them from g_last and runs the
    full adjoint pass (gradients of every input), whose last carry is dL/dh0.
    reset: per-step cuts (B, T) bool (zeroes A_t, transition_mask of document starts), as the
    kernels take them; the cut steps get no transition gradient, like the mask they stand for.

    Subclasses give the kernels (`fwd_kernel`, `launch_bwd`) and `companion`: BlockTritonLocal
    (kernels/block/triton.py), CompanionTritonLocal (kernels/companion/triton.py).

    Block: G = A (B, T, N, m, m) or gate logits (B, T, N, m, m + 1) with a norm, U = u / v
    (B, T, N, m), h (B, T, N, m). Companion: G = a (B, T, N, m) or logits (B, T, N, m + 1),
    U = x / v (B, T, N), y (B, T, N). State (B, N, m); P (B, N, m, m), s (B, N, m).
    """

    companion = False

    def __init__(self, op: ScanOp, G: Tensor, U: Tensor, reverse: bool, reset: Optional[Tensor], NORM: int,
                 M: int, chunk: Optional[int] = None):
        companion = self.companion
        self.op, self.reverse, self.M = op, bool(reverse), M
        B, T, N = U.shape[:3]
        W = M + 1 if NORM else M
        self.shape, R = (B, T, N), B * N
        self.dt, self.h0_dtype = acc_dtype(G, U), None
        self.lc = lc = Launch(M, R, T, G.device, chunk, companion=companion)
        self.G, self.U = G.detach().contiguous(), U.detach().contiguous()
        self.reset = reset
        self.rst = reset.to(torch.int8).contiguous() if reset is not None else None
        self.common = dict(scan_meta(M, W, NORM, reverse, reset is not None, self.dt, lc), **lc.opts)
        C = lc.C
        # pass 1: every chunk from zero, its map P_c and its end state s_c
        self.Pc = self.U.new_empty(B, C, N, M, M, dtype=self.dt)
        self.sc = self.U.new_empty(B, C, N, M, dtype=self.dt)
        zero = self.U.new_zeros(B, C, N, M, dtype=self.dt)
        self._fwd(zero, self.sc, self.sc, self.Pc, store=False, want_p=True)
        if C == 1:
            self.init0 = None
            self.P, self.s = self.Pc[:, 0], self.sc[:, 0]
        else:
            self.init0 = _fold_forward(self.Pc, self.sc, zero[:, 0]).contiguous()
            self.P = block_product_tree(self.Pc)
            self.s = torch.einsum("bnij,bnj->bni", self.Pc[:, C - 1], self.init0[:, C - 1]) + self.sc[:, C - 1]
        self._saved = None

    def _fwd(self, init, out, last, prod, store: bool, want_p: bool):
        lc = self.lc
        B, T, N = self.shape
        kernel = self.fwd_kernel()
        flag = {"STORE_Y" if self.companion else "STORE_H": store}
        rst = self.U if self.rst is None else self.rst  # no reset: any pointer, never read
        with _device(self.G):
            kernel[lc.grid(self.M, want_p)](self.G, self.U, init, out, last, prod, rst, T, N, B * N, lc.L,
                                            lc.C, WANT_P=want_p, NCOL=lc.NCOL if want_p else 1, **flag,
                                            **self.common)

    def finish(self, h0):
        B, T, N = self.shape
        M, C = self.M, self.lc.C
        self.h0_dtype = None if h0 is None else h0.dtype
        h0c = None if h0 is None else h0.to(self.dt).contiguous()
        if C == 1:
            init = (self.U.new_zeros(B, N, M, dtype=self.dt) if h0c is None else h0c)[:, None]
        else:
            init = self.init0 if h0c is None else _fold_forward(self.Pc, self.sc, h0c).contiguous()
        h = self.U.new_empty(*((B, T, N) if self.companion else (B, T, N, M)), dtype=self.dt)
        last = self.U.new_empty(B, C, N, M, dtype=self.dt)
        self._fwd(init, h, last, h, store=True, want_p=False)
        self._saved = (self.G, self.U, h0c, h, self.Pc if C > 1 else None)
        self.G = self.U = self.Pc = self.sc = self.init0 = None
        return h, last[:, C - 1]

    def fwd_kernel(self):
        """The forward / carry kernel (STORE_H or STORE_Y, WANT_P)."""
        raise NotImplementedError

    def launch_bwd(self, grid, G, U, h, h0, lr, dh, lamin, dG, dU, lamout, rst, flags) -> None:
        """Launch the backward kernel on `grid` (lr: the companion's last cuts, unused by the block)."""
        raise NotImplementedError

    def saved(self):
        out, self._saved = self._saved, None
        return out

    def adjoint(self, g_h, saved):
        return _TritonGrad(self, g_h, *saved)


class _TritonGrad(LocalGrad):
    def __init__(self, part: TritonLocal, g_h: Optional[Tensor], G: Tensor, U: Tensor, h0c: Optional[Tensor],
                 h: Tensor, Pc: Optional[Tensor]):
        super().__init__(part.op, part.P)
        self.part, self.G, self.U, self.h0c, self.h, self.Pc = part, G, U, h0c, h, Pc
        B, T, N = part.shape
        self.dh = torch.zeros_like(h) if g_h is None else g_h.to(part.dt).contiguous()
        self.rst = U if part.rst is None else part.rst  # no reset: any pointer, never read
        # the companion backward rebuilds its state window from y, cut at the last reset
        self.lr = (scan_order_last_cut(part.reset, part.reverse) if part.companion and part.reset is not None
                   else self.rst)
        zero = U.new_zeros(B, part.lc.C, N, part.M, dtype=part.dt)
        self.local = torch.empty_like(zero)
        self._bwd(zero, G, U, self.local, carry_only=True)  # G, U: unwritten, the dtypes of dG, dU
        if Pc is None:
            self.lamin0 = zero
            self.a = self.local[:, 0]
        else:
            self.lamin0 = _fold_backward(Pc, self.local, zero[:, 0]).contiguous()
            self.a = torch.einsum("bnji,bnj->bni", Pc[:, 0], self.lamin0[:, 0]) + self.local[:, 0]

    def _bwd(self, lamin, dG, dU, lamout, carry_only: bool):
        part, lc = self.part, self.part.lc
        h0 = self.h0c if self.h0c is not None else self.U
        flags = dict(HAS_H0=self.h0c is not None, CARRY_ONLY=carry_only, **part.common)
        grid = lc.grid(part.M, False)
        with _device(self.G):
            part.launch_bwd(grid, self.G, self.U, self.h, h0, self.lr, self.dh, lamin, dG, dU, lamout, self.rst, flags)

    def finish(self, g_last):
        part = self.part
        if g_last is None:
            lamin = self.lamin0
        elif self.Pc is None:
            lamin = g_last.to(part.dt)[:, None].contiguous()
        else:
            lamin = _fold_backward(self.Pc, self.local, g_last.to(part.dt).contiguous()).contiguous()
        dG, dU = torch.empty_like(self.G), torch.empty_like(self.U)
        lamout = torch.empty_like(self.local)
        self._bwd(lamin, dG, dU, lamout, carry_only=False)
        g_h0 = None if part.h0_dtype is None else lamout[:, 0].to(part.h0_dtype)
        self.G = self.U = self.h = self.h0c = self.Pc = self.dh = self.local = self.lamin0 = self.rst = self.lr = None
        return dG, dU, g_h0
