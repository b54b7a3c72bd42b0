"""Exact Pareto optimal search (EPO): gradient descent with controlled ascent onto a preference
ray, one linear program per step (:func:`epo_solve`, SciPy's HiGHS)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import Decision, SolverStatus, check_gramian, check_losses
from mtlkit.methods.float64_gramian import Float64GramianWeighting
from mtlkit.methods.preference import (
    IDEAL_HINT,
    check_min_loss,
    check_preference,
    ideal_point,
    preference_vector,
)
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solver_report import ReportsSolver
from mtlkit.methods.weighting import require_above

F64 = torch.float64


def non_uniformity(relative: np.ndarray) -> tuple[float, np.ndarray]:
    """``(μ, a / p)``: with ``l̂ = rl / Σ rl``, ``μ = KL(l̂ | 1/m) = Σ_j l̂_j log(m l̂_j)`` and
    ``log(m l̂_i) - μ``, the latter computed as ``Σ_j l̂_j (log l̂_i - log l̂_j)`` (equal, as
    ``Σ_j l̂_j = 1``): the authors' difference of two nearly equal numbers is 0 in float64 for
    the task behind the others once another task's ``l̂`` is below about 1e-16, so its
    adjustment vanished; here it is ``l̂_j log(l̂_i / l̂_j) > 0``."""
    m = relative.size
    logs = np.log(relative) - np.log(relative.sum())
    hat = np.exp(logs)
    mu = float(np.sum(hat * (logs + np.log(m))))
    return mu, (hat[None, :] * (logs[:, None] - logs[None, :])).sum(axis=1)


def epo_solve(
    gramian: np.ndarray, gaps: np.ndarray, preference: np.ndarray, eps: float
) -> tuple[np.ndarray, str, SolverStatus]:
    """EPO's linear program for one step: ``(β, mode, status)``, ``β`` on the simplex.

    With ``C = G Gᵀ`` (scaled by its largest diagonal entry: the LP is invariant to it),
    ``rl = p ⊙ l``, ``l̂ = rl / Σ rl``, ``μ = KL(l̂ | 1/m)`` and the adjustment
    ``a = p ⊙ (log(m l̂) - μ)`` (the direction in loss space that lowers ``μ``; the balance
    objective is divided by ``max_j |(Ca)_j|``, which does not change its maximiser, because
    ``Ca`` vanishes like ``l̂_i log l̂_i`` where a task's relative loss goes to 0, below the LP
    solver's tolerances)::

        balance (μ > eps):  max_β βᵀ C a   s.t.  β ∈ Δ,  (Cβ)_j ≥ (Ca)_j  (j ∉ J),
                                                          (Cβ)_j ≥ 0      (j ∈ J*),
        descent (μ ≤ eps):  max_β 1ᵀ C β   s.t.  β ∈ Δ,  Cβ ≥ 0,  βᵀ C a ≥ min(max_j (Ca)_j, 0),

    where ``J = {j : (Ca)_j > 0}`` and ``J* = argmax_j rl_j`` (with ``J`` empty the balance
    constraints are ``Cβ ≥ 0``), as in the authors' ``epo_lp.py``. Where the LP has no
    solution (a degenerate cone in floating point), the relaxed descent LP (``Cβ ≥ 0`` alone,
    always feasible: the min-norm point satisfies it) is solved instead and the status says so.

    Raises:
        RuntimeError: if the relaxed LP fails too.
    """
    from scipy.optimize import linprog

    m = gramian.shape[0]
    top = float(np.max(np.diag(gramian))) if m else 0.0
    C = gramian / top if top > 0 else np.zeros_like(gramian)
    relative = preference * gaps
    mu, adjustment = non_uniformity(relative)
    a = preference * adjustment
    Ca = C @ a
    equality = (np.ones((1, m)), np.ones(1))
    if mu > eps:
        mode = "balance"
        scale = float(np.abs(Ca).max())
        objective = Ca / scale if scale > 0 else Ca
        positive = Ca > 0
        if positive.any():
            rhs = np.where(positive, -np.inf, Ca)
            rhs[relative == relative.max()] = 0.0
        else:
            rhs = np.zeros(m)
        rows = np.isfinite(rhs)
        upper = (-C[rows], -rhs[rows])
    else:
        mode = "descent"
        objective = C.sum(axis=0)
        bound = min(float(Ca.max()), 0.0)
        upper = (np.vstack([-C, -Ca[None, :]]), np.concatenate([np.zeros(m), [-bound]]))
    result = linprog(
        -objective, A_ub=upper[0], b_ub=upper[1], A_eq=equality[0], b_eq=equality[1],
        bounds=(0, None), method="highs",
    )  # fmt: skip
    if result.status == 0:
        status = SolverStatus(f"highs {mode} LP", True, int(result.nit))
        return _on_simplex(result.x), mode, status
    why = f"{mode} LP: {result.message.strip()}"
    relaxed = linprog(
        -C.sum(axis=0), A_ub=-C, b_ub=np.zeros(m), A_eq=equality[0], b_eq=equality[1],
        bounds=(0, None), method="highs",
    )  # fmt: skip
    if relaxed.status != 0:
        raise RuntimeError(f"EPO: {why}; the relaxed descent LP failed too: {relaxed.message}")
    status = SolverStatus("highs relaxed LP", False, int(relaxed.nit), 0.0, f"{why}; relaxed")
    return _on_simplex(relaxed.x), "relaxed", status


def _on_simplex(beta: np.ndarray) -> np.ndarray:
    beta = np.clip(beta, 0.0, None)
    return beta / beta.sum()


@METHODS.register("epo")
class EPO(ReportsSolver, Float64GramianWeighting):
    """Exact Pareto optimal search (Mahapatra & Rajan, "Multi-Task Learning with User
    Preferences: Gradient Descent with Controlled Ascent in Pareto Optimization", ICML 2020;
    the authors' ``EPOSearch`` code, ``epo_lp.py`` and ``epo_train.py``).

    EPO reaches the Pareto-optimal point on the preference ray ``p_1 l_1 = ... = p_m l_m``
    (``l = L - z``, losses above the ideal point ``z``): while the relative losses
    ``l̂ = p ⊙ l / Σ p ⊙ l`` are far from uniform (their KL divergence ``μ`` from ``1/m`` above
    ``eps``) a *balance* step moves towards the ray, ascending on the tasks that are ahead of it
    if need be but never on the one farthest behind; on the ray a *descent* step lowers every
    loss while staying on it. Both are the direction ``d = Σ_j β_j g_j`` of the linear program
    of :func:`epo_solve` over the task gradients' Gramian; the update is the gradient of
    ``Σ_j w_j L_j`` with ``w = m β``, as in the authors' training script.

    With mtlkit's convention (:mod:`mtlkit.methods.preference`), a larger ``p_i`` asks for a
    smaller ``L_i``; ``p`` is the paper's ``r`` (normalised: the LP does not depend on its
    scale). The decision's status names the LP solved (``highs balance LP``, ``highs descent
    LP``); a step
    whose LP had no solution takes the relaxed descent LP (``Cβ ≥ 0``), records it in the
    status, and is warned about once per run.

    Args:
        preference: ``p_i > 0`` per task; ``None``: uniform.
        eps: the threshold of ``μ`` below which a step descends (``1e-4``, the authors').
        min_loss: the ideal point ``z`` (below every loss), one number or one per task.

    Raises:
        ConfigError: (a ``ValueError``) if a loss is ``≤ z_i``; ``ValueError`` without losses.
    """

    needs_losses = True

    def __init__(
        self,
        preference: Sequence[float] | None = None,
        eps: float = 1e-4,
        min_loss: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be >= 0 and finite, got {eps}")
        self.preference = check_preference(preference)
        self.eps = float(eps)
        self.min_loss = check_min_loss(min_loss)

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        preference_vector(self.preference, num_tasks, self)
        ideal_point(self.min_loss, num_tasks, self)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.decide(gramian, losses).weights

    def decide(self, gramian: Tensor, losses: Tensor | None = None) -> Decision:
        check_gramian(gramian)
        if losses is None:
            raise ValueError("EPO needs the task losses (its LP depends on them); got None")
        check_losses(losses)
        m = gramian.shape[0]
        if losses.numel() != m:
            raise ValueError(f"EPO got {losses.numel()} losses for a {m} x {m} Gramian")
        values = losses.detach().to(F64).cpu()
        ideal = ideal_point(self.min_loss, m, self)
        require_above(values, ideal, self, IDEAL_HINT)
        p = preference_vector(self.preference, m, self)
        matrix = gramian.detach().to(F64).cpu().numpy()
        if not np.isfinite(matrix).all():
            raise NonFiniteError("EPO got a Gramian with NaN or infinite entries")
        beta, _, status = epo_solve(matrix, (values - ideal).numpy(), p.numpy(), self.eps)
        if not status.converged:
            self.warn_once("relaxed", f"EPO: {status.message}")
        weights = torch.from_numpy(m * beta).to(dtype=gramian.dtype, device=gramian.device)
        return Decision(weights=weights, status=status)
