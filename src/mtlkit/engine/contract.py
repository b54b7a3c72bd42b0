"""What the engine needs of a method, and what a method gives back.

The methods (:mod:`mtlkit.methods`) sit above the engine and implement this contract; the engine
never imports them. A method is an ``nn.Module`` with a ``kind``:

* ``kind == "loss"`` (a loss weighting): ``method(losses [m]) -> WeightedLoss``; the update is
  the gradient of ``Σ_i w_i L_i + extra`` for every parameter.
* ``kind == "gradient"`` (a gradient aggregator): ``method.aggregate(J [m, n], losses, blocks)
  -> Decision`` with the ``direction`` ``[n]`` set. An aggregator whose direction is ``w @ J``
  with ``w`` a function of the Gramian alone (``gramian_weighting = True``) also offers
  ``method.decide(G [m, m], losses) -> Decision`` with the ``weights`` set, so that the engine
  may skip the Jacobian (the Gramian route).
* ``method.protocol()`` names the parts of the step protocol the method depends on beyond one
  call (``before_step``, ``prepare``, ``after_step``, ``on_epoch_end``, ``extra_batches``):
  :func:`mtlkit.backward` refuses such a method, the step driver (:class:`mtlkit.Step`) runs them.

A :class:`Decision` is a value: the engine reads what the method decided from it, never from
attributes of the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor


@dataclass(frozen=True)
class SolverStatus:
    """How an iterative solver inside a method ended, for logs and counters.

    Attributes:
        solver: a short name of the solver (``"newton"``, ``"wolfe"``, ``"daqp"``, ...).
        converged: whether it met its tolerance.
        iterations: iterations taken.
        residual: the final residual, relative to the problem's scale where the method defines one.
        message: why it stopped, when it did not converge.
    """

    solver: str
    converged: bool
    iterations: int = 0
    residual: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Decision:
    """What a gradient aggregator decided for one step.

    Attributes:
        weights: ``[m]`` task weights ``w`` with ``direction = w @ J`` when the method has such
            weights, else ``None``.
        direction: the combined direction ``[n]`` (``None`` from ``decide``, the Gramian route,
            where the engine forms ``w @ J`` itself).
        head_weights: ``[m]`` weights of the task losses for the parameters that are not
            aggregated (the task heads), when the paper gives them other weights than the
            direction's (DB-MTL: ``1 / L_i``); ``None``: ``weights``, or ones when there are none.
        status: how the method's solver ended, if it has one.
    """

    weights: Tensor | None = None
    direction: Tensor | None = None
    head_weights: Tensor | None = None
    status: SolverStatus | None = None


@dataclass
class WeightedLoss:
    """What a loss weighting decides: task weights and an extra loss term.

    Attributes:
        weights: ``[m]``; may require grad (learnable weightings).
        extra: a scalar added to ``Σ w_i L_i`` (e.g. UW's log-variance regulariser), or ``None``.
    """

    weights: Tensor
    extra: Tensor | None = None

    def total(self, losses: Tensor) -> Tensor:
        """``Σ_i w_i L_i + extra``."""
        total = (self.weights * losses).sum()
        return total if self.extra is None else total + self.extra


class Reducer(Protocol):
    """Data parallelism and loss scaling between the per-task backward and the method
    (implemented by :class:`mtlkit.parallel.ddp.Reducer`)."""

    @property
    def passthrough(self) -> bool:
        """Whether the reducer changes nothing a method sees (one process, no loss scale)."""
        ...

    def aggregate(
        self, method: Any, jac: Tensor, losses: Tensor, inputs: Sequence[Tensor], features: bool
    ) -> Decision:
        """The method's decision on the global batch; the direction is this process's part."""
        ...
