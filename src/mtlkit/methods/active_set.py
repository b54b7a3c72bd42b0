"""An exact projection onto ``{x : L x ≥ b}`` for the cases DAQP gets wrong.

DAQP (a dual active-set method, :class:`~mtlkit.methods.solvers.PolyhedralProjector`) factors the
Gramian ``L_A L_Aᵀ`` of its active rows; when two active rows are nearly opposite (task gradients
near a Pareto front) that matrix is singular to its tolerance and DAQP reports a non-empty
polyhedron empty. :func:`active_set_projection` solves the same QP by a dual active-set
iteration whose steps are least-squares solves on the rows ``L_A`` themselves (condition number
the square root of the Gramian's), and returns only a point whose KKT conditions it has checked.

Reference: the dual active-set idea is Goldfarb & Idnani (Math. Programming 27, 1983); this is a
plain version of it without their updates of a factorisation (the problems have a few dozen rows).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import nnls

_EPS = float(np.finfo(np.float64).eps)


def active_set_projection(
    factor: np.ndarray,
    y: np.ndarray,
    lower: np.ndarray,
    tol: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(x, λ)`` solving ``min ½|x - y|² s.t. L x ≥ b`` with ``x = y + Lᵀλ``, ``λ ≥ 0``, or
    ``None`` when the polyhedron is empty or the iteration ends on a point that fails the KKT
    check.

    Goldfarb-Idnani's dual method: from the unconstrained minimiser ``x = y`` (no active row),
    take the most violated row ``p`` and move ``x`` along the part ``z`` of ``L_p`` orthogonal to
    the active rows, the active multipliers along ``-r`` (``L_Aᵀ r`` the rest of ``L_p``) and
    ``λ_p`` up, until row ``p`` holds (it becomes active) or an active multiplier reaches zero
    (that row leaves, and the step goes on). Each ``(r, z)`` is a least-squares solve on the rows
    ``L_A``. Every step increases the dual objective, so no active set repeats; at most
    ``4 m + 4`` steps. The final point is polished by one least-squares projection onto the
    active rows' equalities and its multipliers refitted by NNLS (:func:`_polish`,
    :func:`_refit`). The KKT check, relative to ``s = max(|x|, |y|, max_i |b_i|)`` and the
    rows' norms: ``L_i x ≥ b_i - tol s |L_i|``, ``λ ≥ 0``,
    ``|x - y - Lᵀλ| ≤ tol (s + Σ_i λ_i |L_i|)`` (the rounding of ``Lᵀλ``), and
    ``|L_i x - b_i| ≤ tol s |L_i|`` where ``λ_i > 0``.

    Args:
        factor: ``L`` ``[m, r]``.
        y: ``[r]``.
        lower: ``b`` ``[m]``.
        tol: relative tolerance of the KKT check.
    """
    m = factor.shape[0]
    norms = np.linalg.norm(factor, axis=1)
    size = max(float(np.linalg.norm(y)), float(np.abs(lower).max(initial=0.0))) or 1.0
    row_norms = np.where(norms > 0, norms, 1.0)
    x, weights, active = y.astype(np.float64).copy(), np.zeros(m), []
    steps = 0
    while steps < 4 * m + 4:
        violation = lower - factor @ x
        entering = int(violation.argmax())
        reach = max(size, float(np.linalg.norm(x)))  # the rounding of L x is relative to |x|
        slack = tol * reach * row_norms
        if violation[entering] <= slack[entering]:
            for point in (_polish(factor, y, lower, x, active), x):
                weights = _refit(factor, y, point, active)
                if _kkt_holds(factor, y, lower, point, weights, slack, tol * reach, reach):
                    return point, weights
            return None
        while steps < 4 * m + 4:  # until row `entering` holds
            steps += 1
            normal = factor[entering]
            if active:
                shares = np.linalg.lstsq(factor[active].T, normal, rcond=None)[0]
                direction = normal - factor[active].T @ shares
            else:
                shares, direction = np.zeros(0), normal
            curvature = float(direction @ normal)
            full = math.inf
            if float(np.linalg.norm(direction)) > 64 * _EPS * max(float(norms[entering]), 1e-300):
                full = float(lower[entering] - normal @ x) / curvature
            positive = [k for k, share in enumerate(shares) if share > 0]
            partial, leaving = math.inf, -1
            for k in positive:
                ratio = weights[active[k]] / shares[k]
                if ratio < partial:
                    partial, leaving = ratio, k
            step = min(full, partial)
            if not math.isfinite(step):
                return None  # row `entering` cannot be satisfied: the polyhedron is empty
            if math.isfinite(full):
                x = x + step * direction
            weights[active] -= step * shares
            weights[entering] += step
            if step == full:
                active.append(entering)
                break
            weights[active[leaving]] = 0.0
            active.pop(leaving)
    return None


def _refit(factor: np.ndarray, y: np.ndarray, x: np.ndarray, active: list[int]) -> np.ndarray:
    """The multipliers ``λ ≥ 0`` on the active rows that fit ``x - y = L_Aᵀλ`` best (NNLS):
    those of positively dependent rows are not unique, and the updates drift along their null
    space (by 1e5 of the data on a float32-derived Gramian of rank 19 with 20 rows)."""
    weights = np.zeros(factor.shape[0])
    if active:
        weights[active] = nnls(factor[active].T, x - y, maxiter=50 * len(active) + 50)[0]
    return weights


def _polish(
    factor: np.ndarray, y: np.ndarray, lower: np.ndarray, x: np.ndarray, active: list[int]
) -> np.ndarray:
    """The projection of ``y`` onto the equalities of the final active rows, one least-squares
    solve on them: the steps' updates of ``x`` carry their rounding (9e-5 of |x| on the case of
    :func:`_refit`, 5e-10 after this)."""
    if not active:
        return x
    rows = factor[active]
    return y + np.linalg.lstsq(rows, lower[active] - rows @ y, rcond=None)[0]


def _kkt_holds(
    factor: np.ndarray,
    y: np.ndarray,
    lower: np.ndarray,
    x: np.ndarray,
    multipliers: np.ndarray,
    slack: np.ndarray,
    stationarity: float,
    reach: float,
) -> bool:
    gap = factor @ x - lower
    feasible = bool((gap >= -slack).all()) and bool((multipliers >= 0).all())
    # L_Aᵀλ is computed to about |λ| |L| times the rounding: allowed on top
    spread = float(multipliers @ np.linalg.norm(factor, axis=1))
    residual = float(np.linalg.norm(x - y - factor.T @ multipliers))
    stationary = residual <= stationarity * (1.0 + spread / reach)
    complementary = bool((np.abs(gap[multipliers > 0]) <= slack[multipliers > 0]).all())
    return feasible and stationary and complementary
