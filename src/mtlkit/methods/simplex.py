"""Euclidean projection onto the probability simplex, shared by the methods that keep task
weights on the simplex (MoDo, SDMGrad, MoCo, ...)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError


def project_simplex(values: Tensor, radius: float = 1.0) -> Tensor:
    """``argmin_{w ≥ 0, Σw = radius} |w - values|``, along the last dimension.

    The sort-based algorithm of Held, Wolfe & Crowder (1974) (also Duchi et al., ICML 2008): with
    ``u`` the values sorted in decreasing order and ``ρ`` the largest index with
    ``u_ρ > (Σ_{k≤ρ} u_k - radius) / ρ``, the projection is ``max(values - θ, 0)`` with
    ``θ = (Σ_{k≤ρ} u_k - radius) / ρ``. Exact up to rounding, ``O(m log m)``. The values are
    first shifted by their maximum (the projection does not change when a constant is added to
    all of them): then ``u_1 = 0`` and rank 1 always holds exactly, where for ``values = [8e21,
    2e11]`` the unshifted ``u_1 - (u_1 - 1)`` rounded to 0 and no rank held.

    Args:
        values: ``[..., m]`` with ``m ≥ 1``; leading dimensions are independent problems.
        radius: the sum of the result, positive.

    Raises:
        NonFiniteError: if ``values`` has NaN or infinite entries.
        ValueError: if ``radius`` is not positive or ``values`` is empty.
    """
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if values.dim() == 0 or values.shape[-1] == 0:
        raise ValueError(f"expected values [..., m] with m >= 1, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError("cannot project NaN or infinite values onto the simplex")
    m = values.shape[-1]
    values = values - values.max(dim=-1, keepdim=True).values
    ordered = values.sort(dim=-1, descending=True).values
    excess = ordered.cumsum(dim=-1) - radius
    ranks = torch.arange(1, m + 1, dtype=values.dtype, device=values.device)
    active = ordered - excess / ranks > 0  # a prefix; rank 1 holds: u_1 = 0
    count = active.sum(dim=-1, keepdim=True)
    threshold = excess.gather(-1, count - 1) / count.to(values.dtype)
    return (values - threshold).clamp_min(0)
