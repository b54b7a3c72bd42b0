"""GradVac: gradient vaccine, adaptive targets for the pairwise gradient similarities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mtlkit.methods.base import (
    Decision,
    GradientAggregator,
    Seeded,
    check_blocks,
    check_jacobian,
)
from mtlkit.methods.projection import random_orders
from mtlkit.methods.registry import METHODS
from mtlkit.methods.state import LazyBuffers

Grouping = Literal["blocks", "whole"]


@METHODS.register("gradvac")
class GradVac(Seeded, LazyBuffers, GradientAggregator):
    """Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

    Separately in each group ``k`` of columns (a layer, a parameter tensor, or the whole
    vector), for each task ``i`` and each other task ``j`` in a fresh random order, with
    ``g_i^PC`` starting at ``g_i`` and ``g_j`` the original gradient::

        φ_ij = cos(g_i^PC, g_j)
        if φ_ij < φ̂_ij:  g_i^PC ← g_i^PC + |g_i^PC| (φ̂_ij √(1-φ_ij²) - φ_ij √(1-φ̂_ij²))
                                              / (|g_j| √(1-φ̂_ij²)) · g_j
        φ̂_ij ← (1 - β) φ̂_ij + β φ_ij

    after which ``cos(g_i^PC, g_j) = φ̂_ij`` (the target before its update); the direction is
    ``Σ_i g_i^PC``. The targets ``φ̂`` (one per ordered pair and group, zero at the start, so
    that the first step is PCGrad's) are an exponential moving average of the observed
    similarities (eq. 3 of the paper), updated at every visit of the pair as in the paper and
    torchjd (LibMTL's current code updates them only when a correction is made). Undefined
    cosines (a zero gradient, or a corrected ``g_i^PC`` that is zero up to rounding: below
    ``1e-7`` of ``Σ_l |C_il| |g_l|``) count as 0 and are never corrected; a target is used at most
    ``1 - 1e-8`` (``φ̂ = 1`` would need an infinite correction).

    Groups: ``"blocks"`` uses the ``blocks`` the engine passes to ``forward`` (one per shared
    parameter tensor on the parameter route: LibMTL's ``all_matrix``, the paper's finest
    granularity); ``"whole"`` is one group (LibMTL's ``whole_model``); a sequence of integers
    groups consecutive blocks (e.g. ``[2, 2, 2]`` for three ``nn.Linear`` layers, weight and
    bias each: the paper's ``all_layer``). On the features route there is one block per feature
    tensor. The number of groups and tasks is fixed at the first call.

    Computed on per-group Gramians (``g_i^PC = C_i @ J_k``), vectorised over tasks and groups.
    With one group the direction is ``w @ J`` with ``w = Σ_i C_i`` (the decision's ``weights``);
    with several it is not a task weighting and the decision has no ``weights`` (the non-shared
    parameters then get ``Σ_i ∇L_i``, as in LibMTL).

    Args:
        beta: ``β ∈ (0, 1]``, the step of the moving average (LibMTL's default 0.5).
        grouping: ``"blocks"``, ``"whole"`` or group sizes in blocks, see above.
        generator: a seed or ``torch.Generator`` for the random orders; ``reset()`` restores it.
    """

    lazy_buffers = ("targets",)

    def __init__(
        self,
        beta: float = 0.5,
        grouping: Grouping | Sequence[int] = "blocks",
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if isinstance(grouping, str):
            if grouping not in ("blocks", "whole"):
                raise ValueError(
                    f"grouping must be 'blocks', 'whole' or group sizes, got {grouping!r}"
                )
        else:
            grouping = [int(g) for g in grouping]
            if not grouping or any(g <= 0 for g in grouping):
                raise ValueError(f"group sizes must be positive integers, got {grouping}")
        self.beta = float(beta)
        self.grouping = grouping
        self.seed_with(generator)
        self.register_buffer("targets", None)  # φ̂: [m, m, groups]
        self.last_order: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.clear_lazy_buffers()
        self.last_order = None

    def groups(self, blocks: Sequence[int] | None, n: int) -> list[int]:
        """The column counts of the groups, from the engine's ``blocks``."""
        sizes = check_blocks(blocks, n)
        if self.grouping == "whole":
            return [n]
        if self.grouping == "blocks":
            return sizes
        if sum(self.grouping) != len(sizes):
            raise ValueError(
                f"GradVac grouping {self.grouping} covers {sum(self.grouping)} blocks, "
                f"but the Jacobian has {len(sizes)}: {sizes}"
            )
        merged, start = [], 0
        for count in self.grouping:
            merged.append(sum(sizes[start : start + count]))
            start += count
        return merged

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        check_jacobian(jacobian, self)
        m, n = jacobian.shape
        sizes = self.groups(blocks, n)
        jac = jacobian.detach()
        pieces = jac.split(sizes, dim=1)
        gramians = torch.stack([p @ p.T for p in pieces]).to(torch.float64)  # [K, m, m]
        targets = self._targets(m, len(sizes), gramians)
        order = random_orders(m, self.rng.generator)
        coefficients = vaccinate(gramians, targets, order, self.beta)  # [K, m, m]
        self.last_order = order
        combined = coefficients.sum(dim=1).to(jac.dtype)  # [K, m]
        direction = torch.cat([w @ p for w, p in zip(combined, pieces)])
        return Decision(weights=combined[0] if len(sizes) == 1 else None, direction=direction)

    def _targets(self, m: int, groups: int, like: Tensor) -> Tensor:
        targets = self.targets
        if targets is None:
            targets = torch.zeros(m, m, groups, dtype=like.dtype, device=like.device)
            self.targets = targets
        elif targets.shape != (m, m, groups):
            raise ValueError(
                f"GradVac tracks {targets.shape[0]} tasks in {targets.shape[2]} group(s), got "
                f"{m} tasks in {groups}; call reset() between problems"
            )
        return targets


def vaccinate(gramians: Tensor, targets: Tensor, order: Tensor, beta: float) -> Tensor:
    """The GradVac coefficients ``C`` (``[K, m, m]``, ``g_i^PC = C[k, i] @ J_k``) for per-group
    Gramians ``[K, m, m]``; updates ``targets`` (``[m, m, K]``) in place.

    Row ``i`` visits the tasks ``order[i]`` in order (the same order in every group); all rows
    and groups are processed at once, since row ``i`` only depends on its own coefficients and
    the original gradients.
    """
    groups, m, _ = gramians.shape
    rows = torch.arange(m, device=gramians.device)
    order = order.to(gramians.device)
    coefficients = torch.eye(m, dtype=gramians.dtype, device=gramians.device).repeat(groups, 1, 1)
    norms = gramians.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # [K, m]
    cap = 1.0 - 1e-8
    for step in range(m - 1):
        partners = order[:, step]  # j for each row i
        inner = (coefficients * gramians[:, :, partners].transpose(1, 2)).sum(-1)  # [K, m]
        own = ((coefficients @ gramians) * coefficients).sum(-1).clamp_min(0).sqrt()
        # |g_i^PC| from the Gramian has an absolute error of about √eps · Σ_l |C_il| |g_l|:
        # below 1e-7 of that bound, g_i^PC is zero up to rounding and its cosine is undefined
        bound = (coefficients.abs() * norms[:, None, :]).sum(-1)
        other = norms[:, partners]
        defined = (own > 1e-7 * bound) & (other > 0)
        cosine = torch.where(defined, inner / torch.where(defined, own * other, 1.0), 0.0)
        cosine = cosine.clamp(-1.0, 1.0)
        target = targets[rows, partners].T  # [K, m]
        correct = defined & (cosine < target)
        goal = target.clamp(max=cap)
        root_goal = (1 - goal.square()).sqrt()
        step_size = (
            own
            * (goal * (1 - cosine.square()).sqrt() - cosine * root_goal)
            / torch.where(defined, other * root_goal, 1.0)
        )
        coefficients[:, rows, partners] += torch.where(correct, step_size, 0.0)
        targets[rows, partners] = ((1 - beta) * target + beta * cosine).T
    return coefficients
