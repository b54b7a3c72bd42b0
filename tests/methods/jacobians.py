"""Seeded test Jacobians with rows of widely different norms and optional degeneracy, shared by
the tests of the solver-based aggregators (Aligned-MTL, CAGrad, UPGrad/DualProj)."""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64
KINDS = ["generic", "duplicate", "collinear", "opposite", "zero"]


def random_jacobian(seed: int, m: int, n: int, kind: str = "generic", dtype=F64) -> Tensor:
    """Rows of widely different norms; ``kind`` adds degeneracy."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=gen, dtype=F64)
    jac = jac * torch.exp(torch.randn(m, 1, generator=gen, dtype=F64))
    i, j = torch.randint(m, (2,), generator=gen).tolist()
    if kind == "duplicate":
        jac[i] = jac[j]
    elif kind == "collinear":
        jac[i] = 2.5 * jac[j]
    elif kind == "opposite":
        jac[i] = -0.5 * jac[j]
    elif kind == "zero":
        jac[i] = 0
    return jac.to(dtype)


CONE_KINDS = ["normal", "strong", "weak", "nonweak"]


def _orthonormal_complement(basis: Tensor, gen: torch.Generator) -> Tensor:
    """A random ``[m, m - k]`` matrix, orthonormal columns orthogonal to ``basis`` ``[m, k]``."""
    m, k = basis.shape
    draw = torch.randn(m, m - k, generator=gen, dtype=basis.dtype)
    return torch.linalg.qr(draw - basis @ (basis.T @ draw))[0]


def cone_jacobian(
    kind: str, m: int, n: int, rank: int, seed: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[m, n]`` of the given rank, drawn (in ``dtype``) with a known stationarity, as in
    torchjd's property tests:

    * ``"normal"``: ``U S Vᵀ`` with random orthonormal ``U``, ``V``;
    * ``"strong"``: orthogonal to a positive ``v`` (``vᵀJ = 0``: 0 is a positive combination);
    * ``"weak"``: orthogonal to a non-negative ``v`` with zeros, while a second non-negative
      ``v'`` (disjoint support) is a left singular vector: weakly but not strongly stationary;
    * ``"nonweak"``: a positive left singular vector: no non-negative ``v ≠ 0`` has ``vᵀJ = 0``.
    """
    gen = torch.Generator().manual_seed(seed)
    right = _orthonormal_complement(torch.zeros(n, 0, dtype=dtype), gen)[:, :rank]
    values = torch.randn(rank, generator=gen, dtype=dtype).abs()
    positive = torch.randn(m, generator=gen, dtype=dtype).abs()
    if kind == "normal":
        left = _orthonormal_complement(torch.zeros(m, 0, dtype=dtype), gen)[:, :rank]
    elif kind in ("strong", "nonweak"):
        first = (positive / positive.norm())[:, None]
        rest = _orthonormal_complement(first, gen)
        left = rest[:, :rank] if kind == "strong" else torch.hstack([first, rest])[:, :rank]
    elif kind == "weak":
        split = int(torch.randint(1, m, (), generator=gen))
        order = torch.randperm(m, generator=gen)
        pair = torch.zeros(m, 2, dtype=dtype)
        for column, part in enumerate((order[:split], order[split:])):
            pair[part, column] = positive[part] / positive[part].norm()
        left = torch.hstack([pair, _orthonormal_complement(pair, gen)])[:, 1 : rank + 1]
    else:
        raise ValueError(f"kind must be one of {CONE_KINDS}, got {kind!r}")
    return (left * values) @ right.T
