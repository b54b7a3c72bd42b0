"""FORUM (Ye et al., ECAI 2024): a first-order multi-gradient method for the bilevel problem
as a constrained multi-objective one (value-function constraint, line-searched inner steps)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import StepProbe, WeightedLoss, check_losses
from mtlkit.methods.bilevel.common import (
    BilevelWeighting,
    ParameterSnapshot,
    check_positive,
    flat_gradient,
    rng_devices,
    rng_state,
    set_rng_state,
    shift_parameters,
    softmax_jacobian,
)
from mtlkit.methods.mgda import min_norm_weights
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solvers import interior_point_qp

FORUM_GUARD = 1e-8  # FORUM's code adds it to |∇q|² in π and in the constant ρ|∇q|²


def forum_qp(
    gram_upper: Tensor, cross: Tensor, constraint_sq_norm: float, rho: float
) -> tuple[Tensor, Tensor]:
    """FORUM's multi-gradient problem (problem (14) of the paper, as its code solves it).

    With ``g_i`` the (normalised) upper-level gradients, ``q`` the gradient of the value-function
    constraint and ``π_i = ρ - g_i·q / |q|²``::

        min_{λ ∈ Δ, ν ≥ 0, ν ≥ πᵀλ}  |Σ_i λ_i g_i + ν q|² - ν ρ |q|²

    At the optimum ``ν = max(0, πᵀλ)`` (for fixed ``λ`` the objective's unconstrained minimiser in
    ``ν`` is ``πᵀλ - ρ/2`` (up to the guard below), under the bound). Solved on the Gramian by
    :func:`~mtlkit.methods.solvers.interior_point_qp`; when ``q = 0`` (the constraint is
    inactive) it is MGDA's min-norm problem (:func:`~mtlkit.methods.mgda.min_norm_weights`).
    ``|q|²`` is guarded by ``+1e-8`` as in the paper's code.

    Args:
        gram_upper: ``[m, m]``, ``g_i · g_j``.
        cross: ``[m]``, ``g_i · q``.
        constraint_sq_norm: ``|q|²``.
        rho: FORUM's ``ρ ≥ 0``.

    Returns:
        ``λ`` (``[m]``, on the simplex) and ``π`` (``[m]``), as tensors like ``gram_upper``.
    """
    like = gram_upper.detach()
    m = like.shape[0]
    gram = like.cpu().double().numpy()
    cross_np = cross.detach().cpu().double().numpy()
    qq = float(constraint_sq_norm) + FORUM_GUARD
    pi = rho - cross_np / qq
    pi_tensor = torch.from_numpy(pi).to(like)
    if constraint_sq_norm <= 0.0:
        return min_norm_weights(like), pi_tensor
    full = np.zeros((m + 1, m + 1))
    full[:m, :m] = gram
    full[:m, m] = full[m, :m] = cross_np
    full[m, m] = float(constraint_sq_norm)
    scale = max(float(full.diagonal().max()), rho * qq, np.finfo(np.float64).tiny)
    linear = np.zeros(m + 1)
    linear[m] = -rho * qq / scale
    eq_matrix = np.zeros((1, m + 1))
    eq_matrix[0, :m] = 1.0
    ineq = np.zeros((m + 2, m + 1))
    ineq[: m + 1, : m + 1] = np.eye(m + 1)  # λ ≥ 0, ν ≥ 0
    ineq[m + 1, :m] = -pi  # ν - πᵀλ ≥ 0
    ineq[m + 1, m] = 1.0
    start = np.full(m + 1, 1.0 / m)
    start[m] = max(0.0, float(pi.mean())) + 1.0
    solution, converged = interior_point_qp(
        2 * full / scale, linear, eq_matrix, np.ones(1), ineq, np.zeros(m + 2), start
    )
    if not converged:
        warnings.warn(
            "FORUM's QP solver did not converge in 100 interior-point iterations; using its last "
            "iterate",
            RuntimeWarning,
            stacklevel=2,
        )
    weights = np.maximum(solution[:m], 0.0)
    weights = weights / weights.sum()
    return torch.from_numpy(weights).to(like), pi_tensor


@METHODS.register("forum")
class FORUM(BilevelWeighting):
    """FORUM: a first-order multi-gradient method for multi-objective bilevel optimisation (Ye,
    Lin, Cao, Zhang & Tsang, "A First-Order Multi-Gradient Algorithm for Multi-Objective Bi-Level
    Optimization", ECAI 2024), in its multi-task form (as the paper's code).

    Upper variables ``α`` (task weights ``s = softmax(α)``, initially ``1/m``), lower variables
    ``ω`` (the model); ``f(α, ω) = Σ_i s_i L_i(ω; batch)``, upper objectives
    ``F_j(ω) = L_j(ω; aux)`` for the primary tasks ``j``. The value function
    ``f*(α) = min_ω f(α, ω)`` turns the bilevel problem into the constrained multi-objective
    problem ``min F(α, ω) s.t. q(α, ω) = f(α, ω) - f*(α) ≤ 0``, with ``f*(α) ≈ f(α, ω^T)``:
    ``T`` gradient steps on ``f(α, ·)`` from the current ``ω`` (all the step's parameters, the
    training batch, the current ``s``), each with a backtracking line search::

        ω^{t+1} = ω^t - η_t ∇_ω f(α, ω^t),   η_t = the first of η_{t-1}, η_{t-1}/2, ... with
        f(α, ω^{t+1}) ≤ f(α, ω^t) - η_t/2 |∇_ω f(α, ω^t)|²     (η_{-1} = η = ``inner_lr``)

    (the descent lemma's decrease, guaranteed for ``η_t ≤ 1/L`` when ``f(α, ·)`` is ``L``-smooth,
    the step sizes the paper's analysis assumes; ``L`` of a trained network is not known and
    grows during training). So ``f(α, ω^T) ≤ f(α, ω)`` and the estimate of ``q`` is never
    negative. At each step, with ``z = (α, ω)``::

        ∇q = (∇_α f(α, ω) - ∇_α f(α, ω^T),  ∇_ω f(α, ω))       (∇_α f = (diag(s) - ssᵀ) L)
        g_j = (0, ∇_ω F_j / |∇_ω F_j|),   π_j = ρ - g_j·∇q / |∇q|²
        λ̃ = argmin_{λ ∈ Δ, ν ≥ max(0, πᵀλ)} |Σ λ_j g_j + ν ∇q|² - ν ρ |∇q|²    (:func:`forum_qp`)
        λ ← λ + β_e (λ̃ - λ),   β_e = (e + 1)^(-ema_power)  (e: completed epochs; λ starts at 0)
        ν = max(0, πᵀλ),   d = Σ_j λ_j g_j + ν ∇q
        α ← Adam(α, d_α = ν ∇_α q);   ω ← model optimizer(ω, d_ω)

    ``d`` decreases the constraint at rate ``ρ``: ``d·∇q ≥ ρ |∇q|²``. ``ν`` grows as ``|∇q|``
    shrinks, but ``|g_j| ≤ 1`` bounds it by ``ρ + 1/|∇q|``, so ``|ν ∇q| ≤ 1 + ρ |∇q|``. The
    model direction ``d_ω = Σ_j λ_j ∇_ω F_j/|∇_ω F_j| + ν Σ_i s_i ∇L_i(ω; batch)`` reaches the
    model optimizer through this method's :class:`WeightedLoss`: weights ``ν s`` (with ``s``
    before the ``α`` step, as in the paper's code) on the training losses, and an ``extra`` term
    linear in the step's parameters whose gradient is the upper-level part (so the update is
    exact on either gradient route). So, as in FORUM, the model also descends the auxiliary
    batch's normalised gradients. The weights logged for a step are ``ν s``: the training losses'
    share of the update; the upper-level part has the weights ``upper_weights`` (``λ``, on the
    normalised auxiliary gradients) and ``ν`` is in ``last_multiplier``.

    ``forward`` must follow a ``prepare`` (it consumes the upper-level part computed there).

    Differences from the paper's code:

    * The inner steps: there, ``T`` SGD steps of the fixed size ``η``, stopped when the weighted
      loss exceeds 1e5. Fixed-size gradient descent diverges once the sharpness of ``f(α, ·)``
      (the Hessian's largest eigenvalue) exceeds ``2/η``, and training sharpens the model: on
      MultiDigits (HPS, MLP, Adam 1e-3) it exceeds ``2/0.1`` within the first 40 steps and
      reaches about 550 by epoch 7. Then ``f(α, ω^T)`` reaches 1e2-1e20 times ``f(α, ω)`` (a
      negative estimate of ``q``), ``∇_α q`` (the softmax Jacobian times ``L(ω) - L(ω^T)``)
      follows, ``|∇q|²`` overflows and the hypergradient is NaN. Here the line search keeps
      every step a descent step; it starts at ``η`` in each ``prepare``. It is the
      algorithm and does not warn; a search that finds no decrease down to
      ``η_{t-1}·2^-40`` (only for a direction that is not a descent direction) stops the inner
      steps with a ``RuntimeWarning``. The accepted step size and the values ``f(α, ω^t)`` of
      the last ``prepare`` are in ``last_inner_lr`` and ``last_inner_values``.
    * All evaluations of ``f(α, ·)`` in a ``prepare`` replay the random numbers of the first
      (the same dropout mask, so the line search compares like with like; there each inner step
      draws new ones); they leave the global random state as the first one leaves it.
    * The model is trained on the training batch and the auxiliary batch of the step (there:
      two consecutive batches of the loader, half as many steps per epoch).

    Args:
        meta_lr: Adam learning rate of ``α`` (1e-3 in the paper's code).
        inner_lr: ``η``, the first (largest) step size of the inner steps approximating ``f*``
            (0.1, as for NYUv2 and Office in the paper's code with a model learning rate of
            1e-4; its QM9 runs, with 1e-3, use 0.01).
        inner_steps: ``T`` (5).
        rho: ``ρ ≥ 0``, the required rate of decrease of the constraint (0.1).
        ema_power: ``β_e = (e + 1)^(-ema_power)`` (0.75; 0 = no averaging of ``λ``).
        primary: indices of the tasks whose auxiliary losses are the upper-level objectives;
            ``None`` = all (the paper's multi-task setting).
    """

    line_search_halvings = 40  # the smallest inner step size tried is η_{t-1}·2^-40

    def __init__(
        self,
        meta_lr: float = 1e-3,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        rho: float = 0.1,
        ema_power: float = 0.75,
        primary: Sequence[int] | None = None,
    ) -> None:
        super().__init__(meta_lr, primary)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        if int(inner_steps) != inner_steps or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps}")
        self.inner_steps = int(inner_steps)
        self.rho = float(rho)
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        self.ema_power = float(ema_power)
        if not (math.isfinite(self.ema_power) and self.ema_power >= 0):
            raise ValueError(f"ema_power must be a finite number >= 0, got {ema_power}")
        self.upper_weights: Tensor | None
        self.register_buffer("upper_weights", None)
        self.epochs_done = 0
        self._pending: tuple[Tensor, list[nn.Parameter], Tensor] | None = None
        self.last_multiplier: float | None = None
        self.last_inner_lr: float | None = None
        self.last_inner_values: list[float] | None = None

    def _initial_upper(self) -> float:
        return 0.0

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        count = num_tasks if self.primary is None else len(self.primary)
        if self.upper_weights is None or self.upper_weights.numel() != count:
            self.upper_weights = torch.zeros(count)

    def reset(self) -> None:
        super().reset()
        if self.upper_weights is not None:
            with torch.no_grad():
                self.upper_weights.zero_()
        self.epochs_done = 0
        self._pending = None
        self.last_multiplier = None
        self.last_inner_lr = None
        self.last_inner_values = None

    def on_epoch_end(self, epoch: int) -> None:
        self.epochs_done += 1

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "epochs_done": self.epochs_done}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.epochs_done = int(state["epochs_done"])

    def task_weights(self) -> Tensor:
        return self._softmax_weights()

    def prepare(self, probe: StepProbe) -> None:
        from mtlkit.engine.jacobian import jacobian

        aux = self._aux_batch(probe)
        params = probe.parameters
        weights = self.task_weights()
        with ParameterSnapshot(params):
            rng = rng_state(rng_devices(params))  # the random numbers of every f(α, ·)
            losses = probe.losses(probe.batch)
            self._require_upper(losses.numel())
            s = weights.to(losses)
            start_losses = losses.detach()
            lower_gradient = flat_gradient((s * losses).sum(), params)  # ∇_ω f(α, ω)
            inner_losses = self._inner_descent(probe, s, start_losses, lower_gradient, rng)
        jac_s = softmax_jacobian(s)
        alpha_part = jac_s @ (start_losses - inner_losses)  # ∇_α q
        aux_losses = self._primary_list(probe.loss_list(aux))
        upper_jacobian = jacobian(aux_losses, params, retain_graph=False)
        norms = upper_jacobian.norm(dim=1, keepdim=True)
        upper_jacobian = upper_jacobian / (norms + FORUM_GUARD)
        qq = float(lower_gradient @ lower_gradient + alpha_part @ alpha_part)
        cross = upper_jacobian @ lower_gradient
        solution, pi = forum_qp(upper_jacobian @ upper_jacobian.T, cross, qq, self.rho)
        lam = self._update_upper_weights(solution)
        nu = max(float(lam.to(pi) @ pi), 0.0)
        self.last_multiplier = nu
        model_weights = (nu * s).detach()
        upper_part = lam.to(upper_jacobian) @ upper_jacobian
        self._pending = (model_weights, list(params), upper_part.detach())
        self._meta_step(nu * alpha_part)

    def _inner_descent(
        self,
        probe: StepProbe,
        s: Tensor,
        losses: Tensor,
        gradient: Tensor,
        rng: tuple[Tensor, list[Tensor]],
    ) -> Tensor:
        """``T`` line-searched gradient steps on ``f(α, ·) = Σ s_i L_i(·; batch)`` from the
        current parameters (``losses`` and ``gradient`` there); returns the task losses at
        ``ω^T`` and leaves the parameters there (the caller restores them). Every evaluation
        replays the random state ``rng``; the global random state is left as it was."""
        params = probe.parameters
        devices = rng_devices(params)
        value = float((s * losses).sum())
        if not math.isfinite(value):
            raise NonFiniteError(f"FORUM's weighted training loss is {value}")
        slack = 4 * torch.finfo(losses.dtype).eps  # rounding of the loss, relative
        lr = self.inner_lr
        values = [value]
        current: Tensor = losses.detach()
        with torch.random.fork_rng(devices=devices):
            for step in range(self.inner_steps):
                if not bool(torch.isfinite(gradient).all()):
                    raise NonFiniteError(
                        f"FORUM's lower-level gradient has NaN or infinite entries at inner "
                        f"step {step}"
                    )
                sq_norm = float(gradient @ gradient)
                origin = ParameterSnapshot(params)
                graph = step + 1 < self.inner_steps  # the next step needs the gradient
                accepted = False
                for halving in range(self.line_search_halvings + 1):
                    if halving:
                        origin.restore()
                        lr /= 2
                    shift_parameters(params, gradient, -lr)
                    set_rng_state(rng, devices)
                    with torch.set_grad_enabled(graph):
                        trial = probe.losses(probe.batch)
                    trial_value = float((s * trial.detach()).sum())
                    # NaN compares False: rejected
                    if trial_value <= value - 0.5 * lr * sq_norm + slack * abs(value):
                        accepted = True
                        break
                if not accepted:
                    origin.restore()
                    warnings.warn(
                        f"FORUM's inner line search found no decrease of the weighted training "
                        f"loss {value:.6g} down to the step size {lr:.3g} at inner step {step}; "
                        f"f* is approximated after {step} inner steps",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    break
                value, current = trial_value, trial.detach()
                values.append(value)
                if graph:
                    gradient = flat_gradient((s * trial).sum(), params)
        self.last_inner_lr = lr
        self.last_inner_values = values
        return current

    def _update_upper_weights(self, solution: Tensor) -> Tensor:
        if self.upper_weights is None:  # pragma: no cover - setup creates it
            raise RuntimeError("FORUM needs setup(m)")
        beta = (self.epochs_done + 1.0) ** (-self.ema_power)
        with torch.no_grad():
            self.upper_weights.add_(beta * (solution.to(self.upper_weights) - self.upper_weights))
        return self.upper_weights.detach().clone()

    def forward(self, losses: Tensor) -> WeightedLoss:
        check_losses(losses)
        self._require_upper(losses.numel())
        if self._pending is None:
            raise RuntimeError(
                "FORUM's update is decided by prepare(probe) before each step (the Trainer's "
                "strategies call it); forward was called without a new prepare"
            )
        weights, params, direction = self._pending
        self._pending = None
        extra = None
        offset = 0
        for p in params:
            piece = direction[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            term = (p * piece).sum()
            extra = term if extra is None else extra + term
        return WeightedLoss(weights.to(losses), extra)
