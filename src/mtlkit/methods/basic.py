"""Plain weightings of the task gradients: Mean, Sum, Constant, and random weighting (RGW).

All are :class:`~mtlkit.methods.base.GramianWeighting` s whose weights do not depend on the
Gramian, so the engine may combine the gradients by one weighted backward. As aggregators they
give the same direction as the corresponding loss weightings (``Sum`` and ``EW()``, ``Mean`` and
``EW("mean")``, ``Constant`` and a fixed weighted sum) but go through the gradient route: they are
the baselines for the cost of that route and the building blocks of compositions
(:class:`~mtlkit.methods.smoothing.Smoothed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import GramianWeighting, Seeded, check_gramian
from mtlkit.methods.registry import METHODS


def check_finite_gramian(gramian: Tensor, method: object) -> None:
    """Raise ``ValueError`` unless ``gramian`` is square, :class:`NonFiniteError` if it has NaN or
    infinite entries (naming ``method``'s class)."""
    check_gramian(gramian)
    if not bool(torch.isfinite(gramian).all()):
        raise NonFiniteError(f"{type(method).__name__} got a Gramian with NaN or infinite entries")


@METHODS.register("mean")
class Mean(GramianWeighting):
    """The mean of the task gradients: ``w_i = 1/m``, ``d = (1/m) Σ_i g_i``.

    The direction of the averaged objective (``EW(reduction="mean")``), as an aggregator.
    """

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        check_finite_gramian(gramian, self)
        m = gramian.shape[0]
        weights = torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
        return weights


@METHODS.register("sum")
class Sum(GramianWeighting):
    """The sum of the task gradients: ``w_i = 1``, ``d = Σ_i g_i``.

    The direction of the summed objective (``EW()``, the default), as an aggregator.
    """

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        check_finite_gramian(gramian, self)
        weights = torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        return weights


@METHODS.register("constant")
class Constant(GramianWeighting):
    """Fixed, user-given weights: ``d = Σ_i w_i g_i``.

    Args:
        weights: one finite weight per task (any sign); the number of tasks must match at each
            call.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        values = [float(w) for w in weights]
        if not values:
            raise ValueError("weights must hold one weight per task, got an empty list")
        if not all(math.isfinite(w) for w in values):
            raise ValueError(f"weights must be finite, got {values}")
        self.values = values

    def hparams(self) -> dict[str, object]:
        return {"weights": self.values}

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        check_finite_gramian(gramian, self)
        if gramian.shape[0] != len(self.values):
            raise ValueError(
                f"Constant has {len(self.values)} weights, got {gramian.shape[0]} tasks"
            )
        weights = torch.tensor(self.values, dtype=gramian.dtype, device=gramian.device)
        return weights


@METHODS.register("rgw")
class RGW(Seeded, GramianWeighting):
    """Random gradient weighting (Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

    At every call, fresh weights on the simplex::

        λ̃ ~ N(0, I_m),   w = softmax(λ̃),   d = Σ_i w_i g_i,

    the paper's default distribution (its Algorithm 2, "RGW"; LibMTL's ``RGW`` and torchjd's
    ``Random`` draw the same). The draw is independent of the gradients. The normal draw is made on
    the CPU in float64 from ``generator`` and the weights are then cast to the Gramian's dtype and
    device, so a seed gives the same weights on every device and dtype.

    Args:
        generator: a seed or ``torch.Generator``; ``reset()`` restores its state at construction.
            ``None``: fresh entropy, not restored.
    """

    def __init__(self, generator: torch.Generator | int | None = None) -> None:
        super().__init__()
        self.seed_with(generator)

    def draw(self, num_tasks: int) -> Tensor:
        """``softmax(λ̃)``, ``λ̃ ~ N(0, I)``: ``[num_tasks]`` float64 weights on the CPU."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        logits = torch.randn(num_tasks, generator=self.rng.generator, dtype=torch.float64)
        return torch.softmax(logits, dim=0)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        check_finite_gramian(gramian, self)
        weights = self.draw(gramian.shape[0]).to(dtype=gramian.dtype, device=gramian.device)
        return weights


@METHODS.register("random")
class Random(RGW):
    """torchjd's name for :class:`RGW` (``torchjd.aggregation.Random``, "algorithm 2 of" Lin et
    al., 2022): the same method, kept under this name so that configurations written for torchjd
    find it. Weights ``softmax(λ̃)``, ``λ̃ ~ N(0, I)`` at every call; see :class:`RGW`."""
