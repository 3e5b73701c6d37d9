"""The diagonal scan h_t = a_t * h_{t-1} + u_t (m = 1, GLRU): its op `DIAG`, the public function, and
the chunked PyTorch path (CPU, or any device); the Triton kernel is in triton.py, the reference in
reference.py.

    diag_scan(a, u, h0=None, reverse=False) -> (h, h_last)      a, u: (B, T, N), h0: (B, N)

Scalars need no cumulative products per step (memory traffic is the cost here): pass 1 keeps only
each chunk's end state from zero, the chunk transition is one `prod`, and after the carries pass 2
rescans every chunk from its carry (_DiagPass); DiagLocal is the split phase on this path.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..common.scan import (LocalGrad, ScanOp, TwoPassScan, _chunk, _keep_steps, _local_map, _mask, _orders, _Split,
                           acc_dtype, check_diag, default_chunk, resolve_backend, transition_mask)
from .reference import diag_scan_ref

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# The chunked PyTorch path: the same three phases as the block scan's, elementwise

def _chunk_or_view(x: Tensor, C: int, nc: int, fill, dtype: torch.dtype, shift: int = 0) -> Tensor:
    """_chunk, or a view of x when no padding, shift or cast is needed (elementwise steps read it
    strided as well as contiguous)."""
    if shift == 0 and x.shape[1] == nc * C and x.dtype == dtype:
        return x.unflatten(1, (nc, C)).movedim(2, 0)
    return _chunk(x, C, nc, fill, dtype, shift)


def _diag_fold(P: Tensor, s: Tensor, chunks) -> Tuple[Tensor, Tensor]:
    """Chunk maps P, s (B, nc, N) -> the slice's (P, s) (B, N), folded along `chunks`."""
    Pt, st = P[:, chunks[0]].clone(), s[:, chunks[0]].clone()
    for c in chunks[1:]:
        st = torch.addcmul(s[:, c], P[:, c], st)
        Pt.mul_(P[:, c])
    return Pt, st


class _DiagPass:
    """Chunked h_t = a_t h_{t-1} + u_t without autograd; step t uses a[:, t + shift] (1 outside).

    Scalars need no cumulative products per step (memory traffic is the cost here): pass 1 keeps
    only each chunk's end state from zero, the chunk transition is one `prod`, and after the carries
    pass 2 rescans every chunk from its carry, writing the states straight into the output.
    Pass 1 runs when the map or the carries need it (not for one chunk from zero).
    """

    def __init__(self, a: Tensor, u: Tensor, reverse: bool, C: int, dt: torch.dtype, shift: int = 0):
        B, T, N = u.shape
        self.T, self.C, self.nc = T, C, -(-T // C)
        self.ac = _chunk_or_view(a, C, self.nc, 1.0, dt, shift)  # (C, B, nc, N)
        self.uc = _chunk_or_view(u, C, self.nc, 0.0, dt)
        self.steps, self.chunks = _orders(C, self.nc, reverse)
        self.ends: Optional[Tuple[Tensor, Tensor]] = None

    def _pass1(self) -> Tuple[Tensor, Tensor]:
        if self.ends is None:
            ac, uc, steps = self.ac, self.uc, self.steps
            s, spare = uc[steps[0]].clone(), torch.empty_like(uc[0])
            for t in steps[1:]:
                torch.addcmul(uc[t], ac[t], s, out=spare)
                s, spare = spare, s
            self.ends = (ac.prod(0), s)  # (B, nc, N) each; the product is exact with zeros (no division)
        return self.ends

    def slice_map(self) -> Tuple[Tensor, Tensor]:
        return _diag_fold(*self._pass1(), self.chunks)

    def finish(self, h0: Optional[Tensor]) -> Tensor:
        ac, uc, steps, chunks, nc, C = self.ac, self.uc, self.steps, self.chunks, self.nc, self.C
        B, _, N = uc.shape[1:]
        h = None
        if nc > 1 or h0 is not None:
            P, s = self._pass1()
            hin = torch.zeros((nc, B, N), dtype=uc.dtype, device=uc.device)
            if h0 is not None:
                hin[chunks[0]] = h0
            for c0, c in zip(chunks[:-1], chunks[1:]):
                torch.addcmul(s[:, c0], P[:, c0], hin[c0], out=hin[c])
            h = hin.transpose(0, 1)
        out = torch.empty((B, nc, C, N), dtype=uc.dtype, device=uc.device)
        first = steps[0]
        if h is None:
            out[:, :, first] = uc[first]
        else:
            torch.addcmul(uc[first], ac[first], h, out=out[:, :, first])
        for prev, t in zip(steps[:-1], steps[1:]):
            torch.addcmul(uc[t], ac[t], out[:, :, prev], out=out[:, :, t])
        self.ac = self.uc = self.ends = None
        out = out.view(B, nc * C, N)
        return out if nc * C == self.T else out[:, :self.T].contiguous()


def _diag_core(a: Tensor, u: Tensor, h0: Optional[Tensor], reverse: bool, C: int, shift: int = 0) -> Tensor:
    return _DiagPass(a, u, reverse, C, acc_dtype(a, u, h0), shift).finish(h0)


def _diag_adjoint(a: Tensor, gh: Tensor, rev: bool, C: int) -> _DiagPass:
    """Pass 1 of the backward scan g_t = dL/dh_t + a_{t+1} g_{t+1} (see _block_adjoint)."""
    return _DiagPass(a, gh, not rev, C, acc_dtype(a, gh), shift=-1 if rev else 1)


def _diag_grads(a: Tensor, h0: Optional[Tensor], h: Tensor, g: Tensor, rev: bool, need_a: bool):
    """(da, dh0) from the states h and the adjoint g (in g's dtype; None where not asked)."""
    first = -1 if rev else 0
    da = dh0 = None
    if need_a:
        da = torch.empty(a.shape, dtype=g.dtype, device=g.device)
        inner, outer = (slice(0, -1), slice(1, None)) if rev else (slice(1, None), slice(0, -1))
        torch.mul(g[:, inner], h[:, outer], out=da[:, inner])
        da[:, first] = 0 if h0 is None else g[:, first] * h0
    if h0 is not None:
        dh0 = a[:, first] * g[:, first]
    return da, dh0


class _DiagScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, u, h0, reverse, C):
        h = _diag_core(a, u, h0, reverse, C)
        ctx.save_for_backward(a, h0, h)
        ctx.reverse, ctx.C, ctx.u_dtype = reverse, C, u.dtype
        return h, h[:, 0 if reverse else -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, gh, glast):
        a, h0, h = ctx.saved_tensors
        g = _diag_adjoint(a, gh, ctx.reverse, ctx.C).finish(glast)
        da, dh0 = _diag_grads(a, h0, h, g, ctx.reverse, ctx.needs_input_grad[0])
        da = None if da is None else da.to(a.dtype)
        dh0 = dh0.to(h0.dtype) if h0 is not None and ctx.needs_input_grad[2] else None
        du = g.to(ctx.u_dtype) if ctx.needs_input_grad[1] else None
        return da, du, dh0, None, None


def diag_scan_chunked(a: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
                      chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + u_t elementwise, chunked. a, u: (B, T, N), h0: (B, N) -> h (B, T, N), h_last (B, N)."""
    check_diag(a, u, h0)
    T = u.shape[1]
    return _DiagScanFn.apply(a, u, h0, reverse, min(chunk or default_chunk(T), T))


class DiagLocal(_Split):
    """The split diagonal scan (common.scan.LocalScan). a, u: (B, T, N); reset: document starts or None."""

    def __init__(self, a: Tensor, u: Tensor, reverse: bool = False, reset: Optional[Tensor] = None,
                 chunk: Optional[int] = None):
        check_diag(a, u, None)
        super().__init__(a, u, reverse, chunk)
        self.cut = transition_mask(reset, reverse)
        self.a = _mask(a, reset, reverse)
        self._pass = _DiagPass(self.a, u, reverse, self.C, self.dt)
        self.P, self.s = self._pass.slice_map()

    def finish(self, h0):
        h0 = self._h0(h0)
        h = self._pass.finish(h0)
        self._pass, self._saved, self.a = None, (self.a, h0, h), None
        return h, h[:, 0 if self.reverse else -1].clone()

    def adjoint(self, g_h, saved):
        return _DiagGrad(self, g_h, *saved)


class _DiagGrad(LocalGrad):
    def __init__(self, part: DiagLocal, g_h: Optional[Tensor], a: Tensor, h0: Optional[Tensor], h: Tensor):
        super().__init__(DIAG, part.P)
        self.part, self.a_in, self.h0, self.h = part, a, h0, h
        self._pass = _diag_adjoint(a, torch.zeros_like(h) if g_h is None else g_h, part.reverse, part.C)
        _, g_first = self._pass.slice_map()
        self.a = a[:, -1 if part.reverse else 0].to(g_first.dtype) * g_first

    def finish(self, g_last):
        g = self._pass.finish(g_last)
        da, dh0 = _diag_grads(self.a_in, self.h0, self.h, g, self.part.reverse, True)
        keep = _keep_steps(self.part.cut, da)
        out = self.part._grads(da if keep is None else da * keep, g, dh0)
        self._pass = self.a_in = self.h0 = self.h = None
        return out


# ----------------------------------------------------------------------------------------------
# The op

def diag_scan(a: Tensor, u: Tensor, h0: Optional[Tensor] = None, reverse: bool = False,
              backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + u_t elementwise. a, u: (B, T, N), h0: (B, N). backend: as block_scan."""
    backend = resolve_backend("diag", a, u, h0, backend=backend)
    if backend == "ref":
        return diag_scan_ref(a, u, h0, reverse)
    if backend == "triton":
        from .triton import diag_scan_triton
        return diag_scan_triton(a, u, h0, reverse)
    return diag_scan_chunked(a, u, h0, reverse)


class DiagScan(ScanOp):
    """trans = a: (B, T, N), u: (B, T, N), state (B, N)."""

    name = "diag"

    def __call__(self, a, u, h0=None, reverse=False, reset=None):
        return diag_scan(_mask(a, reset, reverse), u, h0, reverse, self.backend)

    def product(self, a, reverse=False, reset=None):
        return _mask(a, reset, reverse).to(acc_dtype(a)).prod(1)

    def local(self, a, u, reverse=False, reset=None):
        backend = resolve_backend(self.name, a, u, backend=self.backend)
        if backend == "torch":
            return DiagLocal(a, u, reverse, reset)
        if backend == "triton":
            from .triton import diag_local_triton
            return diag_local_triton(a, u, reverse, transition_mask(reset, reverse), op=self)
        return TwoPassScan(self, a, u, reverse, reset)

    def apply(self, P, h):
        return P * h

    def apply_t(self, P, g):
        return P * g

    def carry(self, a, u, reverse=False, reset=None):
        native = resolve_backend(self.name, a, u, backend=self.backend) != "ref"  # the reference does not split
        return _local_map(self, a, u, reverse, reset) if native else super().carry(a, u, reverse, reset)


DIAG = DiagScan()
