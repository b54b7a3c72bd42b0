"""Projections onto the dual cone of the task gradients: UPGrad and DualProj."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import Decision
from mtlkit.methods.float64_gramian import Float64GramianWeighting
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solver_report import ReportsSolver, SolverStatus
from mtlkit.methods.solvers import dual_cone_solve, gramian_to_numpy, to_weights


def _check_pref_vector(pref_vector: Sequence[float] | None) -> tuple[float, ...] | None:
    if pref_vector is None:
        return None
    values = tuple(float(v) for v in pref_vector)
    if not values or not all(np.isfinite(values)):
        raise ValueError(f"pref_vector must be a non-empty list of finite numbers, got {values}")
    return values


class _DualConeWeighting(ReportsSolver, Float64GramianWeighting):
    """What UPGrad and DualProj share: the preference vector and the regularisation; both solve
    from a float64 Gramian (:mod:`~mtlkit.methods.float64_gramian`)."""

    def __init__(self, pref_vector: Sequence[float] | None = None, reg_eps: float = 0.0) -> None:
        super().__init__()
        self.pref_vector = _check_pref_vector(pref_vector)
        if not (reg_eps >= 0 and np.isfinite(reg_eps)):
            raise ValueError(f"reg_eps must be a finite number >= 0, got {reg_eps}")
        self.reg_eps = float(reg_eps)

    def _prepare(self, gramian: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The normalised (and regularised) Gramian and the preference vector ``u``."""
        work, _ = gramian_to_numpy(gramian, type(self).__name__)
        m = work.shape[0]
        if self.pref_vector is None:
            pref = np.full(m, 1.0 / m)
        elif len(self.pref_vector) != m:
            raise ValueError(
                f"{type(self).__name__} has a pref_vector of {len(self.pref_vector)} values "
                f"for {m} tasks"
            )
        else:
            pref = np.asarray(self.pref_vector, dtype=np.float64)
        if self.reg_eps > 0:
            trace = float(work.trace())
            work = (work / trace if trace > 0 else 0 * work) + self.reg_eps * np.eye(m)
            work = work / work.diagonal().max()
        return work, pref

    def _targets(self, pref: np.ndarray) -> np.ndarray:
        """The ``[k, m]`` vectors ``u`` whose projections ``v(u)`` are summed."""
        raise NotImplementedError

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.decide(gramian, losses).weights

    def decide(self, gramian: Tensor, losses: Tensor | None = None) -> Decision:
        """``Σ_u v(u)`` over :meth:`_targets`, and the status of the projections (``"daqp"``;
        the message counts those DAQP failed on, solved exactly by a fallback)."""
        work, pref = self._prepare(gramian)
        targets = self._targets(pref)
        # v ≥ u, min vᵀGv is, with v = v'/s (s_i = |g_i|), v' ≥ s u, min v'ᵀ(G / ssᵀ)v': solved
        # on the cosines, so that a row 1e9 times shorter than another is not rounding noise
        scales = np.sqrt(np.clip(work.diagonal(), 0.0, None))
        scales[scales == 0] = 1.0  # a zero gradient: its row and column are zero
        solve = dual_cone_solve(work / np.outer(scales, scales), targets * scales)
        values = (solve.weights / scales).sum(axis=0)
        if not np.isfinite(values).all():  # pragma: no cover - the solvers raise first
            raise NonFiniteError(f"{type(self).__name__} computed non-finite weights")
        message = ""
        if solve.fallbacks:
            count = f"{solve.fallbacks} of {len(targets)} projections"
            message = f"{count} by a fallback"
            self.warn_once(
                "fallback",
                f"{type(self).__name__}: DAQP failed on {count} onto the dual cone "
                f"({solve.error or 'nearly opposite active rows'}); solved exactly by the "
                f"fallbacks (active-set QP: {solve.fallbacks - solve.nnls}, scipy's NNLS: "
                f"{solve.nnls})",
            )
        status = SolverStatus("daqp", True, len(targets), 0.0, message)
        return Decision(weights=to_weights(values, gramian), status=status)


@METHODS.register("upgrad")
class UPGrad(_DualConeWeighting):
    """Unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", 2024; torchjd's ``UPGrad``).

    Each task gradient, weighted by the preference ``u_i``, is projected onto the dual cone of
    all task gradients ``C = {d : g_j · d ≥ 0 ∀j}``, and the projections are added::

        d = Σ_i π_C(u_i g_i),   π_C(Jᵀx) = Jᵀ v(x),   v(x) = argmin_{v ≥ x} vᵀ G v,

    so the weights are ``w = Σ_i v(u_i e_i)`` (Prop. 1 of the paper: the projection onto ``C`` in
    the ``n``-dimensional space is a QP in ``m`` variables on the Gramian). The ``m`` QPs are
    solved exactly by :func:`~mtlkit.methods.solvers.dual_cone_weights` (DAQP, one workspace).

    Properties: ``J d = G w ≥ 0`` (no task conflicts with ``d``, up to the solver's 1e-12
    relative feasibility tolerance); when no two gradients conflict (``G ≥ 0`` elementwise)
    every ``u_i g_i`` is already in ``C`` and ``d = Σ u_i g_i``, the mean for the default ``u``;
    the weights do not change when all gradients are scaled by the same factor, and permuting the
    tasks (with ``u``) permutes them. A zero gradient projects to zero and keeps its weight ``u_i``.
    With a singular Gramian (``m > n``, collinear rows) the direction is still unique but the
    weights need not be: the solver returns those of a vertex of the solution set.

    Args:
        pref_vector: the preference ``u`` (one value per task); ``None``: ``u_i = 1/m``
            (torchjd's default: the mean of the projections).
        reg_eps: ``0`` for the exact projection. ``> 0``: solve with ``G / tr(G) + reg_eps · I``
            instead, torchjd's regularisation (its default is ``1e-4``), which makes the weights
            unique but lets ``J d`` go slightly negative.
    """

    def _targets(self, pref: np.ndarray) -> np.ndarray:
        return np.diag(pref)


@METHODS.register("dualproj")
class DualProj(_DualConeWeighting):
    """Projection of the averaged gradient onto the dual cone of the task gradients (the
    gradient projection of GEM, Lopez-Paz & Ranzato, NeurIPS 2017, eq. 11, as an aggregator;
    torchjd's ``DualProj``)::

        d = π_C(Σ_i u_i g_i),   C = {d : g_j · d ≥ 0 ∀j},   w = argmin_{v ≥ u} vᵀ G v.

    One QP, solved exactly by :func:`~mtlkit.methods.solvers.dual_cone_weights`. ``J d = G w ≥ 0``;
    when ``Σ u_i g_i`` conflicts with no task, ``w = u``. Same arguments, scale and permutation
    behaviour as :class:`UPGrad`.

    Args:
        pref_vector: the preference ``u``; ``None``: ``u_i = 1/m`` (the mean gradient).
        reg_eps: as for :class:`UPGrad`.
    """

    def _targets(self, pref: np.ndarray) -> np.ndarray:
        return pref[None, :]
