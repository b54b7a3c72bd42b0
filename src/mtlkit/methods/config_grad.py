"""ConFIG: the conflict-free direction with equal projections on the unit task gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import GramianWeighting, check_gramian
from mtlkit.methods.registry import METHODS

Length = Literal["projection", "min", "max", "harmonic", "arithmetic", "geometric"]
_LENGTHS = ("projection", "min", "max", "harmonic", "arithmetic", "geometric")


@METHODS.register("config")
class ConFIG(GramianWeighting):
    """Conflict-free inverse gradients (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free
    Training of Physics Informed Neural Networks", ICLR 2025; arXiv 2408.11104, 2024).

    With ``ĝ_i = g_i / |g_i|`` the unit task gradients and ``p`` the direction weights (ones by
    default)::

        v = [ĝ_1, ..., ĝ_m]^{+T} p        (pseudo-inverse: the min-norm v with ĝ_i · v = p_i)
        u = v / |v|
        d = (Σ_i g_i · u) u                (the "projection length")

    so that ``ĝ_i · d = p_i |d| / |v|``: with equal weights the direction makes the same angle
    with every task gradient, and ``g_i · d > 0`` for all ``i`` when the unit gradients are
    linearly independent (``m ≤ n``). When they are not, ``v`` is the least-squares solution
    (as with the reference implementation's ``torch.linalg.lstsq``) and the equal-projection
    property holds only in the least-squares sense.

    Everything is a function of the Gramian ``G`` (``v = Σ_i a_i ĝ_i`` with
    ``a = (D G D)^+ p``, ``D = diag(1/|g_i|)``), so this is a Gramian weighting; the weights are
    on the original gradients. The solve runs in float64, but the pseudo-inverse of the Gramian
    squares the condition number of the unit-gradient matrix: eigenvalues of ``D G D`` below
    ``10 m eps`` of the largest (``eps`` of the Gramian's dtype: its own rounding) are treated as
    zero, i.e. unit-gradient singular values below about ``√(10 m eps)`` of the largest, where
    the reference's ``lstsq`` on ``J`` cuts at ``eps``. Nearly dependent gradients can thus give
    a different (least-squares) direction than the reference. Zero gradients get weight 0 (the
    reference's ``nan_to_num``).

    ``length`` picks the length model of the reference implementation (``conflictfree``):
    ``"projection"`` (the paper's, ``Σ_i g_i · u``) or a "tracked" length
    ``t · Σ_i ĝ_i · u`` with ``t`` the min / max / harmonic / arithmetic / geometric mean of the
    gradient norms, or an ``int`` ``k`` for ``t = |g_k|``.

    Args:
        direction_weights: ``p``, one positive number per task (the ratio of the projections of
            the direction on the unit gradients); ``None`` for equal weights.
        length: the length model, see above.
    """

    def __init__(
        self, direction_weights: Sequence[float] | None = None, length: Length | int = "projection"
    ) -> None:
        super().__init__()
        if direction_weights is not None:
            direction_weights = [float(p) for p in direction_weights]
            if not direction_weights or not all(p > 0 for p in direction_weights):
                raise ValueError(
                    f"direction_weights must be positive numbers, got {direction_weights}"
                )
        if isinstance(length, bool) or not (
            length in _LENGTHS or (isinstance(length, int) and length >= 0)
        ):
            raise ValueError(
                f"length must be one of {_LENGTHS} or a task index >= 0, got {length!r}"
            )
        self.direction_weights = direction_weights
        self.length = length

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The weights ``w`` with ``d = w @ J`` (see the class docstring)."""
        check_gramian(gramian)
        if not bool(torch.isfinite(gramian).all()):
            raise NonFiniteError("ConFIG got a Gramian with NaN or infinite entries")
        m = gramian.shape[0]
        if self.direction_weights is not None and len(self.direction_weights) != m:
            raise ValueError(
                f"ConFIG has {len(self.direction_weights)} direction weights for {m} tasks"
            )
        if isinstance(self.length, int) and self.length >= m:
            raise ValueError(f"ConFIG tracks the norm of task {self.length}, but there are {m}")
        work = gramian.detach().to(torch.float64)
        norms = work.diagonal().clamp_min(0).sqrt()
        inverse_norms = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
        unit_gramian = work * inverse_norms[:, None] * inverse_norms[None, :]
        targets = (
            torch.ones(m, dtype=work.dtype, device=work.device)
            if self.direction_weights is None
            else torch.tensor(self.direction_weights, dtype=work.dtype, device=work.device)
        )
        cutoff = 10 * m * torch.finfo(gramian.dtype).eps  # the rounding of the input Gramian
        solution = torch.linalg.pinv(unit_gramian, rtol=cutoff, hermitian=True) @ targets
        coefficients = solution * inverse_norms  # v = coefficients @ J
        norm_v = (coefficients @ work @ coefficients).clamp_min(0).sqrt()
        if norm_v <= cutoff * targets.norm():  # v = 0 up to rounding (opposing gradients)
            weights = torch.zeros_like(coefficients)
        else:
            unit = coefficients / norm_v  # u = unit @ J
            projections = work @ unit  # g_i · u
            weights = self._length(projections, norms, inverse_norms) * unit
        weights = weights.to(gramian.dtype)
        return weights

    def _length(self, projections: Tensor, norms: Tensor, inverse_norms: Tensor) -> Tensor:
        """The length of the direction, given ``g_i · u`` and the gradient norms."""
        if self.length == "projection":
            return projections.sum()
        zero = bool((norms <= 0).any())  # as the reference: a zero norm makes these means 0
        if self.length == "min":
            tracked = norms.min()
        elif self.length == "max":
            tracked = norms.max()
        elif self.length == "harmonic":
            tracked = norms.new_zeros(()) if zero else norms.numel() / (1 / norms).sum()
        elif self.length == "arithmetic":
            tracked = norms.mean()
        elif self.length == "geometric":
            tracked = norms.new_zeros(()) if zero else norms.log().mean().exp()
        else:
            tracked = norms[int(self.length)]
        return tracked * (projections * inverse_norms).sum()
