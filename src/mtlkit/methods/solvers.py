"""Numerical solvers shared by the Gramian-based aggregators (UPGrad, DualProj, CAGrad, Nash-MTL,
FairGrad) and FORUM.

Everything here works on the ``[m, m]`` Gramian ``G = J Jᵀ`` in float64 NumPy on the CPU (the
problems are tiny: one transfer of ``m²`` numbers is cheaper than the solver's work on any device)
and is scale-free: ``G`` is divided by its largest diagonal entry first.

* :func:`gramian_factor` gives ``L`` (``[m, r]``, ``r = rank G``) with ``L Lᵀ = G``: the rows of
  ``L`` are the task gradients written in an orthonormal basis of their span, so inner products
  and norms are those of the gradients. A problem on the gradients becomes a problem in ``r``
  variables whatever ``n`` is, and a singular Gramian (``m > n``, collinear or zero rows) simply
  gives ``r < m``.
* :class:`PolyhedralProjector` solves ``min ½|x - y|² s.t. L x ≥ b`` (a strictly convex QP with an
  identity Hessian, so it is well posed for any ``L``) with the dual active-set solver DAQP
  (Arnström, Bemporad & Axehill, IEEE TAC 2022; the ``daqp`` package, MIT, no dependencies). Its
  multipliers ``λ ≥ 0`` give ``x = y + Lᵀλ``: task weights. DAQP was the fastest exact solver on
  these problems among quadprog, DAQP, ProxSuite, Clarabel and OSQP (see the module's
  ``SOLVER_TIMINGS``); Clarabel (interior point) and OSQP (ADMM) are 5-20x slower and stop at a
  tolerance, quadprog needs a positive-definite ``G`` in the textbook form and is GPL.
* :func:`dual_cone_weights`: for each ``u``, ``argmin_{v ≥ u} vᵀGv``, whose direction ``Jᵀv`` is the
  projection of ``Jᵀu`` onto the dual cone ``{d : J d ≥ 0}`` (Quinton & Rey 2024, Prop. 1).
* :func:`hull_distance` and :func:`stationary_distance`: whether gradients are
  Pareto-stationary to their precision (the α-fair equation of Nash-MTL and FairGrad is solved in
  :mod:`mtlkit.methods.fair_solver`).
* :func:`interior_point_qp`: ``min ½ xᵀPx + pᵀx s.t. Ax = b, Gx ≥ h`` with a positive
  semi-definite (often singular) ``P``, FORUM's problem, by Mehrotra's predictor-corrector
  interior-point method to a relative tolerance of 1e-11. DAQP needs a positive-definite Hessian
  and handles a singular one by proximal iterations: on 300 random FORUM problems (m = 2-5 tasks,
  n = 1-7) it stopped up to 8e-8 from this solver's optimum (2.5e-10 in the objective), so it
  does not replace it.

A solver that fails raises :class:`SolverError` (DAQP's exit flag and its meaning in the message);
an iterative solve that stops before its tolerance warns (``RuntimeWarning`` with the residual).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.errors import MtlkitError, NonFiniteError
from mtlkit.methods.active_set import active_set_projection
from mtlkit.methods.base import check_gramian

SOLVER_TIMINGS = """\
Median time of one QP min_{v >= u} vᵀGv (u = e_i / m) on 20 random Gramians, float64, 1 thread
of a shared 2-core machine, measured to choose the solver (Gramian form, one call each; the error
is the largest |Jᵀ(v - v*)| against scipy's NNLS, relative to max |g_i|):

            m=2 (n=50)   m=10 (n=200)   m=40 (n=400)   m=40 (n=20, rank 20)
  daqp       22 us 1e-16  30 us 2e-16   76 us 7e-16    103 us 2e-2 (eps_prox auto)
  quadprog   34 us 1e-16  43 us 2e-16  172 us 7e-16    fails: G not positive definite
  proxsuite  93 us 2e-9  139 us 6e-9   369 us 3e-12    783 us 4e-9
  clarabel  328 us 2e-7  430 us 6e-5  1471 us 5e-5    1370 us 4e-5 (default tolerances)
  osqp      786 us 2e-16 854 us 2e-16 1544 us 9e-15   1991 us 5e-9 (eps 1e-10, polished)
  scipy nnls 72 us       99 us         345 us          391 us  (the reference; incl. an eigh)

On the factored form used here (identity Hessian, see PolyhedralProjector) DAQP and quadprog are
exact on the singular case too (1e-8 from the NNLS reference, i.e. its own tolerance): about
55-65 us (m=2, 10), 120 us (DAQP) / 235 us (quadprog) at m=40; a reused daqp.Model is another
2-3x faster for UPGrad's m solves with one Gramian.
On degenerate float32 Gramians (rows positively dependent up to rounding) DAQP and quadprog both
failed on ~0.7% of the solves, scipy's NNLS on none: it is the fallback (dual_cone_weights).
"""


class SolverError(MtlkitError, RuntimeError):
    """A numerical solver failed (the message says which and why)."""


class InfeasibleError(SolverError):
    """The constraints of a QP have no solution."""


_DAQP_EXIT = {
    1: "optimal",
    2: "soft optimal",
    -1: "primal infeasible",
    -2: "cycling detected",
    -3: "unbounded",
    -4: "iteration limit reached",
    -5: "nonconvex problem",
    -6: "initial working set overdetermined",
}


def _daqp() -> Any:
    try:
        import daqp
    except ImportError as error:  # pragma: no cover - daqp is a core dependency
        raise ImportError(
            "the QP-based aggregators (UPGrad, DualProj, CAGrad) need the 'daqp' package: "
            "pip install daqp (it is a dependency of mtlkit; reinstall mtlkit)"
        ) from error
    return daqp


def gramian_to_numpy(gramian: Tensor, method: str) -> tuple[np.ndarray, float]:
    """``(G / s, s)`` in float64 NumPy, symmetrised, with ``s = max_i G_ii`` (``1`` when all the
    diagonal is zero).

    Raises:
        ValueError: unless ``gramian`` is ``[m, m]``.
        NonFiniteError: if it has NaN or infinite entries.
    """
    check_gramian(gramian)
    if not bool(torch.isfinite(gramian).all()):
        raise NonFiniteError(f"{method} got a Gramian with NaN or infinite entries")
    work = gramian.detach().to("cpu", torch.float64).numpy()
    work = 0.5 * (work + work.T)
    scale = float(work.diagonal().max())
    if scale <= 0:
        return np.zeros_like(work), 1.0
    return work / scale, scale


def to_weights(values: np.ndarray, like: Tensor) -> Tensor:
    """``values`` as a tensor of ``like``'s dtype and device."""
    return torch.as_tensor(values, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def eigen_range(gramian: np.ndarray, eps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(λ_r, V_r)``: the eigenvalues of ``G`` above ``m · eps · λ_max`` (descending) and their
    eigenvectors (columns); the others (zero up to rounding, possibly negative) are dropped, so
    ``r`` is the numerical rank (``0`` for a zero Gramian).

    Args:
        gramian: ``[m, m]`` symmetric.
        eps: the relative rounding unit of the Gramian's entries; float64's by default.
    """
    eps = np.finfo(np.float64).eps if eps is None else eps
    eigenvalues, vectors = np.linalg.eigh(gramian)
    top = float(eigenvalues[-1]) if eigenvalues.size else 0.0
    keep = eigenvalues > max(top, 0.0) * gramian.shape[0] * eps
    if top <= 0:
        keep[:] = False
    order = np.flatnonzero(keep)[::-1]
    return eigenvalues[order], vectors[:, order]


def gramian_factor(gramian: np.ndarray, eps: float | None = None) -> np.ndarray:
    """``L`` (``[m, r]``) with ``L Lᵀ = G`` up to the eigenvalues of ``G`` at rounding level:
    ``L = V_r Λ_r^{1/2}`` from :func:`eigen_range`.

    The rows of tasks with ``G_ii ≤ m · eps · λ_max`` (the same cutoff: gradients that are zero
    at the Gramian's precision, exactly zero rows included) are set to exactly ``0``. The
    eigenvectors only have them at rounding level (about ``eps / √λ_k`` per column, up to
    ``1e-8``), and such a row would be a constraint ``L_i x ≥ b_i`` on rounding noise: scipy's
    NNLS picks its tiny column up with a weight of order ``1e15`` and ends far from the optimum,
    and a level ``b_i > 0`` (CAGrad) would look feasible with an unbounded ``x``.
    """
    eigenvalues, vectors = eigen_range(gramian, eps)
    factor = vectors * np.sqrt(eigenvalues)
    if eigenvalues.size:
        eps = np.finfo(np.float64).eps if eps is None else eps
        cutoff = float(eigenvalues[0]) * gramian.shape[0] * eps
        factor[gramian.diagonal() <= cutoff] = 0.0
    return factor


@dataclass
class Projection:
    """The solution of ``min ½|x - y|² s.t. L x ≥ b``: ``x = y + Lᵀλ`` with ``λ ≥ 0``,
    ``λ_i (L x - b)_i = 0``."""

    x: np.ndarray
    multipliers: np.ndarray


class PolyhedralProjector:
    """Projections onto polyhedra ``{x : L x ≥ b}`` for one ``L`` (``[m, r]``), with DAQP.

    The QP ``min ½|x - y|² s.t. L x ≥ b`` has a unique solution whenever it is feasible (for
    ``b ≤ 0`` it always is); its KKT conditions are ``x = y + Lᵀλ``, ``λ ≥ 0``, ``L x ≥ b``,
    ``λ_i (Lx - b)_i = 0``. DAQP's workspace is set up once and reused for each new ``(y, b)``.

    DAQP gets every non-zero row scaled to unit norm (``L_i x ≥ b_i`` as
    ``(L_i/|L_i|) x ≥ b_i/|L_i|``, the same set) and the multipliers are scaled back: its
    feasibility tolerance is absolute, so a task whose gradient is 1e-6 of the largest would
    otherwise be allowed a violation of its own size (seen with CAGrad on the toy). For the same
    reason ``y`` and ``b`` are divided by ``max(|y|, max_i |b_i|)`` and the solution multiplied
    back (the problem is homogeneous in ``(x, y, b)``). Where DAQP fails (nearly opposite active
    rows), :func:`~mtlkit.methods.active_set.active_set_projection` is tried, and its point
    returned if it passes the KKT check (counted in ``fallbacks``);
    otherwise DAQP's error is raised.

    Args:
        factor: ``L``, rows scaled to norms ≤ 1 (as from :func:`gramian_factor` of a normalised
            Gramian).
        tol: DAQP's primal feasibility tolerance (constraint violation allowed at the solution,
            relative to the row's norm).
    """

    def __init__(self, factor: np.ndarray, tol: float = 1e-12) -> None:
        self.factor = np.ascontiguousarray(factor, dtype=np.float64)
        norms = np.linalg.norm(self.factor, axis=1)
        self._row_scale = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 1.0)
        self._scaled = np.ascontiguousarray(self.factor * self._row_scale[:, None])
        self.tol = tol
        self._model: Any = None
        self.fallbacks = 0

    def __call__(self, y: np.ndarray, lower: np.ndarray) -> Projection:
        m, r = self.factor.shape
        if r == 0:  # no variable: feasible iff lower ≤ 0; any λ fits, take 0
            if (lower > 0).any():
                raise InfeasibleError("projection onto an empty polyhedron (zero Gramian, b > 0)")
            return Projection(np.zeros(0), np.zeros(m))
        scaled_lower = lower * self._row_scale
        # DAQP's tolerances are absolute: solve for x / s with s the size of the data, so that
        # they are relative to it (CAGrad on nearly opposite gradients: |y| ~ 1e-7, levels ~ 1e-14)
        size = max(float(np.linalg.norm(y)), float(np.abs(scaled_lower).max(initial=0.0)))
        size = size if size > 0 else 1.0
        try:
            x, multipliers = self._daqp(y / size, scaled_lower / size)
        except SolverError:
            # nearly opposite active rows: DAQP's factorisation fails; check with an exact
            # active-set solve on the rows (a verified KKT point) before giving up
            found = active_set_projection(self.factor, y, lower)
            if found is None:
                raise
            self.fallbacks += 1
            x, weights = found
        else:
            x, weights = x * size, multipliers * (size * self._row_scale)
        return Projection(x, weights)

    def _daqp(self, y: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DAQP's ``(x, μ)`` for the problem with unit rows (``μ``: their multipliers)."""
        m, r = self.factor.shape
        upper = np.full(m, 1e30)
        if self._model is None:
            daqp = _daqp()
            model = daqp.Model()
            model.settings = {"primal_tol": self.tol}
            sense = np.zeros(m, dtype=np.intc)
            status = model.setup(np.eye(r), -y, self._scaled, upper, lower, sense)
            flag = int(status[0] if isinstance(status, tuple) else status)
            if flag < 0:  # the workspace was not built: the next call must set up afresh
                if flag == -1:
                    raise InfeasibleError("the polyhedron {x : L x >= b} is empty (DAQP setup -1)")
                reason = _DAQP_EXIT.get(flag, "unknown exit flag")
                raise SolverError(f"DAQP could not set up a projection QP: flag {flag} ({reason})")
            self._model = model
        else:
            self._model.update(f=-y, bupper=upper, blower=lower)
        x, _, flag, info = self._model.solve()
        if flag == -1:
            raise InfeasibleError("the polyhedron {x : L x >= b} is empty (DAQP exit flag -1)")
        if flag != 1:
            reason = _DAQP_EXIT.get(int(flag), "unknown exit flag")
            raise SolverError(f"DAQP failed on a projection QP: exit flag {flag} ({reason})")
        # DAQP's multipliers are ≤ 0 for active lower bounds
        multipliers = np.maximum(-np.asarray(info["lam"], dtype=np.float64), 0.0)
        return np.asarray(x, dtype=np.float64), multipliers


@dataclass
class DualConeSolve:
    """The result of :func:`dual_cone_solve`: the weights (``[k, m]``), how many projections
    DAQP failed on (solved by the exact active-set fallback), how many of those were redone by
    NNLS, and the first solver error."""

    weights: np.ndarray
    fallbacks: int = 0
    nnls: int = 0
    error: str = ""


def dual_cone_weights(gramian: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each row ``u`` of ``targets`` (``[k, m]``), ``v = argmin_{v ≥ u} vᵀGv``.

    ``Jᵀv`` is the projection of ``Jᵀu`` onto the dual cone ``{d : J d ≥ 0}`` of the task
    gradients (the rows of ``J``): solved as ``min ½|x - Lᵀu|² s.t. L x ≥ 0`` with ``v = u + λ``.
    The KKT conditions hold: ``v ≥ u``, ``G v ≥ 0`` (no task conflicts with ``Jᵀv``) and
    ``(v - u)ᵀ G v = 0``. When ``G`` is singular several ``v`` give the same direction; this one
    has ``v - u`` supported on linearly independent active tasks (a vertex of the solution set).

    DAQP, a dual active-set method, can fail on degenerate instances: gradients that are
    positively dependent up to rounding (opposite rows, ``0`` in the convex hull of a few rows)
    make constraints that are active together almost dependent, and it then wrongly reports the
    (always feasible) problem infeasible; measured on float32 Gramians with such rows, 0.7% of
    the solves (quadprog, also a dual method, fails as often). Such a solve is redone by
    Lawson-Hanson NNLS (``scipy.optimize.nnls``, a primal active-set method that handles them)
    on the equivalent ``min_{z ≥ 0} |Lᵀz + Lᵀu|``, ``v = u + z`` (where the exact active-set
    fallback of :class:`PolyhedralProjector` fails too), with a ``RuntimeWarning``;
    :func:`dual_cone_solve` counts them instead.

    Args:
        gramian: ``[m, m]`` positive semi-definite (normalised: ``max G_ii = 1``).
        targets: ``[k, m]``.
    """
    solve = dual_cone_solve(gramian, targets)
    if solve.nnls:
        warnings.warn(
            f"{solve.error}; this projection onto the dual cone is always feasible, so it is "
            "redone with scipy's NNLS (degenerate gradients)",
            RuntimeWarning,
            stacklevel=2,
        )
    return solve.weights


def dual_cone_solve(gramian: np.ndarray, targets: np.ndarray) -> DualConeSolve:
    """:func:`dual_cone_weights` without the warning: the fallbacks are counted."""
    factor = gramian_factor(gramian)
    projector = PolyhedralProjector(factor)
    lower = np.zeros(gramian.shape[0])
    solve = DualConeSolve(np.empty_like(targets, dtype=np.float64))
    for row, target in enumerate(targets):
        if not target.any():
            solve.weights[row] = target
            continue
        try:
            solve.weights[row] = target + projector(factor.T @ target, lower).multipliers
        except SolverError as error:
            solve.error = solve.error or str(error)
            solve.nnls += 1
            solve.weights[row] = target + _nnls(factor.T, -(factor.T @ target))
            solve.fallbacks += projector.fallbacks + 1
            projector = PolyhedralProjector(factor)  # a fresh workspace for the next targets
    solve.fallbacks += projector.fallbacks
    return solve


def _nnls(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``argmin_{z ≥ 0} |A z - b|`` by scipy's Lawson-Hanson NNLS."""
    try:
        from scipy.optimize import nnls
    except ImportError as error:  # pragma: no cover - scipy is a dependency
        raise SolverError("DAQP failed and the fallback needs scipy: pip install scipy") from error
    solution, _ = nnls(matrix, target, maxiter=100 * max(matrix.shape[1], 1))
    return solution


def hull_distance(gramian: np.ndarray) -> float:
    """``min_{v ∈ Δ} |Jᵀv|``, the distance from ``0`` to the convex hull of the task gradients,
    by MGDA's exact min-norm solver (:func:`~mtlkit.methods.mgda.min_norm_weights`, to rounding:
    about ``1e-8`` for a normalised Gramian); ``0`` exactly when the gradients are
    Pareto-stationary."""
    from mtlkit.methods.mgda import min_norm_weights

    if not gramian.any():
        return 0.0
    weights = min_norm_weights(torch.from_numpy(gramian), tol=0.0).numpy()
    return math.sqrt(max(float(weights @ gramian @ weights), 0.0))


def stationary_distance(eps: float | None = None) -> float:
    """The distance from ``0`` to the convex hull of the (normalised) task gradients below which
    they count as Pareto-stationary: ``10 sqrt(eps)`` for a Gramian with rounding unit ``eps``
    (float64 by default: 1.5e-7; float32: 3.5e-3). A Gramian's entries are squared norms, so
    their rounding errors move that distance by about ``sqrt(eps)``; and near it the solution of
    ``G w = w^(-1/α)`` grows like its inverse, beyond what the precision can resolve."""
    return 10.0 * math.sqrt(np.finfo(np.float64).eps if eps is None else eps)


def _max_step_to_boundary(v: np.ndarray, dv: np.ndarray) -> float:
    """The largest ``t ≤ 1`` with ``v + t dv ≥ 0`` (``v > 0``)."""
    negative = dv < 0
    if not negative.any():
        return 1.0
    return min(1.0, float((-v[negative] / dv[negative]).min()))


def interior_point_qp(
    hessian: np.ndarray,
    linear: np.ndarray,
    eq_matrix: np.ndarray,
    eq_value: np.ndarray,
    ineq_matrix: np.ndarray,
    ineq_value: np.ndarray,
    start: np.ndarray,
    tol: float = 1e-11,
    max_iter: int = 100,
) -> tuple[np.ndarray, bool]:
    """``min ½ xᵀ P x + pᵀ x  s.t.  A x = b,  G x ≥ h`` for a small dense convex QP (``P`` PSD,
    ``P + GᵀG`` positive definite): Mehrotra's primal-dual interior-point method
    (predictor-corrector) in float64 NumPy (the problems here have a few dozen variables).

    Returns:
        The solution and whether it converged (residuals and the duality measure below ``tol``
        relative to the problem's scale); otherwise the last iterate.
    """
    P, p, A, b, G, h = hessian, linear, eq_matrix, eq_value, ineq_matrix, ineq_value
    n, k, e = P.shape[0], G.shape[0], A.shape[0]
    x = start.astype(np.float64).copy()
    s = np.maximum(G @ x - h, 1.0)
    z = np.ones(k)
    y = np.zeros(e)
    scale = 1.0 + np.abs(P).max() + np.abs(p).max()
    kkt = np.zeros((n + e, n + e))
    kkt[:n, n:] = -A.T
    kkt[n:, :n] = A
    for _ in range(max_iter):
        r_dual = P @ x + p - A.T @ y - G.T @ z
        r_eq = A @ x - b
        r_ineq = G @ x - s - h
        mu = float(s @ z) / k
        residual = max(np.abs(r_dual).max(), np.abs(r_eq).max(), np.abs(r_ineq).max())
        if residual <= tol * scale and mu <= tol * scale:
            return x, True
        kkt[:n, :n] = P + G.T @ ((z / s)[:, None] * G)

        def newton(r_comp: np.ndarray, s=s, z=z, r_dual=r_dual, r_eq=r_eq, r_ineq=r_ineq):
            # slacks eliminated: z∘ds + s∘dz = -r_comp, ds = G dx + r_ineq
            rhs = np.concatenate([-r_dual - G.T @ ((r_comp + z * r_ineq) / s), -r_eq])
            try:
                solution = np.linalg.solve(kkt, rhs)
            except np.linalg.LinAlgError:  # numerically singular near the end
                solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
            dx, dy = solution[:n], solution[n:]
            ds = G @ dx + r_ineq
            return dx, dy, ds, -(r_comp + z * ds) / s

        dx, dy, ds, dz = newton(s * z)  # predictor (affine scaling)
        step = min(_max_step_to_boundary(s, ds), _max_step_to_boundary(z, dz))
        mu_affine = float((s + step * ds) @ (z + step * dz)) / k
        sigma = (mu_affine / mu) ** 3 if mu > 0 else 0.0
        dx, dy, ds, dz = newton(s * z + ds * dz - sigma * mu)  # corrector
        step = min(1.0, 0.99 * min(_max_step_to_boundary(s, ds), _max_step_to_boundary(z, dz)))
        x, y, s, z = x + step * dx, y + step * dy, s + step * ds, z + step * dz
    return x, False
