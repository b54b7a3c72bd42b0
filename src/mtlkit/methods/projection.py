"""Gradient-projection aggregators."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.methods.base import GramianWeighting, Seeded, check_gramian
from mtlkit.methods.registry import METHODS


def project_conflicts(gramian: Tensor, order: Tensor) -> Tensor:
    """The PCGrad coefficients ``C`` (``[m, m]``) with ``g_i^PC = C_i @ J``.

    Starting from ``g_i^PC = g_i``, for ``k = 0, 1, ...`` and ``j = order[i, k]``: if
    ``g_i^PC · g_j < 0``, then ``g_i^PC -= (g_i^PC · g_j) / |g_j|² g_j`` (projection against the
    original ``g_j``); zero gradients ``g_j`` are skipped. All rows are updated at once, on the
    Gramian only (``g_i^PC · g_j = C_i @ G[:, j]``).

    Args:
        gramian: ``[m, m]``, ``J Jᵀ``.
        order: ``[m, k]`` integer indices, row ``i`` the tasks to project ``g_i`` against, in order.
    """
    check_gramian(gramian)
    m = gramian.shape[0]
    if order.dim() != 2 or order.shape[0] != m:
        raise ValueError(f"expected an order [m={m}, k], got shape {tuple(order.shape)}")
    order = order.to(gramian.device)
    rows = torch.arange(m, device=gramian.device)
    squared_norms = gramian.diagonal()
    safe_norms = torch.where(squared_norms > 0, squared_norms, torch.ones_like(squared_norms))
    coefficients = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    for targets in order.T:
        inner = (coefficients * gramian[:, targets].T).sum(dim=1)
        conflict = (inner < 0) & (squared_norms[targets] > 0)
        step = torch.where(conflict, inner / safe_norms[targets], torch.zeros_like(inner))
        coefficients[rows, targets] -= step
    return coefficients


def random_orders(num_tasks: int, generator: torch.Generator) -> Tensor:
    """``[m, m-1]`` on the CPU: row ``i`` a uniformly random permutation of the tasks ``≠ i``."""
    ranks = torch.rand(num_tasks, num_tasks - 1, generator=generator).argsort(dim=1)
    return ranks + (ranks >= torch.arange(num_tasks)[:, None]).long()


@METHODS.register("pcgrad")
class PCGrad(Seeded, GramianWeighting):
    """Projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020).

    For each task ``i``, in a fresh random order of the other tasks ``j``::

        if g_i^PC · g_j < 0:   g_i^PC ← g_i^PC − (g_i^PC · g_j) / |g_j|² g_j

    (``g_i^PC`` starts at ``g_i``; ``g_j`` is the original gradient), and the direction is
    ``Σ_i g_i^PC`` (a sum, as in the paper's Algorithm 1). Computed on the Gramian only by
    :func:`project_conflicts`; the weights are ``C.sum(0)``. Zero gradients are never projected
    against. The orders used by the last call are in ``last_order`` (``[m, m-1]``).

    Args:
        generator: a seed or ``torch.Generator`` for the orders (drawn on the CPU); ``reset()``
            restores it to its state at construction. ``None``: fresh entropy, not restored.
    """

    def __init__(self, generator: torch.Generator | int | None = None) -> None:
        super().__init__()
        self.seed_with(generator)
        self.last_order: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.last_order = None

    def draw_order(self, num_tasks: int) -> Tensor:
        """``[m, m-1]`` on the CPU: row ``i`` a uniformly random permutation of the other tasks."""
        return random_orders(num_tasks, self.rng.generator)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        check_gramian(gramian)
        order = self.draw_order(gramian.shape[0])
        weights = project_conflicts(gramian.detach(), order).sum(dim=0)
        self.last_order = order
        return weights
