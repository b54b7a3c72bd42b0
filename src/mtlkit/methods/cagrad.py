"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mtlkit.methods.base import Decision
from mtlkit.methods.float64_gramian import Float64GramianWeighting
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solver_report import ReportsSolver, SolverStatus
from mtlkit.methods.solvers import (
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


@dataclass
class CAGradSolve:
    """The result of :func:`cagrad_solve`: the weights ``1/m + λ``, the steps on the level, the
    width of the final level bracket relative to the largest level it can take
    (``|g_i| (|g0| + ρ)``), and whether ``D(t) = ρ²`` was met to the tolerance or ``t*`` was
    bracketed to the data's rounding (converged) rather than stopped by ``max_iter``."""

    weights: np.ndarray
    iterations: int
    residual: float
    converged: bool


def cagrad_solve(
    gramian: np.ndarray,
    c: float,
    tol: float = 1e-12,
    max_iter: int = 200,
    eps: float | None = None,
) -> CAGradSolve:
    """The weights ``w`` (before rescaling) of the CAGrad direction ``d = Jᵀw``::

        d = argmax_{|d - g0| ≤ c |g0|}  min_i g_i · d,        g0 = (1/m) Σ_i g_i,

    solved exactly in the primal. With ``L`` (``[m, r]``, ``L Lᵀ = G``) the gradients in an
    orthonormal basis of their span, ``y0 = Lᵀ1/m`` and ``ρ = c |y0|``: for a level ``t`` let
    ``x_t`` be the projection of ``y0`` onto ``{x : L x ≥ t}`` (a QP, see
    :class:`~mtlkit.methods.solvers.PolyhedralProjector`) and ``D(t) = |x_t - y0|²``, convex and
    nondecreasing in ``t`` (``+∞`` where the polyhedron is empty), with ``D'(t) = 2 Σ_i λ_i(t)``.
    The optimal level is ``t* = max{t : D(t) ≤ ρ²}`` and ``d = x_{t*}``: found by Newton's method
    on ``D(t) = ρ²`` from ``t_0 = min_i (g_i · g0 + ρ |g_i|)`` (an upper bound of ``t*``), which
    decreases monotonically to ``t*`` (``D`` is convex and piecewise quadratic), safeguarded by
    bisection in the bracket ``[min_i g_i · g0, t_0]``: where the multipliers, hence the slope,
    are not unique (degenerate rows), and where DAQP finds no point (an empty polyhedron: the
    level is above ``t*``). A bracket narrower than the rounding of the levels
    (``10 eps (|y0| + ρ)``: every ``x`` in the ball has ``|x| ≤ |y0| + ρ`` and the rows of ``L``
    norms ``≤ 1``) ends the search at its lower end, whose point is in the ball. The weights are
    ``1/m + λ(t*)``; normalised, ``λ / Σλ`` is the optimal ``w`` of the paper's dual
    ``min_{w ∈ Δ} g_wᵀ g0 + ρ |g_w|`` and ``d = g0 + ρ g_w / |g_w|`` as there.

    Nearly opposite gradients (normal near a Pareto front) make the polyhedron at ``t_0`` a thin
    wedge whose points are far out, which DAQP reports empty although it is not: the search used
    to raise there (the 2-D toy from ``(0, 0)``, step 19979); it now bisects below that level.

    When the maximin value is not attained on the sphere (a zero gradient, or Pareto-stationary
    gradients: then ``max_d min_i g_i · d ≤ 0``) the maximisers form a set; this returns the one
    closest to ``g0``: when the level-``t_0`` QP is infeasible and the gradients are
    Pareto-stationary (:func:`~mtlkit.methods.solvers.hull_distance` at most
    :func:`~mtlkit.methods.solvers.stationary_distance`), the search starts at ``t = 0``, the
    dual-cone projection of ``g0`` (:func:`~mtlkit.methods.solvers.dual_cone_weights`).

    Args:
        gramian: ``[m, m]``, normalised (``max G_ii = 1``).
        c: the radius factor ``c ≥ 0``.
        tol: relative tolerance on ``D(t*) = ρ²``.
        max_iter: cap on steps on ``t``.
        eps: the rounding unit of the Gramian's entries (float64 by default).
    """
    m = gramian.shape[0]
    mean = np.full(m, 1.0 / m)
    factor = gramian_factor(gramian)
    y0 = factor.T @ mean
    radius = c * float(np.linalg.norm(y0))
    if radius == 0 or factor.shape[1] == 0:
        return CAGradSolve(mean, 0, 0.0, True)
    projector = PolyhedralProjector(factor)
    levels = factor @ y0
    level = float((levels + radius * np.linalg.norm(factor, axis=1)).min())
    unit = np.finfo(np.float64).eps if eps is None else eps
    resolution = 10 * unit * (float(np.linalg.norm(y0)) + radius)

    def solve(level: float) -> tuple[Projection | None, float]:
        """``(x_t, D(t))``, or ``(None, ∞)`` where DAQP finds the polyhedron empty."""
        try:
            projection = projector(y0, np.full(m, level))
        except SolverError:
            return None, math.inf
        return projection, float(np.sum((projection.x - y0) ** 2))

    projection, distance = solve(level)
    if projection is None and hull_distance(gramian) <= stationary_distance(eps):
        level = 0.0  # Pareto-stationary: t* <= 0; at t = 0 this is the dual-cone projection
        multipliers = dual_cone_weights(gramian, mean[None, :])[0] - mean
        projection = Projection(y0 + factor.T @ multipliers, multipliers)
        distance = float(np.sum((projection.x - y0) ** 2))
    target = radius**2
    if projection is not None and distance <= target * (1 + tol):
        return CAGradSolve(mean + projection.multipliers, 0, 0.0, True)
    # D(low) = 0 (y0 itself is in the polyhedron), D(level) > ρ²: t* is in between
    low, inside = float(levels.min()), Projection(y0, np.zeros(m))
    scale = 1.0 + radius / max(float(np.linalg.norm(y0)), np.finfo(np.float64).tiny)
    for iteration in range(1, max_iter + 1):
        if level - low <= resolution:  # t* known to the data's precision: stay in the ball
            return CAGradSolve(mean + inside.multipliers, iteration - 1, 0.0, True)
        slope = 0.0 if projection is None else 2.0 * float(projection.multipliers.sum())
        trial = level - (distance - target) / slope if slope > 0 else low
        if not low < trial < level:  # Newton leaves the bracket (degenerate λ, no point): bisect
            trial = 0.5 * (low + level)
        candidate, value = solve(trial)
        if candidate is not None and abs(value - target) <= tol * target:
            return CAGradSolve(mean + candidate.multipliers, iteration, 0.0, True)
        if value < target:
            low, inside = trial, candidate
        else:
            level, projection, distance = trial, candidate, value
    width = (level - low) / (float(np.linalg.norm(y0)) * scale)
    return CAGradSolve(mean + inside.multipliers, max_iter, width, False)


@METHODS.register("cagrad")
class CAGrad(ReportsSolver, Float64GramianWeighting):
    """Conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021).

    The direction maximises the worst improvement rate among the tasks in a ball around the
    average gradient ``g0``::

        d = argmax_{|d - g0| ≤ c |g0|}  min_i g_i · d          (the paper's eq. 3)

    computed exactly by :func:`cagrad_solve` from the float64 Gramian of ``J`` (the paper's code
    solves the dual ``min_{w ∈ Δ} g_wᵀg0 + c|g0| |g_w|`` with SLSQP to its default tolerance;
    this solves the primal with exact QPs: the result is the same point,
    ``d = g0 + c|g0| g_w / |g_w|``), then
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
        return self.decide(gramian, losses).weights

    def decide(self, gramian: Tensor, losses: Tensor | None = None) -> Decision:
        """The weights and the level search's status (``"level search"``; one that stops at
        ``max_iter`` is warned about once per run)."""
        work, _ = gramian_to_numpy(gramian, "CAGrad")
        solve = cagrad_solve(work, self.c, eps=float(torch.finfo(gramian.dtype).eps))
        message = ""
        if not solve.converged:
            message = f"reached its cap of {solve.iterations} steps"
            self.warn_once(
                "level search",
                f"CAGrad's level search {message} with the level bracket {solve.residual:.2e} "
                "wide (relative); using the solution at its lower end (inside the ball)",
            )
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        weights = to_weights(solve.weights / divisor, gramian)
        status = SolverStatus(
            "level search", solve.converged, solve.iterations, solve.residual, message
        )
        return Decision(weights=weights, status=status)
