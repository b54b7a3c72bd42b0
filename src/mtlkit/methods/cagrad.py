"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from mtlkit.methods.base import GramianWeighting
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solvers import (
    InfeasibleError,
    PolyhedralProjector,
    Projection,
    SolverError,
    dual_cone_weights,
    gramian_factor,
    gramian_to_numpy,
    hull_distance,
    stationary_distance,
    to_weights,
)

_RESCALES = (0, 1, 2)


def cagrad_weights(
    gramian: np.ndarray,
    c: float,
    tol: float = 1e-12,
    max_iter: int = 200,
    eps: float | None = None,
) -> np.ndarray:
    """The weights ``w`` (before rescaling) of the CAGrad direction ``d = Jᵀw``::

        d = argmax_{|d - g0| ≤ c |g0|}  min_i g_i · d,        g0 = (1/m) Σ_i g_i,

    solved exactly in the primal. With ``L`` (``[m, r]``, ``L Lᵀ = G``) the gradients in an
    orthonormal basis of their span, ``y0 = Lᵀ1/m`` and ``ρ = c |y0|``: for a level ``t`` let
    ``x_t`` be the projection of ``y0`` onto ``{x : L x ≥ t}`` (a QP, see
    :class:`~mtlkit.methods.solvers.PolyhedralProjector`) and ``D(t) = |x_t - y0|²``, convex and
    nondecreasing in ``t``, with ``D'(t) = 2 Σ_i λ_i(t)``. The optimal level is
    ``t* = max{t : D(t) ≤ ρ²}`` and ``d = x_{t*}``: found by Newton's method on ``D(t) = ρ²``
    from ``t_0 = min_i (g_i · g0 + ρ |g_i|)`` (an upper bound of ``t*``), which decreases
    monotonically to ``t*`` (``D`` is convex and piecewise quadratic), safeguarded by bisection
    in the bracket ``[min_i g_i · g0, t_0]`` (where the multipliers, hence the slope, are not
    unique: degenerate rows). A bracket narrower than the data's rounding (``10 eps``) ends the
    search at its lower end, whose point is in the ball. The weights are
    ``1/m + λ(t*)``; normalised, ``λ / Σλ`` is the optimal ``w`` of the paper's dual
    ``min_{w ∈ Δ} g_wᵀ g0 + ρ |g_w|`` and ``d = g0 + ρ g_w / |g_w|`` as there.

    When the maximin value is not attained on the sphere (a zero gradient, or Pareto-stationary
    gradients: then ``max_d min_i g_i · d ≤ 0``) the maximisers form a set; this returns the one
    closest to ``g0``. The level-``t_0`` QP is infeasible exactly when the gradients are
    Pareto-stationary (checked with :func:`~mtlkit.methods.solvers.hull_distance`; otherwise a
    :class:`~mtlkit.methods.solvers.SolverError`); the search then starts at ``t = 0``, the
    dual-cone projection of ``g0`` (:func:`~mtlkit.methods.solvers.dual_cone_weights`).

    Args:
        gramian: ``[m, m]``, normalised (``max G_ii = 1``).
        c: the radius factor ``c ≥ 0``.
        tol: relative tolerance on ``D(t*) = ρ²``.
        max_iter: cap on steps on ``t`` (a ``RuntimeWarning`` if reached).
        eps: the rounding unit of the Gramian's entries (float64 by default), for
            :func:`~mtlkit.methods.solvers.stationary_distance`.
    """
    m = gramian.shape[0]
    mean = np.full(m, 1.0 / m)
    factor = gramian_factor(gramian)
    y0 = factor.T @ mean
    radius = c * float(np.linalg.norm(y0))
    if radius == 0 or factor.shape[1] == 0:
        return mean
    projector = PolyhedralProjector(factor)
    levels = factor @ y0
    level = float((levels + radius * np.linalg.norm(factor, axis=1)).min())

    def solve(level: float) -> tuple[Projection, float]:
        projection = projector(y0, np.full(m, level))
        return projection, float(np.sum((projection.x - y0) ** 2))

    try:
        projection, distance = solve(level)
    except InfeasibleError as error:  # no x with L x > 0: Pareto-stationary, so t* <= 0
        if hull_distance(gramian) > stationary_distance(eps):
            raise SolverError(
                f"CAGrad: {error}, but the task gradients are not Pareto-stationary"
            ) from error
        level = 0.0
        # at t = 0 this is the dual-cone projection of g0, with its fallback for degenerate rows
        multipliers = dual_cone_weights(gramian, mean[None, :])[0] - mean
        projection = Projection(y0 + factor.T @ multipliers, multipliers)
        distance = float(np.sum((projection.x - y0) ** 2))
    target = radius**2
    if distance <= target * (1 + tol):
        return mean + projection.multipliers
    # D(low) = 0 (y0 itself is in the polyhedron), D(level) > ρ²: t* is in between
    low, inside = float(levels.min()), Projection(y0, np.zeros(m))
    resolution = 10 * (np.finfo(np.float64).eps if eps is None else eps)
    for _ in range(max_iter):
        if level - low <= resolution:  # t* known to the data's precision: stay in the ball
            return mean + inside.multipliers
        slope = 2.0 * float(projection.multipliers.sum())
        trial = level - (distance - target) / slope if slope > 0 else low
        if not low < trial < level:  # Newton leaves the bracket (degenerate λ): bisect
            trial = 0.5 * (low + level)
        if level - trial <= 1e-15 * max(1.0, abs(level)):  # t* found to rounding
            return mean + projection.multipliers
        try:
            candidate, value = solve(trial)
        except SolverError:  # DAQP fails on degenerate rows close to t = 0: bisect once
            trial = 0.5 * (low + level)
            candidate, value = solve(trial)
        if abs(value - target) <= tol * target:
            return mean + candidate.multipliers
        if value < target:
            low, inside = trial, candidate
        else:
            level, projection, distance = trial, candidate, value
    warnings.warn(
        f"CAGrad's level search stopped after max_iter={max_iter} steps with the level in "
        f"[{low:.3e}, {level:.3e}]; returning the solution at the lower level (inside the ball)",
        RuntimeWarning,
        stacklevel=3,
    )
    return mean + inside.multipliers


@METHODS.register("cagrad")
class CAGrad(GramianWeighting):
    """Conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021).

    The direction maximises the worst improvement rate among the tasks in a ball around the
    average gradient ``g0``::

        d = argmax_{|d - g0| ≤ c |g0|}  min_i g_i · d          (the paper's eq. 3)

    computed exactly by :func:`cagrad_weights` (the paper's code solves the dual
    ``min_{w ∈ Δ} g_wᵀg0 + c|g0| |g_w|`` with SLSQP to its default tolerance; this solves the
    primal with exact QPs: the result is the same point, ``d = g0 + c|g0| g_w / |g_w|``), then
    rescaled as in the paper's code: ``d`` (``rescale=0``), ``d / (1 + c²)`` (``1``, its default)
    or ``d / (1 + c)`` (``2``). ``c = 0`` gives the mean gradient; as ``c`` grows ``d`` tends to
    the MGDA direction. The weights are ``(1/m + λ) / s`` with ``s`` the rescaling factor: the
    mean's ``1/m`` plus the (scaled) dual weights.

    They do not change when all gradients are scaled by one factor, and permuting the tasks
    permutes them. A zero gradient, or Pareto-stationary gradients, make the maximin value
    ``≤ 0`` and the maximiser not unique: the one closest to ``g0`` is returned (the paper's code
    returns ``≈ g0`` there, which may conflict with a task).

    Args:
        c: the radius factor ``c ≥ 0`` (paper: 0.4 on NYUv2 and CityScapes, 0.5 on the toy).
        rescale: ``0``, ``1`` or ``2`` as above.
    """

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        super().__init__()
        if not (c >= 0 and math.isfinite(c)):
            raise ValueError(f"c must be a finite number >= 0, got {c}")
        if rescale not in _RESCALES:
            raise ValueError(f"rescale must be one of {_RESCALES}, got {rescale!r}")
        self.c = float(c)
        self.rescale = int(rescale)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        work, _ = gramian_to_numpy(gramian, "CAGrad")
        values = cagrad_weights(work, self.c, eps=float(torch.finfo(gramian.dtype).eps))
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        weights = to_weights(values / divisor, gramian)
        return weights
