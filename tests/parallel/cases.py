"""Shared inputs and checks for the SP tests: random scan inputs, doc starts, closeness, groups."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from llm_lru.kernels import BLOCK, COMPANION, DIAG


# (name, op, m): every ScanOp layout at the block sizes the SP tests cover.
SCAN_CASES = [("block", BLOCK, 1), ("block", BLOCK, 2), ("block", BLOCK, 4), ("diag", DIAG, 1),
              ("companion", COMPANION, 2), ("companion", COMPANION, 4)]


def sp_groups(world: int, sizes=(2, 3, 4)):
    """For each size k: (group, group rank) of this process, or (None, None) when it sits out.

    Groups are ranks [0, k), plus [k, 2k) where the world holds two. Every rank creates every
    group (torch requires it), so one world of 4 processes tests sp = 2, 3 and 4.
    """
    out = {}
    for k in sizes:
        mine = (None, None)
        for start in range(0, world - k + 1, k):
            ranks = list(range(start, start + k))
            g = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = (g, ranks.index(dist.get_rank()))
        out[k] = mine
    return out


def scan_inputs(name: str, m: int, B: int, T: int, N: int, gen: torch.Generator):
    """(trans, u, h0) with stable transitions (row sums < 1) for op `name`, float32."""
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if name == "block":
        return 0.95 * torch.softmax(r(B, T, N, m, m), -1), r(B, T, N, m), r(B, N, m)
    if name == "diag":
        return 0.98 * torch.sigmoid(r(B, T, N)), r(B, T, N), r(B, N)
    if name == "companion":
        return 0.95 * torch.softmax(r(B, T, N, m), -1), r(B, T, N), r(B, N, m)
    raise ValueError(name)


def doc_starts(B: int, T: int, t_local: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) bool: row 0 starts documents at 0 and exactly on every rank boundary, the other
    rows at random places (row 2 also on the first boundary)."""
    reset = torch.rand(B, T, generator=gen) < 0.15
    reset[0] = False
    reset[0, ::t_local] = True
    if B > 2:
        reset[2, t_local] = True
    return reset


def close(got: Optional[torch.Tensor], want: Optional[torch.Tensor], what: str, errors: List[str],
          rtol: float = 1e-5) -> None:
    """Append a message to `errors` unless got ~= want (max error <= rtol * max(1, max|want|))."""
    if got is None or want is None:
        if (got is None) != (want is None):
            errors.append(f"{what}: one of got/want is None")
        return
    if got.shape != want.shape:
        errors.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    got, want = got.detach().double(), want.detach().double()
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    if err > rtol * scale:
        errors.append(f"{what}: max error {err:.3g} (scale {scale:.3g})")


def check_results(results) -> None:
    """results: per rank (errors, number of checks run)."""
    errors = [e for errs, _ in results for e in errs]
    assert not errors, f"{len(errors)} mismatches:\n" + "\n".join(errors[:20])
    assert sum(n for _, n in results) > 0
