"""Auto-Lambda (Liu, Johns & Davison, TMLR 2022): raw task weights trained on the loss of an
auxiliary batch after one virtual SGD step, by a finite-difference Hessian-vector product."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import StepProbe
from mtlkit.methods.bilevel.common import (
    BilevelWeighting,
    ParameterSnapshot,
    check_positive,
    flat_gradient,
    rng_devices,
    shift_parameters,
)
from mtlkit.methods.registry import METHODS


def central_difference(
    probe: StepProbe, batch: Any, direction: Tensor, radius: float = 0.01
) -> Tensor:
    """The directional derivatives ``J d`` (``[m]``) of the task losses on ``batch`` along the
    flat ``direction`` ``d``, by the central difference::

        (L(θ + ε d) - L(θ - ε d)) / (2 ε),   ε = radius / |d|

    (Auto-Lambda's finite-difference Hessian-vector product: ``∂/∂λ ∇_θ(Σ λ_i L_i)·d = J d``).
    Two forward passes without graph; both see the same random numbers (dropout), and the global
    random state is left untouched; the parameters are restored exactly. ``d = 0`` gives zeros.
    """
    norm = float(direction.norm())
    if not math.isfinite(norm):
        raise NonFiniteError("the finite-difference direction has NaN or infinite entries")
    parameters = probe.parameters
    devices = rng_devices(parameters)
    if norm == 0.0:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return torch.zeros_like(probe.losses(batch))
    eps = radius / norm
    with ParameterSnapshot(parameters) as snapshot, torch.no_grad():
        shift_parameters(parameters, direction, eps)
        with torch.random.fork_rng(devices=devices):
            plus = probe.losses(batch).detach()
        snapshot.restore()
        shift_parameters(parameters, direction, -eps)
        with torch.random.fork_rng(devices=devices):
            minus = probe.losses(batch).detach()
    return (plus - minus) / (2 * eps)


@METHODS.register("auto_lambda")
class AutoLambda(BilevelWeighting):
    """Auto-Lambda (Liu, Johns & Davison, "Auto-Lambda: Disentangling Dynamic Task
    Relationships", TMLR 2022).

    The task weights ``λ`` (raw, unconstrained: they may become negative, as in the paper's code)
    minimise the primary tasks' loss after one virtual SGD step of the model::

        θ' = θ - lr ∇_θ Σ_i λ_i L_i(θ; batch)
        min_λ  L_up(θ') = Σ_{i ∈ primary} L_i(θ'; aux)
        ∂L_up/∂λ_i = -lr ∇L_i(θ; batch) · ∇L_up(θ')
                   ≈ -lr (L_i(θ⁺; batch) - L_i(θ⁻; batch)) / (2ε),
        θ± = θ ± ε ∇L_up(θ'),  ε = 0.01 / |∇L_up(θ')|

    (:func:`central_difference`: two forward passes instead of a Jacobian), then one Adam step on
    ``λ`` (lr ``meta_lr``); the model step uses ``Σ λ_i L_i`` (with ``init = 0.1`` the model's
    effective learning rate starts at a tenth of ``EW``'s, as in the paper's code). ``lr`` is the
    model optimizer's
    learning rate (``probe.learning_rate``, the scheduler's current value, as in the paper's
    code). ``primary`` = all tasks is the multi-task setting; a subset is auxiliary learning.

    Differences from the paper's code: the virtual step is plain SGD (its code adds the SGD
    optimizer's momentum buffer and weight decay; the probe does not expose optimizer state);
    the auxiliary batch is drawn from a separately shuffled stream over the training split, as
    there.

    Args:
        primary: indices of the primary tasks; ``None`` = all (multi-task learning).
        init: initial value of every ``λ_i`` (0.1 in the paper's code).
        meta_lr: Adam learning rate of ``λ`` (1e-4 for dense prediction, 3e-4 for CIFAR-100 in
            the paper's code).
        radius: ``ε |∇L_up|`` of the finite difference (0.01).
    """

    def __init__(
        self,
        primary: Sequence[int] | None = None,
        init: float = 0.1,
        meta_lr: float = 1e-4,
        radius: float = 0.01,
    ) -> None:
        super().__init__(meta_lr, primary)
        self.init = float(init)
        if not math.isfinite(self.init):
            raise ValueError(f"init must be finite, got {init}")
        self.radius = check_positive("radius", radius)

    def _initial_upper(self) -> float:
        return self.init

    def task_weights(self) -> Tensor:
        return self._require_upper()

    def prepare(self, probe: StepProbe) -> None:
        aux = self._aux_batch(probe)
        lam = self._require_upper()
        params = probe.parameters
        lr = probe.learning_rate
        with ParameterSnapshot(params):
            losses = probe.losses(probe.batch)
            self._require_upper(losses.numel())
            gradient = flat_gradient((lam.to(losses) * losses).sum(), params)
            shift_parameters(params, gradient, -lr)  # θ'
            upper_loss = self._primary_losses(probe.losses(aux)).sum()
            upper_gradient = flat_gradient(upper_loss, params)
        products = central_difference(probe, probe.batch, upper_gradient, self.radius)
        self._meta_step(-lr * products)
