"""Smooth Tchebycheff scalarisation (STCH) with a warm-up estimate of the nadir point."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.methods.base import WeightedLoss
from mtlkit.methods.preference import check_preference, preference_vector
from mtlkit.methods.registry import METHODS
from mtlkit.methods.weighting import (
    POSITIVE_HINT,
    TaskStateWeighting,
    log_loss_weights,
    require_above,
)

F64 = torch.float64


def stch_weights(
    values: Tensor, nadir: Tensor, mu: float, preference: Tensor | None = None
) -> Tensor:
    """The gradient-equivalent weights ``∂F/∂L_i = m · softmax(λ ⊙ f / μ)_i · λ_i / L_i`` of
    ``F = m · μ · logsumexp(λ ⊙ f / μ)`` with ``f_i = log(L_i / z_i)`` (all positive) and
    ``λ = m p`` for the normalised preference ``p`` (``None``: ``λ = 1``, the authors' code)."""
    normalized = (values / nadir).log()
    if preference is None:
        return values.numel() * torch.softmax(normalized / mu, dim=0) / values
    scale = values.numel() * preference.to(values)
    return values.numel() * torch.softmax(scale * normalized / mu, dim=0) * scale / values


@METHODS.register("stch")
class STCH(TaskStateWeighting):
    """Smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024), as the authors run it for
    multi-task learning (``Xi-L/STCH``, ``STCH_MTL/LibMTL/weighting/STCH.py``).

    The Tchebycheff scalarisation ``max_i (L_i - z_i)`` smoothed with parameter ``μ`` is
    ``μ log Σ_i exp((L_i - z_i) / μ)``; for multi-task learning the authors apply it to
    log-normalised losses ``f_i = log(L_i / z_i)``, where ``z`` is the nadir point, the mean
    training loss of each task over one estimation epoch::

        F = m · μ · log Σ_i exp(f_i / μ)   (the m as in their code).

    Phases, counted in completed epochs ``e`` (``on_epoch_end``, which the strategies call; an
    epoch in which the method saw no losses is not counted, with a warning):

    * ``e < warmup_epochs``: warm-up on ``Σ_i log L_i`` (weights ``1 / L_i``), as in their code;
    * ``e = warmup_epochs``: the same objective, and the losses are averaged into ``z``;
    * ``e > warmup_epochs``: STCH with ``z`` fixed.

    The returned weights are always the gradient-equivalent ones (detached): during STCH
    ``w_i = m · softmax(f / μ)_i / L_i``, so ``Σ_i w_i L_i`` has exactly the gradient of ``F``;
    they concentrate on the task farthest above its nadir as ``μ → 0``.

    With a ``preference`` ``p`` (normalised to sum 1), the paper's weighted form
    ``μ log Σ_i exp(λ_i f_i / μ)`` is used with ``λ = m p``, so that the uniform preference is the
    authors' code exactly; as for :class:`~mtlkit.methods.preference.Tchebycheff` (its limit
    ``μ → 0``), a larger ``p_i`` asks for a smaller ``L_i`` (the ray ``p_i f_i`` equal).

    Args:
        mu: smoothing ``μ > 0`` (1 in the authors' code).
        warmup_epochs: epochs before the nadir-estimation epoch (4 in the authors' code; 0 makes
            the first epoch the estimation epoch).
        num_tasks: number of tasks; if ``None``, set by ``setup`` or by the first call.
        preference: ``p_i > 0`` per task (normalised to sum 1), used in the STCH phase (the
            warm-up is the authors' unweighted one); ``None``: unweighted.

    Raises:
        ConfigError: (a ``ValueError``) if a loss is ``≤ 0`` (both objectives take its log).
    """

    size_key = "nadir"

    def __init__(
        self,
        mu: float = 1.0,
        warmup_epochs: int = 4,
        num_tasks: int | None = None,
        preference: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.preference = check_preference(preference)
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"mu must be > 0 and finite, got {mu}")
        if isinstance(warmup_epochs, bool) or int(warmup_epochs) != warmup_epochs:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.mu = float(mu)
        self.warmup_epochs = int(warmup_epochs)
        if num_tasks is not None:
            self.setup(num_tasks)

    def init_state(self, num_tasks: int) -> None:
        preference_vector(self.preference, num_tasks, self)  # the count checked
        self.register_buffer("nadir", torch.ones(num_tasks, dtype=F64))
        self.register_buffer("nadir_sum", torch.zeros(num_tasks, dtype=F64))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    def reset_state(self) -> None:
        self.nadir.fill_(1.0)
        self.nadir_sum.zero_()
        self.epoch_steps.zero_()
        self.epochs.zero_()

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"nadir"`` (the estimation epoch) or ``"stch"``."""
        epochs = int(self.epochs) if self.num_tasks is not None else 0
        if epochs < self.warmup_epochs:
            return "warmup"
        return "nadir" if epochs == self.warmup_epochs else "stch"

    def forward(self, losses: Tensor) -> WeightedLoss:
        values = self.task_values(losses)
        require_above(values, 0.0, self, POSITIVE_HINT)
        phase = self.phase
        self.epoch_steps += 1
        if phase == "stch":
            p = None
            if self.preference is not None:
                p = preference_vector(self.preference, values.numel(), self).to(values.device)
            weights = stch_weights(values.to(F64), self.nadir, self.mu, p)
            return WeightedLoss(weights.to(losses.dtype))
        if phase == "nadir":
            self.nadir_sum += values.to(F64)
        return WeightedLoss(log_loss_weights(values))

    def on_epoch_end(self, epoch: int) -> None:
        if self.num_tasks is None:
            return
        if int(self.epoch_steps) == 0:
            warnings.warn(
                "STCH saw no losses during this epoch: the epoch is not counted",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if self.phase == "nadir":
            self.nadir.copy_(self.nadir_sum / self.epoch_steps)
        self.epochs += 1
        self.epoch_steps.zero_()
