"""PCD: priority-constrained descent, for one primary objective and secondary ones."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.methods.base import Decision, GramianWeighting
from mtlkit.methods.basic import check_finite_gramian
from mtlkit.methods.registry import METHODS


def priority_qp(
    gramian: Tensor,
    taus: Tensor,
    tol: float = 1e-9,
    dependence_tol: float = 1e-9,
    max_iter: int | None = None,
) -> tuple[Tensor, bool]:
    """Solve ``min_d ½|d - g_0|²  s.t.  g_jᵀ d ≥ τ_j |g_j|²  (j = 1, ..., m-1)`` on the Gramian.

    By the KKT conditions the solution is ``d = g_0 + Σ_j μ_j g_j`` with multipliers ``μ ≥ 0``;
    this returns the weights ``w = (1, μ_1, ..., μ_{m-1})`` (``d = w @ J``). The solver is the
    dual active-set method of Goldfarb & Idnani (1983) for an identity Hessian, written on the
    Gramian only: it starts from the unconstrained minimiser ``d = g_0`` and adds the most
    violated constraint at a time, dropping active constraints whose multiplier would turn
    negative; the constraints kept active are linearly independent, and every iterate is
    optimal for the constraints active so far, so the method ends at the exact solution after
    finitely many steps. A constraint counts as satisfied when violated by at most ``tol · max_i
    G_ii``; a gradient counts as dependent on the active ones when its residual has squared norm
    at most ``dependence_tol`` times its own.

    Args:
        gramian: ``[m, m]`` Gramian of ``g_0, ..., g_{m-1}``, the primary first.
        taus: ``[m-1]`` fractions ``τ_j ≥ 0``.
        tol, dependence_tol: see above.
        max_iter: bound on the add/drop steps (default ``10 m``); reaching it warns
            (``RuntimeWarning``) and returns the current iterate.

    Returns:
        The weights (float64, on the CPU) and whether the constraints are feasible. When they are
        not (possible for m ≥ 3 only, e.g. two opposite secondary gradients with τ > 0), the
        weights are ``(1, 0, ..., 0)``: the constraints are dropped, as in the paper.
    """
    work = gramian.detach().to(device="cpu", dtype=torch.float64)
    m = work.shape[0]
    weights = torch.zeros(m, dtype=torch.float64)
    weights[0] = 1.0
    if m == 1:
        return weights, True
    taus = taus.detach().to(device="cpu", dtype=torch.float64)
    if taus.shape != (m - 1,):
        raise ValueError(f"expected {m - 1} values of tau, got shape {tuple(taus.shape)}")
    max_iter = 10 * m if max_iter is None else max_iter
    secondary = work[1:, 1:]
    # b_j > 0 iff g_0 violates constraint j; the slack of constraint j at μ is (G_s μ)_j - b_j.
    bounds = taus * secondary.diagonal() - work[1:, 0]
    multipliers = torch.zeros(m - 1, dtype=torch.float64)
    atol = tol * max(float(work.diagonal().max()), torch.finfo(torch.float64).tiny)
    active: list[int] = []
    steps = 0
    while True:
        slacks = secondary @ multipliers - bounds
        slacks[active] = 0.0  # active constraints hold with equality (up to rounding)
        entering = int(slacks.argmin())
        if float(slacks[entering]) >= -atol:
            break
        violation = float(slacks[entering])
        while True:
            steps += 1
            if steps > max_iter:
                warnings.warn(
                    f"PCD's QP solver reached max_iter={max_iter}; returning the current iterate",
                    RuntimeWarning,
                    stacklevel=3,
                )
                weights[1:] = multipliers.clamp_min(0)
                return weights, True
            column = secondary[entering]
            if active:
                index = torch.tensor(active)
                # Dual step: μ_entering += t, μ_active -= t r; primal step t z with
                # z = g_entering - Σ_active r_i g_i ⟂ the active gradients.
                r = torch.linalg.solve(secondary[index][:, index], column[index])
                residual = float(column[entering] - column[index] @ r)
                ratios = torch.where(r > 0, multipliers[index] / r, torch.inf)
                blocking = int(ratios.argmin())
                partial = float(ratios[blocking])
            else:
                r = torch.zeros(0, dtype=torch.float64)
                residual = float(column[entering])
                blocking, partial = -1, math.inf
            independent = residual > dependence_tol * float(column[entering])
            full = -violation / residual if independent else math.inf
            step = min(full, partial)
            if step == math.inf:
                return weights, False
            if active:
                multipliers[index] -= step * r
            multipliers[entering] += step
            if full <= partial:
                active.append(entering)
                break
            multipliers[active[blocking]] = 0.0
            del active[blocking]
            violation = float(column @ multipliers - bounds[entering])
    weights[1:] = multipliers.clamp_min(0)
    return weights, True


@METHODS.register("pcd")
class PCD(GramianWeighting):
    """Priority-constrained descent (Varam & AlHajri, "Not All Objectives Are Born Equal:
    Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR 2026).

    Task ``primary`` (the first by default) is the objective that matters; the others only
    constrain it. Each gradient is normalised by a running estimate of its size,
    ``g̃_i = s_i g_i`` with ``s_i = 1 / sqrt(v̂_i + ε)``, ``v̂_i`` the bias-corrected exponential
    moving average (decay ``β``) of ``|g_i|²`` over the calls (one Adam-like second moment per
    task). The direction is the one closest to the primary's normalised gradient that gives every
    secondary at least a fraction ``τ`` of the first-order progress of a step along its own
    normalised gradient::

        d̃ = argmin_d ½ |d - g̃_p|²   s.t.   g̃_jᵀ d ≥ τ_j |g̃_j|²   for every secondary j,
        d = d̃ |g_p| / |d̃|,

    rescaled to the primary gradient's norm. Solved exactly on the Gramian by
    :func:`priority_qp`. Special cases, as in the paper: ``g_p = 0`` gives ``d = 0``; infeasible
    constraints (only with three or more tasks, e.g. two opposite secondary gradients) are dropped
    for the step, ``d = g_p``, and counted in ``infeasible_steps``; ``d̃ = 0`` (to rounding) gives
    ``d = 0``. Because of the normalisation, multiplying a secondary loss by a constant at every
    step does not change the direction (up to ``ε``).

    The paper's defaults: ``τ = 0.02``, ``β = 0.999``, ``ε = 1e-8``.

    Args:
        tau: ``τ ∈ [0, 1]``, one value for all secondaries or one per secondary (in task order).
        beta: ``β ∈ [0, 1)``, the decay of the moving average of the squared gradient norms.
        eps: ``ε ≥ 0``, added to the moving average before the inverse square root.
        primary: the index of the primary task.
    """

    def __init__(
        self,
        tau: float | Sequence[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        primary: int = 0,
    ) -> None:
        super().__init__()
        taus = [float(tau)] if isinstance(tau, (int, float)) else [float(t) for t in tau]
        if not taus or not all(0.0 <= t <= 1.0 for t in taus):
            raise ValueError(f"tau must be in [0, 1] (one value or one per secondary), got {tau}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if isinstance(primary, bool) or int(primary) != primary or primary < 0:
            raise ValueError(f"primary must be a task index >= 0, got {primary!r}")
        self.tau = tau if isinstance(tau, (int, float)) else list(taus)
        self.taus = taus
        self.beta = float(beta)
        self.eps = float(eps)
        self.primary = int(primary)
        self.sq_norm_average: Tensor | None = None
        self.steps = 0
        self.infeasible_steps = 0
        self.last_feasible: bool | None = None
        self.last_scales: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.sq_norm_average = None
        self.steps = 0
        self.infeasible_steps = 0
        self.last_feasible = None
        self.last_scales = None

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "sq_norm_average": self.sq_norm_average,
            "steps": self.steps,
            "infeasible_steps": self.infeasible_steps,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.sq_norm_average = state["sq_norm_average"]
        self.steps = int(state["steps"])
        self.infeasible_steps = int(state["infeasible_steps"])

    def _tau_vector(self, m: int) -> Tensor:
        if len(self.taus) == 1:
            return torch.full((m - 1,), self.taus[0], dtype=torch.float64)
        if len(self.taus) != m - 1:
            raise ValueError(f"PCD has {len(self.taus)} values of tau for {m - 1} secondary tasks")
        return torch.tensor(self.taus, dtype=torch.float64)

    def scales(self, sq_norms: Tensor) -> Tensor:
        """Update the moving average with this step's squared norms ``|g_i|²`` (float64, CPU)
        and return the scales ``s_i`` (0 for a gradient that has always been zero with ε = 0)."""
        m = sq_norms.numel()
        if self.sq_norm_average is None:
            self.sq_norm_average = torch.zeros(m, dtype=torch.float64)
        elif self.sq_norm_average.numel() != m:
            raise ValueError(
                f"PCD was tracking {self.sq_norm_average.numel()} tasks, got {m}; call reset()"
            )
        self.steps += 1
        average = self.beta * self.sq_norm_average + (1 - self.beta) * sq_norms
        self.sq_norm_average = average
        denominator = (average / (1 - self.beta**self.steps) + self.eps).sqrt()
        return torch.where(denominator > 0, 1 / denominator, torch.zeros_like(denominator))

    def _solve(self, gramian: Tensor) -> tuple[Tensor, float]:
        """The weights ``u = (w_i s_i)`` of ``d̃ = Σ_i u_i g_i`` on the raw gradients (float64,
        CPU, in task order; zero when ``g_p = 0``) and the rounding threshold below which
        ``|d̃|²`` counts as zero. Updates the moving average and the diagnostics."""
        check_finite_gramian(gramian, self)
        m = gramian.shape[0]
        if self.primary >= m:
            raise ValueError(f"PCD(primary={self.primary}) got only {m} tasks")
        order = [self.primary, *(i for i in range(m) if i != self.primary)]
        index = torch.tensor(order)
        work = gramian.detach().to(device="cpu", dtype=torch.float64)[index][:, index]
        sq_norms = work.diagonal().clamp_min(0)
        scales = self.scales(sq_norms)
        ordered = torch.zeros(m, dtype=torch.float64)
        feasible, threshold = True, 0.0
        if sq_norms[0] > 0:
            normalized = work * scales[:, None] * scales[None, :]
            w, feasible = priority_qp(normalized, self._tau_vector(m))
            ordered = w * scales
            magnitude = float(ordered.abs() @ sq_norms.sqrt()) ** 2
            threshold = 8 * torch.finfo(gramian.dtype).eps * magnitude
        if not feasible:
            self.infeasible_steps += 1
        self.last_feasible = feasible
        self.last_scales = torch.empty_like(scales).index_copy_(0, index, scales)
        return torch.empty_like(ordered).index_copy_(0, index, ordered), threshold

    def _rescale(self, raw: Tensor, sq_primary: float, sq_direction: float, threshold: float):
        """``u |g_p| / |d̃|``, or zeros when ``d̃`` is zero up to rounding (or ``g_p = 0``)."""
        if sq_primary <= 0 or not sq_direction > threshold:
            return torch.zeros_like(raw)
        return raw * math.sqrt(sq_primary / sq_direction)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The weights from the Gramian alone; ``|d̃|² = uᵀ G u`` then carries the Gramian's
        rounding, amplified when ``d̃`` is a near-cancellation of large terms (``forward``
        measures ``|d̃|`` on the gradients instead)."""
        raw, threshold = self._solve(gramian)
        work = gramian.detach().to(device="cpu", dtype=torch.float64)
        sq_primary = float(work[self.primary, self.primary])
        weights = self._rescale(raw, sq_primary, float(raw @ work @ raw), threshold)
        weights = weights.to(dtype=gramian.dtype, device=gramian.device)
        return weights

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        """The direction, with ``|d̃|`` and ``|g_p|`` measured on the gradients themselves, as
        in the paper's Algorithm 1 (exact even when ``d̃`` is a near-cancellation)."""
        raw, threshold = self._solve(jacobian @ jacobian.T)
        direction = raw.to(dtype=jacobian.dtype, device=jacobian.device) @ jacobian
        sq_primary = float(jacobian[self.primary].double().square().sum())
        sq_direction = float(direction.double().square().sum())
        weights = self._rescale(raw, sq_primary, sq_direction, threshold)
        primary = float(raw[self.primary])  # s_p > 0 unless g_p = 0, when raw is all zeros
        factor = float(weights[self.primary]) / primary if primary > 0 else 0.0
        weights = weights.to(dtype=jacobian.dtype, device=jacobian.device)
        return Decision(weights=weights, direction=direction * factor)
