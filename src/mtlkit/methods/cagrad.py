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


_BALL_TOL = 1e-6
"""Relative excess of ``|d - g0|`` over ``ρ`` (from the Gramian) that a verified solve may have:
the Gramian's rounding, not the solver's tolerance (``1e-12`` on ``D``), sets it. With nearly
opposite rows ``|g0| ≪ |g_i|`` and ``ρ²`` is a few hundred rounding units: on the toy's step
19979 ``λᵀGλ`` and the factor's ``ρ²`` disagree by ``8.8e-7`` at ``D(t*) = ρ²``."""


@dataclass
class CAGradSolve:
    """The result of :func:`cagrad_solve`: the weights ``1/m + λ``, the steps on the level, the
    certificate ``residual`` (the larger of ``|d - g0| / ρ - 1`` and the duality gap relative to
    ``max_i |g_i| (|g0| + ρ)``, both from the Gramian, see :func:`cagrad_certificate`), whether
    it was verified (``converged``: the ball to ``1e-6`` and the gap to the tolerance), and
    whether the gradients were Pareto-stationary to the Gramian's precision (then the gap is
    bounded by the hull distance, see :func:`cagrad_solve`), and whether it was verified to
    the fixed tolerances (``strict``), not only to the rounding of the ball's terms."""

    weights: np.ndarray
    iterations: int
    residual: float
    converged: bool
    stationary: bool = False
    strict: bool = False


def cagrad_certificate(
    gramian: np.ndarray, multipliers: np.ndarray, radius: float, hull: float | None = None
) -> tuple[float, float]:
    """``(ball, gap)`` of ``d = g0 + Jᵀλ`` from the (normalised) Gramian: ``ball`` the relative
    excess ``|Jᵀλ| / ρ - 1`` (``≤ 0`` inside), ``gap`` the duality gap ``u - min_i g_i · d``
    relative to ``|g0| + ρ``, with ``u`` the least of the paper's dual ``g_w · g0 + ρ |g_w|``
    at ``w = λ / Σλ`` and at the vertices ``e_i``: upper bounds of the maximin value (weak
    duality), and ``δ (|g0| + ρ)`` given the hull distance ``δ = |g_v|`` (``hull``; ``F(v) =
    g_v · g0 + ρ δ ≤ δ (|g0| + ρ)``), so ``d`` in the ball is optimal to ``gap``. Evaluated
    with the full Gramian, not its rank-truncated factor: near Pareto stationarity the dropped
    eigenvalue times ``|λ|²`` is
    what moved ``d`` out of the ball."""
    m = gramian.shape[0]
    mean = np.full(m, 1.0 / m)
    b = gramian @ mean
    norm = math.sqrt(max(float(mean @ b), 0.0))
    offset = math.sqrt(max(float(multipliers @ gramian @ multipliers), 0.0))
    ball = offset / radius - 1.0
    primal = float((b + gramian @ multipliers).min())
    upper = float((b + radius * np.sqrt(np.maximum(gramian.diagonal(), 0.0))).min())
    total = float(multipliers.sum())
    if total > 0:
        w = multipliers / total
        upper = min(upper, float(b @ w) + radius * math.sqrt(max(float(w @ gramian @ w), 0.0)))
    if hull is not None:
        upper = min(upper, hull * (norm + radius))
    return ball, (upper - primal) / (norm + radius)


def polish_level(gramian: np.ndarray, multipliers: np.ndarray, radius: float) -> np.ndarray | None:
    """The exact solution on the active set of ``multipliers`` (``A``: the tasks with
    ``λ_i > 1e-9 max λ``), or ``None`` where it is not one. On ``A`` the level-``t``
    projection has ``λ_A(t) = G_AA⁻¹ (t 1 - b_A)`` (``b = G 1/m``) and ``|Jᵀλ|² = λ_Aᵀ G_AA λ_A``
    is a quadratic in ``t``; its larger root of ``= ρ²`` is ``t*`` when ``λ_A(t*) ≥ 0``. The
    level search ends where DAQP's tolerances stop it; with ``|g0| ≪ |g_i|`` (nearly opposite
    gradients, e.g. at the front of the 2-D toy, ``ρ² ≈ 1e-13``) that left duality gaps of
    ``1e-7``-``1e-6`` relative, which the closed form takes to rounding (``1e-10``)."""
    m = gramian.shape[0]
    top = float(multipliers.max(initial=0.0))
    if top <= 0:
        return None
    active = np.flatnonzero(multipliers > 1e-9 * top)
    block = gramian[np.ix_(active, active)]
    b = gramian @ np.full(m, 1.0 / m)
    try:
        u = np.linalg.solve(block, np.ones(len(active)))
        v = np.linalg.solve(block, b[active])
    except np.linalg.LinAlgError:
        return None
    a2, a1, a0 = float(u.sum()), -2.0 * float(v.sum()), float(b[active] @ v) - radius**2
    discriminant = a1 * a1 - 4 * a2 * a0
    if not (a2 > 0 and discriminant >= 0 and math.isfinite(discriminant)):
        return None
    level = (-a1 + math.sqrt(discriminant)) / (2 * a2)
    on_active = level * u - v
    if bool((on_active < -1e-12 * np.abs(on_active).max()).any()):
        return None
    polished = np.zeros(m)
    polished[active] = np.maximum(on_active, 0.0)
    return polished


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

    Every result is checked by :func:`cagrad_certificate` on the full Gramian: ``|d - g0| ≤ ρ``
    to ``1e-6`` (relative, :data:`_BALL_TOL`) or to the rounding of ``|Jᵀλ|`` and ``ρ``
    computed from the Gramian (``m eps (|λ|_1² + c²) / ρ²``, the larger), and a duality gap
    below ``1e-9 + 64 m eps``; ``converged`` only then. A finished search that fails the fixed
    tolerances is polished on its active set (:func:`polish_level`), and the stationary search
    below is tried as well when the gradients are Pareto-stationary to the precision.
    Nearly Pareto-stationary gradients (hull distance ``δ`` near the rounding of the Gramian)
    defeat the search: ``t* ≤ δ (|y0| + ρ)`` is reached only far out in a thin wedge of the
    polyhedron, the multipliers grow like ``ρ / δ`` (1e7-1e8), and the eigenvalue ``≈ δ²`` that
    the factor drops (or resolves to rounding) times ``|λ|²`` moved ``d`` out of the ball by up
    to 88%. A result that fails the check on gradients Pareto-stationary to the precision
    (:func:`~mtlkit.methods.solvers.hull_distance` at most
    :func:`~mtlkit.methods.solvers.stationary_distance`), and a level-``t_0`` QP that DAQP finds
    infeasible on them, are solved as stationary: ``t* ≤ 0`` up to ``δ (|y0| + ρ)``, and the
    search starts at ``t = 0`` from the dual-cone projection of ``g0``
    (:func:`~mtlkit.methods.solvers.dual_cone_weights`; bounded multipliers), which is returned
    when it lies in the ball: of the maximisers at ``t = 0`` the one closest to ``g0`` (with a
    zero gradient, or exactly stationary ones, the maximin value is ``0`` and attained on a set).
    Its gap is bounded by ``δ``, so it counts as converged up to ``stationary_distance``. A
    result that still fails is scaled back into the ball (``λ ← λ ρ / |Jᵀλ|``) and reported
    unconverged.

    Nearly opposite gradients (normal near a Pareto front) make the polyhedron at ``t_0`` a thin
    wedge whose points are far out, which DAQP reports empty although it is not: the search used
    to raise there (the 2-D toy from ``(0, 0)``, step 19979); it now bisects below that level.

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
    top = float((levels + radius * np.linalg.norm(factor, axis=1)).min())
    unit = np.finfo(np.float64).eps if eps is None else eps
    resolution = 10 * unit * (float(np.linalg.norm(y0)) + radius)
    gap_tol = 1e-9 + 64 * m * unit
    target = radius**2

    def solve(level: float) -> tuple[Projection | None, float]:
        """``(x_t, D(t))``, or ``(None, ∞)`` where DAQP finds the polyhedron empty."""
        try:
            projection = projector(y0, np.full(m, level))
        except SolverError:
            return None, math.inf
        return projection, float(np.sum((projection.x - y0) ** 2))

    def search(level: float, projection: Projection | None) -> tuple[np.ndarray, int, bool]:
        """``(λ, steps, finished)`` from a level with ``x_level = projection`` (``None``: empty):
        ``λ(level)`` if it is in the ball, else the level search down to ``t*``."""
        distance = math.inf if projection is None else float(np.sum((projection.x - y0) ** 2))
        if projection is not None and distance <= target * (1 + tol):
            return projection.multipliers, 0, True
        # D(low) = 0 (y0 itself is in the polyhedron), D(level) > ρ²: t* is in between
        low, inside = float(levels.min()), Projection(y0, np.zeros(m))
        for iteration in range(1, max_iter + 1):
            if level - low <= resolution:  # t* known to the data's precision: stay in the ball
                return inside.multipliers, iteration - 1, True
            slope = 0.0 if projection is None else 2.0 * float(projection.multipliers.sum())
            trial = level - (distance - target) / slope if slope > 0 else low
            if not low < trial < level:  # Newton leaves the bracket (degenerate λ, no point)
                trial = 0.5 * (low + level)
            candidate, value = solve(trial)
            if candidate is not None and abs(value - target) <= tol * target:
                return candidate.multipliers, iteration, True
            if value < target:
                low, inside = trial, candidate
            else:
                level, projection, distance = trial, candidate, value
        return inside.multipliers, max_iter, False

    def verified(multipliers: np.ndarray, hull: float | None) -> tuple[float, float, float, bool]:
        """``(ball, gap, ball_tol, gap_ok)``: the certificate, the ball's tolerance (the fixed
        one or the rounding of its terms, the larger) and whether the gap is within its own."""
        ball, gap = cagrad_certificate(gramian, multipliers, radius, hull)
        allowed = max(gap_tol, stationary_distance(eps)) if hull is not None else gap_tol
        rounding = m * unit * (float(np.abs(multipliers).sum()) ** 2 + c**2) / radius**2
        return ball, gap, max(_BALL_TOL, rounding), gap <= allowed

    def result(
        multipliers: np.ndarray, steps: int, finished: bool, hull: float | None = None
    ) -> CAGradSolve:
        ball, gap, ball_tol, gap_ok = verified(multipliers, hull)
        if finished and not (ball <= _BALL_TOL and gap_ok):  # DAQP's tolerances, not the
            polished = polish_level(gramian, multipliers, radius)  # data's, limit tiny problems
            if polished is not None:
                check = verified(polished, hull)
                if max(check[:2]) < max(ball, gap):
                    multipliers, (ball, gap, ball_tol, gap_ok) = polished, check
        strict = finished and ball <= _BALL_TOL and gap_ok
        converged = bool(finished and ball <= ball_tol and gap_ok)
        if ball > ball_tol:  # back into the ball: d moves towards g0 (convex), stays feasible
            multipliers = multipliers / (1.0 + ball)
        return CAGradSolve(
            mean + multipliers, steps, max(ball, gap), converged, hull is not None, strict
        )

    def stationary_search(hull: float, steps: int) -> CAGradSolve:
        multipliers = dual_cone_weights(gramian, mean[None, :])[0] - mean
        start = Projection(y0 + factor.T @ multipliers, multipliers)
        found, more, finished = search(0.0, start)
        return result(found, steps + more, finished, hull)

    projection, _ = solve(top)
    if projection is None:
        hull = hull_distance(gramian)
        if hull <= stationary_distance(eps):  # Pareto-stationary: t* <= 0
            return stationary_search(hull, 0)
    multipliers, steps, finished = search(top, projection)
    first = result(multipliers, steps, finished)
    if first.strict:
        return first
    hull = hull_distance(gramian)
    if hull <= stationary_distance(eps):
        second = stationary_search(hull, steps)
        if second.converged or second.residual <= first.residual:
            return second
    return first


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
        """The weights and the level search's status (``"level search"``, with the certificate
        of :func:`cagrad_certificate` as its residual; one that is not verified is warned about
        once per run)."""
        work, _ = gramian_to_numpy(gramian, "CAGrad")
        solve = cagrad_solve(work, self.c, eps=float(torch.finfo(gramian.dtype).eps))
        message = ""
        if not solve.converged:
            # a stable reason (the status counts group by it); the numbers go to the warning
            message = "not verified, scaled into the ball" + (
                " (Pareto-stationary gradients)" if solve.stationary else ""
            )
            self.warn_once(
                "level search",
                f"CAGrad's level search: the solution after {solve.iterations} steps is not "
                f"verified: ball excess or duality gap {solve.residual:.2e} (relative); using "
                "it scaled into the ball",
            )
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        weights = to_weights(solve.weights / divisor, gramian)
        status = SolverStatus(
            "level search", solve.converged, solve.iterations, solve.residual, message
        )
        return Decision(weights=weights, status=status)
