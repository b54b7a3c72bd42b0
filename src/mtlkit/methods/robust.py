"""Byzantine-robust aggregators from distributed learning: coordinate-wise trimmed mean and Krum.

They treat the task gradients as possibly corrupted votes: a few outlying gradients (``f`` of
them) cannot drag the direction arbitrarily far. Krum needs only pairwise distances, which the
Gramian gives (``|g_i - g_j|² = G_ii + G_jj - 2 G_ij``), so it is a Gramian weighting; the trimmed
mean works coordinate by coordinate and needs the Jacobian.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import Decision, GradientAggregator, GramianWeighting
from mtlkit.methods.basic import check_finite_gramian
from mtlkit.methods.registry import METHODS


@METHODS.register("trimmed_mean")
class TrimmedMean(GradientAggregator):
    """Coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).

    For every coordinate ``k``, the ``trim_number`` largest and the ``trim_number`` smallest of
    the values ``J[0, k], ..., J[m-1, k]`` are removed and the remaining ``m - 2 t`` averaged::

        d_k = mean(sort(J[:, k])[t : m - t]).

    The paper states it with a fraction ``β = t / m``; torchjd's ``TrimmedMean(trim_number)``
    takes the count, as here. The direction is not a weighting of the rows (each coordinate keeps
    other rows), so the decision has no ``weights`` and the engine gives the task heads the gradient
    of the plain sum of the losses.

    Args:
        trim_number: ``t ≥ 0``, the number of values removed at each end of every coordinate; the
            number of tasks must be at least ``2 t + 1``. ``t = 0`` is the mean.
    """

    def __init__(self, trim_number: int = 1) -> None:
        super().__init__()
        if isinstance(trim_number, bool) or int(trim_number) != trim_number or trim_number < 0:
            raise ValueError(f"trim_number must be an integer >= 0, got {trim_number!r}")
        self.trim_number = int(trim_number)

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        if jacobian.dim() != 2:
            raise ValueError(f"expected a Jacobian [m, n], got shape {tuple(jacobian.shape)}")
        m, t = jacobian.shape[0], self.trim_number
        if m < 2 * t + 1:
            raise ValueError(
                f"TrimmedMean(trim_number={t}) needs at least 2 * trim_number + 1 = {2 * t + 1} "
                f"tasks, got {m}"
            )
        if not bool(torch.isfinite(jacobian).all()):
            raise NonFiniteError("TrimmedMean got a Jacobian with NaN or infinite entries")
        # sorted even for t = 0: the result is then exactly independent of the task order
        return Decision(direction=jacobian.sort(dim=0).values[t : m - t].mean(dim=0))


KrumScore = Literal["squared", "distance"]


@METHODS.register("krum")
class Krum(GramianWeighting):
    """Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).

    With ``f = n_byzantine``, the score of gradient ``i`` is the sum of its squared distances to
    its ``m - f - 2`` nearest other gradients::

        s(i) = Σ_{j ∈ N_i} |g_i - g_j|²,   N_i = the m - f - 2 closest g_j, j ≠ i,

    and the direction is the mean of the ``n_selected`` gradients of lowest score (``n_selected
    = 1``: Krum, the single gradient ``g_{argmin s}``; more: Multi-Krum), i.e. weights
    ``1 / n_selected`` on the selected tasks and 0 elsewhere. Distances come from the Gramian,
    ``|g_i - g_j|² = G_ii + G_jj - 2 G_ij`` (clamped at 0 against rounding). Ties in the scores go
    to the lower task index. The paper's guarantee needs ``m > 2 f + 2``; the computation only
    needs ``m ≥ f + 3`` (at least one neighbour), which is what is enforced.

    Args:
        n_byzantine: ``f ≥ 0``, the number of gradients that may be adversarial.
        n_selected: how many gradients of lowest score are averaged (``1 ≤ n_selected ≤ m``).
        score: ``"squared"`` (the paper: sum of squared distances) or ``"distance"`` (sum of
            distances, torchjd's ``Krum``; the selections may differ).
    """

    def __init__(
        self, n_byzantine: int = 1, n_selected: int = 1, score: KrumScore = "squared"
    ) -> None:
        super().__init__()
        for name, value, low in (("n_byzantine", n_byzantine, 0), ("n_selected", n_selected, 1)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if score not in ("squared", "distance"):
            raise ValueError(f"score must be 'squared' or 'distance', got {score!r}")
        self.n_byzantine = int(n_byzantine)
        self.n_selected = int(n_selected)
        self.score = score
        self.last_scores: Tensor | None = None

    def scores(self, gramian: Tensor) -> Tensor:
        """The Krum score ``s(i)`` of every task (``[m]``) from the Gramian."""
        check_finite_gramian(gramian, self)
        m = gramian.shape[0]
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Krum(n_byzantine={self.n_byzantine}) needs at least n_byzantine + 3 = "
                f"{self.n_byzantine + 3} tasks, got {m}"
            )
        if m < self.n_selected:
            raise ValueError(f"Krum(n_selected={self.n_selected}) got only {m} tasks")
        norms = gramian.diagonal()
        squared = (norms[:, None] + norms[None, :] - 2 * gramian).clamp_min(0)
        distances = squared if self.score == "squared" else squared.sqrt()
        distances = distances.fill_diagonal_(torch.inf)
        nearest = distances.sort(dim=1).values[:, : m - self.n_byzantine - 2]
        return nearest.sum(dim=1)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        scores = self.scores(gramian.detach())
        selected = scores.sort(stable=True).indices[: self.n_selected]
        weights = torch.zeros_like(scores)
        weights[selected] = 1.0 / self.n_selected
        self.last_scores = scores
        return weights
