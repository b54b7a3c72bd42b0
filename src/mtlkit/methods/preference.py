"""Preference-based scalarisations: exact weighted Tchebycheff and PBI (loss weightings).

Each takes a **preference** ``p`` (one positive number per task, normalised here to sum 1;
``None``: uniform) and an **ideal point** ``z`` (``min_loss``: a number below every loss the
task reaches, one number or one per task; 0 by default, for losses that are ``≥ 0``). The
convention is the same for every preference method of mtlkit (these, :class:`~mtlkit.methods.
epo.EPO` and :class:`~mtlkit.methods.stch.STCH`): a larger ``p_i`` asks for a smaller ``L_i``,
and the ray aimed at is ``p_i (L_i - z_i)`` equal for every task, i.e. ``L - z ∝ 1 / p``. A
sweep of preferences spread on the simplex (:func:`simplex_grid`) then traces a front.

The returned weights are the gradient-equivalent ones, ``w_i = ∂F/∂L_i`` (detached), so that
``Σ_i w_i L_i`` has exactly the gradient of the scalarisation ``F``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import torch
from torch import Tensor

from mtlkit.methods.base import LossWeighting, WeightedLoss
from mtlkit.methods.registry import METHODS
from mtlkit.methods.weighting import checked_losses, require_above

F64 = torch.float64

IDEAL_HINT = (
    "The scalarisation is taken from the ideal point min_loss, which must lie below every loss: "
    "set min_loss to a lower bound of each task's loss (for a loss that can be 0 or negative, a "
    "value below its minimum)."
)


def check_preference(preference: Sequence[float] | None) -> list[float] | None:
    """``preference`` as a list of floats, after checking that it is non-empty, finite and
    positive (``None`` stays ``None``: uniform).

    Raises:
        ValueError: naming the bad values.
    """
    if preference is None:
        return None
    if isinstance(preference, (str, bytes)) or not isinstance(preference, Sequence):
        raise ValueError(f"preference must be a list of numbers, one per task; got {preference!r}")
    values = [float(p) for p in preference]
    if not values:
        raise ValueError("preference is empty: give one positive number per task")
    if not all(math.isfinite(p) and p > 0 for p in values):
        raise ValueError(f"preference must hold finite numbers > 0, one per task; got {values}")
    return values


def check_min_loss(min_loss: float | Sequence[float]) -> float | list[float]:
    """``min_loss`` as a float or a list of floats, all finite."""
    if isinstance(min_loss, (int, float)) and not isinstance(min_loss, bool):
        if not math.isfinite(min_loss):
            raise ValueError(f"min_loss must be finite, got {min_loss}")
        return float(min_loss)
    if isinstance(min_loss, (str, bytes)) or not isinstance(min_loss, Sequence) or not min_loss:
        raise ValueError(f"min_loss must be a finite number or one per task, got {min_loss!r}")
    values = [float(v) for v in min_loss]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"min_loss must be finite, got {values}")
    return values


def preference_vector(preference: Sequence[float] | None, num_tasks: int, owner: object) -> Tensor:
    """``p / Σ p`` (float64, ``[num_tasks]``; uniform for ``None``).

    Raises:
        ValueError: if the preference has another number of entries than ``num_tasks``.
    """
    if preference is None:
        return torch.full((num_tasks,), 1.0 / num_tasks, dtype=F64)
    if len(preference) != num_tasks:
        raise ValueError(
            f"{type(owner).__name__} has a preference of {len(preference)} entries "
            f"({list(preference)}) for {num_tasks} tasks"
        )
    values = torch.tensor(preference, dtype=F64)
    return values / values.sum()


def ideal_point(min_loss: float | Sequence[float], num_tasks: int, owner: object) -> Tensor:
    """``min_loss`` as a ``[num_tasks]`` float64 tensor.

    Raises:
        ValueError: if a list has another number of entries than ``num_tasks``.
    """
    if isinstance(min_loss, float):
        return torch.full((num_tasks,), min_loss, dtype=F64)
    if len(min_loss) != num_tasks:
        raise ValueError(
            f"{type(owner).__name__} has {len(min_loss)} min_loss values for {num_tasks} tasks"
        )
    return torch.tensor(list(min_loss), dtype=F64)


def simplex_grid(num_tasks: int, count: int) -> list[list[float]]:
    """``count`` preference vectors evenly spread inside the simplex: the points ``n / H`` with
    integer ``n_i ≥ 1`` and ``Σ n_i = H`` (Das & Dennis's lattice, without its boundary, where
    a task would get preference 0), for the ``H`` that makes ``C(H - 1, m - 1) = count``.

    Two tasks: ``p_1 = k / (count + 1)`` for ``k = count, ..., 1`` (task 1's preference first
    decreasing). Three tasks: 1, 3, 6, 10, 15, ... vectors.

    Raises:
        ValueError: if no lattice has ``count`` interior points (naming the counts that do).
    """
    if num_tasks < 1 or count < 1:
        raise ValueError(f"need num_tasks >= 1 and count >= 1, got {num_tasks} and {count}")
    if num_tasks == 1:
        if count != 1:
            raise ValueError(f"one task has one preference vector, [1.0]; got count={count}")
        return [[1.0]]
    sizes = []
    divisions = num_tasks
    while True:
        size = math.comb(divisions - 1, num_tasks - 1)
        sizes.append(size)
        if size >= count:
            break
        divisions += 1
    if sizes[-1] != count:
        raise ValueError(
            f"no even grid of {count} preference vectors inside the simplex of {num_tasks} tasks; "
            f"valid counts: {', '.join(map(str, sizes[:-1]))}, {sizes[-1]}, ... (or list the "
            "vectors)"
        )
    points = []
    # Compositions of `divisions` into `num_tasks` parts >= 1: choose the cut points.
    for cuts in combinations(range(1, divisions), num_tasks - 1):
        bounds = (0, *cuts, divisions)
        points.append([(bounds[i + 1] - bounds[i]) / divisions for i in range(num_tasks)])
    points.sort(key=lambda p: [-x for x in p])
    return points


class PreferenceWeighting(LossWeighting):
    """Base of the preference scalarisations: the preference ``p`` (normalised) and the ideal
    point ``z``, checked against the number of tasks; :meth:`gaps` gives ``L - z`` checked
    ``> 0``."""

    def __init__(
        self, preference: Sequence[float] | None, min_loss: float | Sequence[float]
    ) -> None:
        super().__init__()
        self.preference = check_preference(preference)
        self.min_loss = check_min_loss(min_loss)

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        preference_vector(self.preference, num_tasks, self)
        ideal_point(self.min_loss, num_tasks, self)

    def gaps(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``(L - z, p)`` in float64 for the checked, detached ``losses``."""
        values = checked_losses(losses, self).to(F64)
        m = values.numel()
        ideal = ideal_point(self.min_loss, m, self).to(values.device)
        require_above(values, ideal, self, IDEAL_HINT)
        return values - ideal, preference_vector(self.preference, m, self).to(values.device)


@METHODS.register("tchebycheff")
class Tchebycheff(PreferenceWeighting):
    """Exact weighted Tchebycheff scalarisation (Bowman 1976; the Tchebycheff approach of
    MOEA/D, Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition", IEEE TEVC 2007, eq. 2)::

        F = max_i p_i (L_i - z_i),   w = p_k e_k,   k = argmax_i p_i (L_i - z_i),

    with ``p`` the normalised preference and ``z`` the ideal point. Every Pareto-optimal point
    is the minimiser of ``F`` for some ``p`` (the front need not be convex); the minimiser lies
    on the ray ``p_i (L_i - z_i)`` = const. The weights are a subgradient of ``F``: the task(s)
    farthest along the preference get all of it; at a tie the maximisers share it equally (the
    mean of the gradients of the active pieces, also a subgradient). Gradient descent on ``F``
    switches between the active tasks near the ray: see :class:`~mtlkit.methods.stch.STCH` for
    the smooth version.

    Args:
        preference: ``p_i > 0`` per task (normalised to sum 1); ``None``: uniform.
        min_loss: the ideal point ``z`` (below every loss), one number or one per task.

    Raises:
        ConfigError: (a ``ValueError``) if a loss is ``≤ z_i``.
    """

    def __init__(
        self, preference: Sequence[float] | None = None, min_loss: float | Sequence[float] = 0.0
    ) -> None:
        super().__init__(preference, min_loss)

    def forward(self, losses: Tensor) -> WeightedLoss:
        gaps, p = self.gaps(losses)
        scaled = p * gaps
        active = scaled == scaled.max()
        weights = torch.where(active, p, torch.zeros_like(p)) / active.sum()
        return WeightedLoss(weights.to(losses.dtype))


@METHODS.register("pbi")
class PBI(PreferenceWeighting):
    """Penalty-based boundary intersection (Zhang & Li, "MOEA/D: A Multiobjective Evolutionary
    Algorithm Based on Decomposition", IEEE TEVC 2007, Section II-C), with ``θ = 5`` as in the
    paper's experiments::

        F = d_1 + θ d_2,   d_1 = (L - z) · u,   d_2 = |L - z - d_1 u|,   u = λ / |λ|,

    ``d_1`` the distance along the reference direction ``λ``, ``d_2`` the distance from its
    line. With mtlkit's preference convention (see the module docstring) the reference
    direction is ``λ_i ∝ 1 / p_i``, the ray that Tchebycheff and EPO aim at for the same
    ``p`` (the paper writes the direction itself; give ``p_i = 1 / λ_i`` for its ``λ``). The
    weights are the gradient ``∂F/∂L = u + θ r / |r|``, ``r = L - z - d_1 u``; on the line
    (``r = 0``) they are ``u`` (a subgradient). They can be negative: the penalty pulls the
    losses towards the line from either side.

    Args:
        preference: ``p_i > 0`` per task; ``None``: uniform (direction ``(1, ..., 1)``).
        theta: the penalty ``θ ≥ 0`` (5 in the paper; 0 is a linear scalarisation along ``u``).
        min_loss: the ideal point ``z`` (below every loss), one number or one per task.

    Raises:
        ConfigError: (a ``ValueError``) if a loss is ``≤ z_i``.
    """

    def __init__(
        self,
        preference: Sequence[float] | None = None,
        theta: float = 5.0,
        min_loss: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__(preference, min_loss)
        if not (math.isfinite(theta) and theta >= 0):
            raise ValueError(f"theta must be >= 0 and finite, got {theta}")
        self.theta = float(theta)

    def distances(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``(d_1, d_2)`` at ``losses`` (float64 scalars)."""
        gaps, p = self.gaps(losses)
        u = pbi_direction(p)
        d1 = gaps @ u
        return d1, (gaps - d1 * u).norm()

    def forward(self, losses: Tensor) -> WeightedLoss:
        gaps, p = self.gaps(losses)
        u = pbi_direction(p)
        off = gaps - (gaps @ u) * u
        norm = off.norm()
        scale = float(gaps.abs().max())
        weights = u.clone()
        if float(norm) > 1e-12 * scale:
            weights = weights + self.theta * off / norm
        return WeightedLoss(weights.to(losses.dtype))


def pbi_direction(preference: Tensor) -> Tensor:
    """PBI's unit reference direction ``u ∝ 1 / p``."""
    inverse = preference.reciprocal()
    return inverse / inverse.norm()
