"""Random loss weighting (RLW): fresh random task weights at every step."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlkit.methods.base import Seeded, WeightedLoss
from mtlkit.methods.registry import METHODS
from mtlkit.methods.weighting import TaskStateWeighting

Distribution = Literal[
    "normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli", "random_normal"
]
DISTRIBUTIONS = (
    "normal",
    "uniform",
    "dirichlet",
    "bernoulli",
    "constrained_bernoulli",
    "random_normal",
)
F64 = torch.float64


@METHODS.register("rlw")
class RLW(Seeded, TaskStateWeighting):
    """Random loss weighting (Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022, Algorithm 1).

    At every step, weights ``w = f(λ̃)`` on the simplex (``w_i ≥ 0``, ``Σ w_i = 1``) from a
    fresh draw ``λ̃``, independent of the losses; the update is ``Σ_i w_i L_i``. The
    distributions of the paper (Section 3 and its code):

    * ``"normal"`` (the default): ``λ̃ ~ N(0, I)``, ``w = softmax(λ̃)``;
    * ``"uniform"``: ``λ̃_i ~ U(0, 1)``, ``w = softmax(λ̃)``;
    * ``"dirichlet"``: ``w ~ Dir(1, ..., 1)`` (uniform on the simplex);
    * ``"bernoulli"``: ``λ̃_i ~ Bernoulli(1/2)``, redrawn while all are 0, ``w = λ̃ / Σ λ̃``
      (a uniformly random non-empty subset of the tasks, equally weighted);
    * ``"constrained_bernoulli"``: one task drawn uniformly gets weight 1, the others 0;
    * ``"random_normal"``: ``λ̃ ~ N(μ, diag(σ²))``, ``w = softmax(λ̃)``, with ``μ_i, σ_i ~
      U(0, 1)`` drawn once, when the number of tasks is known (saved with the state).

    Draws are made on the CPU in float64 from ``generator`` and cast to the losses' dtype and
    device, so a seed gives the same weights everywhere. (The paper's code scales the weights to
    sum to ``m`` in some variants; here they sum to 1, as in its Algorithm 1 and in LibMTL.)

    Args:
        distribution: one of the above.
        generator: a seed or ``torch.Generator``; ``reset()`` restores its state at construction
            (and redraws ``μ, σ`` from it). ``None``: fresh entropy, not restored.
        num_tasks: number of tasks; if ``None``, set by ``setup`` or by the first call.
    """

    size_key = "normal_mean"

    def __init__(
        self,
        distribution: Distribution = "normal",
        generator: torch.Generator | int | None = None,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__()
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}; got {distribution!r}"
            )
        self.distribution = distribution
        self.seed_with(generator)
        if num_tasks is not None:
            self.setup(num_tasks)

    def init_state(self, num_tasks: int) -> None:
        self.register_buffer("normal_mean", torch.zeros(num_tasks, dtype=F64))
        self.register_buffer("normal_std", torch.ones(num_tasks, dtype=F64))
        self._draw_normal_parameters()

    def _draw_normal_parameters(self) -> None:
        if self.distribution == "random_normal":
            m = self.normal_mean.numel()
            generator = self.rng.generator
            self.normal_mean.copy_(torch.rand(m, generator=generator, dtype=F64))
            self.normal_std.copy_(torch.rand(m, generator=generator, dtype=F64))

    def reset_state(self) -> None:
        self._draw_normal_parameters()

    def draw(self) -> Tensor:
        """One draw of the ``[m]`` weights, float64 on the CPU (the method must be set up)."""
        if self.num_tasks is None:
            raise RuntimeError("RLW needs the number of tasks: call setup(m) first")
        m, g = self.num_tasks, self.rng.generator
        if self.distribution == "normal":
            return torch.softmax(torch.randn(m, generator=g, dtype=F64), dim=0)
        if self.distribution == "uniform":
            return torch.softmax(torch.rand(m, generator=g, dtype=F64), dim=0)
        if self.distribution == "random_normal":
            noise = torch.randn(m, generator=g, dtype=F64)
            logits = self.normal_mean.cpu() + self.normal_std.cpu() * noise
            return torch.softmax(logits, dim=0)
        if self.distribution == "dirichlet":
            gammas = torch.empty(m, dtype=F64).exponential_(generator=g)  # Gamma(1, 1)
            return gammas / gammas.sum()
        if self.distribution == "bernoulli":
            while True:
                picks = torch.randint(0, 2, (m,), generator=g).to(F64)
                if bool(picks.any()):
                    return picks / picks.sum()
        weights = torch.zeros(m, dtype=F64)  # constrained_bernoulli
        weights[int(torch.randint(0, m, (1,), generator=g))] = 1.0
        return weights

    def forward(self, losses: Tensor) -> WeightedLoss:
        self.task_values(losses)
        return WeightedLoss(self.draw().to(dtype=losses.dtype, device=losses.device))
