"""Bargaining and α-fair weightings: Nash-MTL and FairGrad, both the positive solution of
``G w = w^(-1/α)`` (Nash-MTL is ``α = 1``), solved by
:func:`~mtlkit.methods.fair_solver.fair_weights`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.methods.base import Decision
from mtlkit.methods.fair_solver import FairSolve, fair_weights
from mtlkit.methods.float64_gramian import Float64GramianWeighting
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solver_report import ReportsSolver, SolverStatus
from mtlkit.methods.solvers import gramian_to_numpy, to_weights


class _FairWeighting(ReportsSolver, Float64GramianWeighting):
    """Solve ``G w = w^(-1/α)`` on the normalised (float64) Gramian, map back, clip the
    direction's norm; the decision's status is the solve's (``"newton"``)."""

    def __init__(self, alpha: float, max_norm: float, max_iter: int) -> None:
        super().__init__()
        name = type(self).__name__
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"{name}: alpha must be a finite number > 0, got {alpha}")
        if not (max_norm >= 0 and math.isfinite(max_norm)):
            raise ValueError(f"{name}: max_norm must be a finite number >= 0, got {max_norm}")
        if max_iter < 1:
            raise ValueError(f"{name}: the iteration cap must be >= 1, got {max_iter}")
        self._alpha = float(alpha)
        self.max_norm = float(max_norm)
        self._max_iter = int(max_iter)
        self.last_solve: FairSolve | None = None

    def _solve(
        self, gramian: np.ndarray, scale: float, start: np.ndarray | None, eps: float
    ) -> tuple[np.ndarray, SolverStatus]:
        """The solution for the Gramian ``scale · gramian`` (``gramian`` normalised) and the
        solve's status; the first solve of a run without solution, or that stops above its
        tolerance, warns."""
        alpha = self._alpha
        factor = scale ** (-alpha / (alpha + 1.0))  # G = s Ĝ  =>  w = s^(-α/(α+1)) ŵ
        warm = None if start is None else start / factor
        solve = fair_weights(gramian, alpha, start=warm, max_iter=self._max_iter, eps=eps)
        self.last_solve = solve
        name = type(self).__name__
        message = ""
        if solve.stationary:
            message = "Pareto-stationary: no solution, zero weights"
            self.warn_once(
                "stationary",
                f"{name}: the task gradients are Pareto-stationary (0 is in the convex hull of "
                "the non-zero ones, or all are zero), so G w = w^(-1/alpha) has no positive "
                "solution; using zero weights for this step",
            )
        elif not solve.converged:
            message = solve.reason
            self.warn_once(
                "not converged",
                f"{name}: the Newton solve of G w = w^(-1/alpha) stopped after "
                f"{solve.iterations} iterations with residual {solve.residual:.2e} "
                f"(max |w_i^(1/alpha) (G w)_i - 1|): {solve.reason}",
            )
        status = SolverStatus("newton", solve.converged, solve.iterations, solve.residual, message)
        return solve.weights * factor, status

    def _clip(self, values: np.ndarray, gramian: np.ndarray, scale: float) -> np.ndarray:
        """Scale ``values`` so that ``|Jᵀw| = sqrt(wᵀGw) ≤ max_norm`` (``0``: no clipping)."""
        if self.max_norm <= 0:
            return values
        norm = math.sqrt(max(float(values @ gramian @ values) * scale, 0.0))
        return values * (self.max_norm / norm) if norm > self.max_norm else values

    def _output(self, values: np.ndarray, gramian: Tensor) -> Tensor:
        weights = to_weights(values, gramian)
        return weights


@METHODS.register("nash_mtl")
class NashMTL(_FairWeighting):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

    The direction ``d = Jᵀα`` is the Nash bargaining solution of the tasks' utilities
    ``g_i · d`` in a ball: ``α > 0`` solves ``G α = 1/α`` (``g_i · d = 1/α_i``: each task's
    improvement is inversely proportional to its weight). The solution is unique: it minimises
    the strictly convex ``½ αᵀGα - Σ_i log α_i``; it is found by damped Newton
    (:func:`~mtlkit.methods.fair_solver.fair_weights`, warm-started from the previous solution as
    the paper's code does). The paper's code instead runs up to ``optim_niter`` rounds of a
    convex-concave procedure with cvxpy/ECOS and stops at ``|Gα - 1/α| < 1e-3``; this solves the
    same equation to 1e-10 (relative), or warns. Every ``update_weights_every`` steps ``α`` is
    recomputed; in between the last one is reused. Finally, if ``max_norm > 0`` the direction is
    scaled to norm ``≤ max_norm`` (at the solution ``|d|² = αᵀGα = m``).

    Properties: the direction does not change when a task's gradient is multiplied by any
    positive factor (``α_i`` is divided by it); permuting the tasks permutes ``α``. Tasks with a
    zero gradient get ``α_i = 0`` and the others are solved for. When the gradients are
    Pareto-stationary there is no solution: the weights are zero. Each decision's ``status``
    says how its solve ended; the first solve of a run without solution or above its tolerance
    warns (``RuntimeWarning``), later ones only set the status.

    Deviation: the paper's code clips the norm of the shared parameters' gradient only; here the
    weights are scaled (as in torchjd), so the task-specific parameters' gradient of
    ``Σ α_i L_i`` is scaled by the same factor.

    Args:
        update_weights_every: recompute ``α`` every this many calls (paper: 1).
        optim_niter: cap on Newton iterations per solve (paper: 20 CCP rounds); a
            solve that stops before its tolerance is reported in the status.
        max_norm: the bound on the direction's norm; ``0``: no clipping (paper: 1.0).
    """

    def __init__(
        self, update_weights_every: int = 1, optim_niter: int = 20, max_norm: float = 1.0
    ) -> None:
        super().__init__(alpha=1.0, max_norm=max_norm, max_iter=optim_niter)
        if update_weights_every < 1:
            raise ValueError(f"update_weights_every must be >= 1, got {update_weights_every}")
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self._step = 0
        self._solution: np.ndarray | None = None

    def reset(self) -> None:
        super().reset()
        self._step = 0
        self._solution = None
        self.last_solve = None

    def get_extra_state(self) -> dict[str, Any]:
        solution = None if self._solution is None else torch.from_numpy(self._solution.copy())
        return {"step": self._step, "solution": solution}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
        solution = state["solution"]
        self._solution = None if solution is None else solution.double().numpy().copy()

    @property
    def solution(self) -> Tensor | None:
        """The last unclipped ``α`` (float64), or ``None`` before the first solve."""
        return None if self._solution is None else torch.from_numpy(self._solution.copy())

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.decide(gramian, losses).weights

    def decide(self, gramian: Tensor, losses: Tensor | None = None) -> Decision:
        """The clipped weights; the status of this step's solve (``None`` on a step that
        reuses the last solution, ``update_weights_every > 1``)."""
        work, scale = gramian_to_numpy(gramian, "NashMTL")
        previous, status = self._solution, None
        if previous is not None and previous.shape != work.shape[:1]:
            previous = None  # another number of tasks: solve afresh
        if previous is None or self._step % self.update_weights_every == 0:
            start = previous if previous is not None and (previous > 0).all() else None
            eps = float(torch.finfo(gramian.dtype).eps)
            previous, status = self._solve(work, scale, start, eps)
            self._solution = previous
        self._step += 1
        weights = self._output(self._clip(previous, work, scale), gramian)
        return Decision(weights=weights, status=status)


@METHODS.register("fairgrad")
class FairGrad(_FairWeighting):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    α-fair allocation of the tasks' improvement rates ``g_i · d``: maximise
    ``Σ_i (g_i · d)^{1-α} / (1-α)`` (``Σ log`` for ``α = 1``) in a ball; with ``d = Jᵀw`` the
    optimality condition is ``G w = w^(-1/α)`` (``g_i · d = w_i^{-1/α}``), ``w > 0``. Its unique
    solution minimises the strictly convex ``½ wᵀGw - Σ_i w_i^{1-1/α} / (1-1/α)`` and is found by
    damped Newton (:func:`~mtlkit.methods.fair_solver.fair_weights`); the paper's code solves the
    equation with ``scipy.optimize.least_squares`` to its default tolerance. ``α = 1`` is Nash-MTL
    (:class:`NashMTL`); ``α → 0`` tends to linear scalarisation, large ``α`` to max-min fairness.
    As in the paper's code the direction's norm is then clipped to ``max_norm``.

    Zero gradients get ``w_i = 0``; Pareto-stationary gradients have no solution: zero weights
    and a ``RuntimeWarning``. Permuting the tasks permutes the weights.

    Deviations from the paper's code: it multiplies the direction by ``m`` before clipping
    ("to match the sum loss"), which only matters when ``m |d| < max_norm``; this follows the
    paper's ``d = Σ w_i g_i``. As for :class:`NashMTL`, clipping scales the weights, hence also
    the task-specific parameters' gradient.

    Args:
        alpha: the fairness parameter ``α > 0`` (paper's code default: 1.0).
        max_norm: bound on the direction's norm; ``0``: no clipping (paper's code: 1.0).
        max_iter: cap on Newton iterations (a ``RuntimeWarning`` if a solve stops before its
            tolerance).
    """

    def __init__(self, alpha: float = 1.0, max_norm: float = 1.0, max_iter: int = 20) -> None:
        super().__init__(alpha=alpha, max_norm=max_norm, max_iter=max_iter)
        self.alpha = float(alpha)
        self.max_iter = int(max_iter)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.decide(gramian, losses).weights

    def decide(self, gramian: Tensor, losses: Tensor | None = None) -> Decision:
        work, scale = gramian_to_numpy(gramian, "FairGrad")
        values, status = self._solve(work, scale, None, float(torch.finfo(gramian.dtype).eps))
        return Decision(
            weights=self._output(self._clip(values, work, scale), gramian), status=status
        )
