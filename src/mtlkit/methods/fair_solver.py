"""The α-fair equation ``G w = w^(-1/α)`` of Nash-MTL (``α = 1``) and FairGrad: its positive
solution by a damped Newton method on the strictly convex function it is the stationarity
condition of (:func:`fair_weights`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtlkit.methods.solvers import hull_distance, stationary_distance


@dataclass
class FairSolve:
    """The result of :func:`fair_weights`: the weights, the largest residual
    ``|w_i^{1/α} (G w)_i - 1|`` over the tasks solved for, the number of Newton iterations (of
    both starts when the warm one was retried cold), whether it converged, whether the gradients
    are Pareto-stationary (no solution), and why the iteration stopped."""

    weights: np.ndarray
    residual: float
    iterations: int
    converged: bool
    stationary: bool = False
    reason: str = ""


def _fair_terms(alpha: float, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(h(w), h'(w), -h''(w))`` for ``h' = w^(-1/α)`` (``h = log`` for ``α = 1``)."""
    power = -1.0 / alpha
    first = w**power
    value = np.log(w) if alpha == 1.0 else w ** (1.0 + power) / (1.0 + power)
    return value, first, (1.0 / alpha) * w ** (power - 1.0)


def _fair_objective(gramian: np.ndarray, alpha: float, w: np.ndarray) -> float:
    return float(0.5 * w @ gramian @ w - _fair_terms(alpha, w)[0].sum())


def _ray_scale(gramian: np.ndarray, alpha: float, w: np.ndarray) -> np.ndarray:
    """``τ w`` with ``τ`` minimising the objective along the ray through ``w``."""
    quad = float(w @ gramian @ w)
    if quad <= 0:
        return w
    mass = float((w ** (1.0 - 1.0 / alpha)).sum())
    return w * (mass / quad) ** (alpha / (alpha + 1.0))


def fair_weights(
    gramian: np.ndarray,
    alpha: float = 1.0,
    start: np.ndarray | None = None,
    max_iter: int = 20,
    tol: float = 1e-10,
    eps: float | None = None,
) -> FairSolve:
    """The positive ``w`` with ``G w = w^(-1/α)`` (elementwise power), for ``α > 0``.

    This is the stationarity condition of ``f(w) = ½ wᵀGw - Σ_i h(w_i)`` with ``h' = w^(-1/α)``
    (``h = log`` for ``α = 1``: Nash-MTL; ``h(w) = w^(1-1/α) / (1-1/α)`` otherwise: FairGrad),
    which is strictly convex on ``w > 0`` (``-h`` is strictly convex), so the solution is unique
    when it exists. Damped Newton: the step solves ``(G + diag(-h''(w))) Δ = -∇f`` (positive
    definite), is cut to stay at most 99% of the way to the boundary ``w > 0``, and halved until
    it decreases ``f`` (Armijo) while the Newton decrement is not small. The start is ``start``
    if given (warm start), otherwise the solution for the diagonal of ``G`` (exact for orthogonal
    gradients); either is first rescaled to the best point on its ray.

    Stops, converged, when the residual ``max_i |w_i^{1/α} (G w)_i - 1|`` is at most ``tol`` or
    within ten times its rounding error (``m · eps · w_i^{1/α} (|G| w)_i`` per task, which
    dominates near Pareto-stationarity, where ``w`` is large); otherwise after ``max_iter``
    iterations or when ``f`` cannot decrease any more in float64, not converged (``reason``
    says which). A warm start that ends so is retried from the cold one and the better result
    kept: along the 2-D toy's trajectory (float64, 35,000 steps from (0, 0)) 180 warm-started
    solves stalled after 1-12 iterations with residuals up to 1e3, and the cold start solved
    every one of them at once (its ray-scaled guess is within rounding there).

    Tasks with ``G_ii = 0`` (zero gradients) cannot satisfy their equation; they get ``w_i = 0``
    and the others are solved for. When the remaining gradients are Pareto-stationary (``0`` is in
    their convex hull: some ``v ≥ 0, v ≠ 0`` has ``G v = 0``) ``f`` is unbounded below and there is
    no solution. Whenever the residual ends above ``tol`` this is checked with :func:`hull_distance`
    (≤ :func:`stationary_distance`): then ``stationary`` is set and the weights are zero.

    Args:
        gramian: ``[m, m]`` positive semi-definite, normalised (``max G_ii = 1``).
        alpha: the fairness parameter ``α > 0``.
        start: a positive ``[m]`` guess.
        max_iter: cap on Newton iterations.
        tol: tolerance on the residual.
        eps: the rounding unit of the Gramian's entries (float64 by default).
    """
    m = gramian.shape[0]
    weights = np.zeros(m)
    active = np.flatnonzero(gramian.diagonal() > 1e-14)
    if active.size == 0:
        return FairSolve(weights, 0.0, 0, False, stationary=True, reason="all gradients zero")
    sub = gramian[np.ix_(active, active)]
    cold = sub.diagonal() ** (-alpha / (alpha + 1.0))
    warm = None
    if start is not None and start.shape == (m,) and (start[active] > 0).all():
        warm = start[active].astype(np.float64)
    w, residual, converged, iterations, reason = _newton(
        sub, alpha, cold if warm is None else warm, max_iter, tol
    )
    if not converged and warm is not None:
        # a warm start far from the solution (the previous step's, near a Pareto front) can
        # stall the line search where the cold start solves at once: try it, keep the better
        again = _newton(sub, alpha, cold, max_iter, tol)
        iterations += again[3]
        if (not again[2], again[1]) < (not converged, residual):  # converged, then smaller
            w, residual, converged, _, reason = again
    if residual > tol and hull_distance(sub) <= stationary_distance(eps):
        return FairSolve(weights, math.inf, iterations, False, True, "Pareto-stationary")
    weights[active] = w
    return FairSolve(weights, residual, iterations, converged, reason=reason)


def _newton(
    sub: np.ndarray, alpha: float, guess: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, float, bool, int, str]:
    """Damped Newton on ``f`` from ``guess`` rescaled on its ray: ``(w, residual, converged,
    iterations, why it stopped)``; converged means the residual is at most ``tol`` or within
    ten times its rounding error."""
    m = sub.shape[0]
    w = _ray_scale(sub, alpha, guess)
    value = _fair_objective(sub, alpha, w)
    unit = np.finfo(np.float64).eps
    magnitude = np.abs(sub)

    def residual_of(w: np.ndarray) -> tuple[float, bool]:
        scaled = w ** (1.0 / alpha)
        residual = np.abs(scaled * (sub @ w) - 1.0)
        rounding = 10 * m * unit * scaled * (magnitude @ w)
        return float(residual.max()), bool((residual <= np.maximum(tol, rounding)).all())

    residual, within_rounding = residual_of(w)
    iterations, reason = 0, "converged"
    while residual > tol and not within_rounding:
        if iterations == max_iter:
            reason = f"iteration cap ({max_iter}) reached"
            break
        iterations += 1
        _, first, curvature = _fair_terms(alpha, w)
        gradient = sub @ w - first
        hessian = sub + np.diag(curvature)
        try:
            chol = np.linalg.cholesky(hessian)
            step = -np.linalg.solve(chol.T, np.linalg.solve(chol, gradient))
        except np.linalg.LinAlgError:
            step = -np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        decrement = float(-gradient @ step)
        if not decrement > 1e-24 * m:
            reason = "the Newton decrement is at float64 rounding"
            break
        shrinking = step < 0
        length = 1.0
        if shrinking.any():
            length = min(1.0, 0.99 * float((-w[shrinking] / step[shrinking]).min()))
        candidate = w + length * step
        candidate_value = _fair_objective(sub, alpha, candidate)
        if decrement > 1e-6:  # far from the solution: Armijo backtracking on f
            while candidate_value > value - 1e-4 * length * decrement and length > 1e-10:
                length *= 0.5
                candidate = w + length * step
                candidate_value = _fair_objective(sub, alpha, candidate)
            if length <= 1e-10:
                reason = "the line search stalled (f does not decrease in float64)"
                break
        if not (math.isfinite(candidate_value) and np.isfinite(candidate).all()):
            reason = "a non-finite Newton step"
            break
        w, value = candidate, candidate_value
        residual, within_rounding = residual_of(w)
    converged = residual <= tol or within_rounding
    return w, residual, converged, iterations, "converged" if converged else reason
