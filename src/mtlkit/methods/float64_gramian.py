"""Gramian weightings that solve from a float64 Gramian whatever the Jacobian's dtype.

A float32 Gramian ``J Jᵀ`` carries a rounding error of about ``eps32 · |g_i| |g_j|`` per entry
(6e-8 of the largest squared norm): on degenerate cones (more tasks than the rank, rows nearly
positively dependent) that moves a null eigenvalue off zero and with it the dual cone, so the
UPGrad / DualProj directions of a float32 ``20 x 100`` Jacobian of rank 19 moved by up to 10%
(relative) under a row permutation. The products of two float32 numbers are exact in float64,
so ``J.double() @ J.double().T`` is the Gramian of the given float32 gradients to float64
rounding; the ``m x m`` solve is cheap, and the direction ``w @ J`` is formed in float64 too
(cancellation between conflicting rows would otherwise show float32's rounding, amplified).
Both are taken a block of columns at a time, so the extra memory is bounded
(:data:`COLUMN_BLOCK_ELEMENTS` float64 numbers), not ``m x n``.

The engine's Gramian route hands ``decide`` the Gramian it accumulated itself; only
``aggregate(J)`` (the Jacobian routes, and direct calls) goes through this.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from mtlkit.methods.base import Decision, GramianWeighting, check_jacobian

COLUMN_BLOCK_ELEMENTS = 1 << 23
"""Float64 numbers of ``J`` converted at once (64 MiB)."""


def _column_blocks(jacobian: Tensor) -> Iterator[Tensor]:
    width = max(1, COLUMN_BLOCK_ELEMENTS // max(1, jacobian.shape[0]))
    for start in range(0, jacobian.shape[1], width):
        yield jacobian[:, start : start + width].to(torch.float64)


def float64_gramian(jacobian: Tensor) -> Tensor:
    """``J Jᵀ`` (``[m, m]``, float64, on ``J``'s device) accumulated over column blocks."""
    m = jacobian.shape[0]
    gramian = torch.zeros(m, m, dtype=torch.float64, device=jacobian.device)
    for block in _column_blocks(jacobian):
        gramian.addmm_(block, block.T)
    return gramian


def float64_combination(weights: Tensor, jacobian: Tensor) -> Tensor:
    """``w @ J`` computed in float64 block by block, returned in ``J``'s dtype."""
    weights = weights.to(device=jacobian.device, dtype=torch.float64)
    parts = [weights @ block for block in _column_blocks(jacobian)]
    if not parts:
        return jacobian.new_zeros(jacobian.shape[1])
    return torch.cat(parts).to(jacobian.dtype)


class Float64GramianWeighting(GramianWeighting):
    """A :class:`~mtlkit.methods.base.GramianWeighting` whose ``aggregate(J)`` decides from the
    float64 Gramian of ``J`` and forms the direction in float64 (see the module docstring);
    the decision's weights come back in ``J``'s dtype."""

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        check_jacobian(jacobian, self)
        decision = self.decide(float64_gramian(jacobian), losses)
        direction = float64_combination(decision.weights, jacobian)
        return replace(decision, weights=decision.weights.to(jacobian.dtype), direction=direction)
