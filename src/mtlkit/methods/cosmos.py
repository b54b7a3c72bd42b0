"""COSMOS: one preference-conditioned model for the whole Pareto front."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlkit.methods.base import LossWeighting, Seeded, WeightedLoss
from mtlkit.methods.conditioning import PreferenceChannel
from mtlkit.methods.preference import IDEAL_HINT, check_min_loss, ideal_point, simplex_grid
from mtlkit.methods.registry import METHODS
from mtlkit.methods.weighting import checked_losses, require_above

F64 = torch.float64
DEFAULT_TEST_RAYS = 25
"""At least this many test rays by default (the paper's 25 for two objectives)."""


def default_ray_count(num_tasks: int) -> int:
    """The size of the smallest interior simplex lattice (:func:`simplex_grid`) with at least
    :data:`DEFAULT_TEST_RAYS` points: 25 rays for two tasks, 28 for three."""
    divisions = num_tasks
    while math.comb(divisions - 1, num_tasks - 1) < DEFAULT_TEST_RAYS:
        divisions += 1
    return math.comb(divisions - 1, num_tasks - 1)


@METHODS.register("cosmos")
class COSMOS(Seeded, LossWeighting):
    """COSMOS (Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective
    Learning", ICDM 2021, eq. 5 and Algorithm 1; defaults of the authors' Multi-MNIST config).

    Before each step a preference ray is drawn, ``r ~ Dir(α)``, and given to the model (the
    :class:`~mtlkit.methods.conditioning.PreferenceChannel` this method shares with a
    :class:`~mtlkit.architectures.conditioned.PreferenceConditioned` model, which appends ``r``
    to its input); the step minimises::

        Σ_i r_i L_i − λ cos(L − z, r),

    the linear scalarisation at ``r`` and a penalty on the angle between the loss vector and
    the ray (``z``: ``min_loss``, 0 in the paper). One model trained so spans the front: at test
    time it is evaluated at each of ``test_rays`` rays (the model given ``r``), one point each.
    Convention: the cosine term pulls the loss vector **along** ``r`` (``L − z ∝ r``), as in the
    paper; the other preference methods of mtlkit aim at ``L − z ∝ 1/p``.

    Without a conditioned model the method still trains (a Dirichlet-weighted sum with the
    penalty), but one unconditioned model cannot follow the ray.

    Args:
        alpha: Dirichlet concentration, one number or one per task (1.2 in the paper's
            Multi-MNIST runs; 1 is uniform on the simplex).
        lamda: the cosine penalty λ ≥ 0 (2 in the paper's Multi-MNIST runs; 0 is the
            conditioned linear scalarisation of Pareto HyperNetworks' PHN-LS).
        min_loss: the ideal point ``z`` below every loss (one number or one per task).
        test_rays: how many rays of the front are evaluated after training, spread evenly
            inside the simplex (:func:`~mtlkit.methods.preference.simplex_grid`); ``None``: 25
            for two tasks, 28 for three.
        generator: a seed or ``torch.Generator`` for the rays (the runner gives the run's
            seed); the state is saved with the method.
    """

    conditions_model: ClassVar[bool] = True

    def __init__(
        self,
        alpha: float | Sequence[float] = 1.2,
        lamda: float = 2.0,
        min_loss: float | Sequence[float] = 0.0,
        test_rays: int | None = None,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)
        if not (math.isfinite(lamda) and lamda >= 0):
            raise ValueError(f"lamda (the cosine penalty) must be >= 0 and finite, got {lamda}")
        self.lamda = float(lamda)
        self.min_loss = check_min_loss(min_loss)
        if test_rays is not None and (isinstance(test_rays, bool) or int(test_rays) < 1):
            raise ValueError(f"test_rays must be a count >= 1 or None, got {test_rays!r}")
        self.test_rays = None if test_rays is None else int(test_rays)
        self.seed_with(generator)
        self.channel: PreferenceChannel | None = None

    def setup(self, num_tasks: int) -> None:
        if self.channel is not None and self.channel.num_tasks == num_tasks:
            return
        super().setup(num_tasks)
        if isinstance(self.alpha, list) and len(self.alpha) != num_tasks:
            raise ValueError(
                f"COSMOS has alpha for {len(self.alpha)} tasks, but there are {num_tasks}"
            )
        ideal_point(self.min_loss, num_tasks, self)
        count = default_ray_count(num_tasks) if self.test_rays is None else self.test_rays
        try:
            rays = simplex_grid(num_tasks, count)
        except ValueError as error:
            raise ValueError(f"COSMOS test_rays: {error}") from error
        self.channel = PreferenceChannel(num_tasks, rays)

    def before_step(self, step: int) -> None:
        if self.channel is None:
            raise RuntimeError("COSMOS needs the number of tasks: call setup(m) first")
        self.channel.draw_for_step(self.draw())

    def draw(self) -> Tensor:
        """One ray ``r ~ Dir(α)`` (float64 ``[m]``), from NumPy's Dirichlet sampler seeded by a
        draw of this method's generator (so the generator's state determines every ray)."""
        m = self.channel.num_tasks if self.channel is not None else self.num_tasks
        seed = int(torch.randint(0, 2**62, (1,), generator=self.rng.generator))
        alpha = self.alpha if isinstance(self.alpha, list) else [self.alpha] * m
        ray = np.random.default_rng(seed).dirichlet(alpha)
        return torch.from_numpy(ray)

    def forward(self, losses: Tensor) -> WeightedLoss:
        if self.channel is None:
            self.setup(losses.numel())
        values = checked_losses(losses, self)
        ideal = ideal_point(self.min_loss, values.numel(), self).to(values)
        require_above(values, ideal, self, IDEAL_HINT)
        ray = self.channel.current(training=True).to(dtype=losses.dtype, device=losses.device)
        gaps = losses - ideal.to(losses.dtype)
        cosine = torch.nn.functional.cosine_similarity(gaps, ray, dim=0, eps=1e-8)
        return WeightedLoss(ray, extra=-self.lamda * cosine)

    def reset(self) -> None:
        super().reset()
        if self.channel is not None:
            self.channel.clear()


def _check_alpha(alpha: float | Sequence[float]) -> float | list[float]:
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        values = [float(alpha)]
    elif isinstance(alpha, Sequence) and not isinstance(alpha, (str, bytes)) and alpha:
        values = [float(a) for a in alpha]
    else:
        raise ValueError(f"alpha must be a number > 0 or one per task, got {alpha!r}")
    if not all(math.isfinite(a) and a > 0 for a in values):
        raise ValueError(f"alpha (the Dirichlet concentration) must be > 0, got {alpha!r}")
    return values[0] if isinstance(alpha, (int, float)) else values
