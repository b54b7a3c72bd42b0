"""One forward pass as the step driver sees it: a loss per task and, on the features route, the
shared representation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import ConfigError


@dataclass
class ForwardResult:
    """One forward pass: a loss per task and, in the features route, the shared
    representation(s) (one tensor, or one per task for multi-input models)."""

    losses: dict[str, Tensor]
    features: Tensor | list[Tensor] | None = None
    _floats: tuple[dict[str, Tensor], dict[str, float]] | None = field(
        default=None, repr=False, compare=False
    )

    def loss_list(self, tasks: Sequence[str]) -> list[Tensor]:
        return [self.losses[t] for t in tasks]

    def stacked(self, tasks: Sequence[str]) -> Tensor:
        return torch.stack(self.loss_list(tasks))

    def floats(self) -> dict[str, float]:
        """Each task's loss as a float (one stack and one read when they are scalars of one
        dtype, the usual case); read once per ``losses`` dict (the guard's check and the step's
        report share it)."""
        named = self.losses
        if self._floats is not None and self._floats[0] is named:
            return self._floats[1]
        losses = list(named.values())
        scalars = bool(losses)
        for v in losses:
            if v.dim() != 0 or v.dtype != losses[0].dtype:
                scalars = False
                break
        if len(losses) == 1 and scalars:  # a one-task group step: one read, no stack
            values = {t: v.item() for t, v in named.items()}
        elif scalars:
            values = dict(zip(named, torch.stack(losses).tolist()))
        else:
            values = {t: float(v.detach().float().sum()) for t, v in named.items()}
        self._floats = (named, values)
        return values


ComputeLosses = Callable[[Any], ForwardResult]


class SubsetLosses:
    """A ``compute_losses`` closure that can also compute the losses of some tasks only:
    ``losses(batch)`` gives every task's, ``losses.subset(tasks)`` is the closure of ``tasks``
    (a strategy that steps on a group of tasks, :class:`~mtlkit.training.strategies.Alternating`,
    then pays only for that group's heads and losses).

    Args:
        compute: ``(batch, tasks or None) -> ForwardResult`` with the losses of ``tasks``
            (every task for ``None``).
    """

    def __init__(self, compute: Callable[[Any, Sequence[str] | None], ForwardResult]) -> None:
        self.compute = compute
        self._subsets: dict[tuple[str, ...], ComputeLosses] = {}

    def __call__(self, batch: Any) -> ForwardResult:
        return self.compute(batch, None)

    def subset(self, tasks: Sequence[str]) -> ComputeLosses:
        key = tuple(tasks)
        closure = self._subsets.get(key)
        if closure is None:  # one closure per subset, kept (a group strategy asks every batch)
            if len(self._subsets) >= 64:  # groups resampled: forget the old ones
                self._subsets.clear()
            chosen = list(tasks)
            closure = self._subsets[key] = lambda batch: self.compute(batch, chosen)
        return closure


def restrict(compute_losses: ComputeLosses, tasks: Sequence[str]) -> ComputeLosses:
    """``compute_losses`` for ``tasks`` only when it is a :class:`SubsetLosses`; otherwise it is
    returned as is (its results hold every task's loss, of which the step uses ``tasks``)."""
    if isinstance(compute_losses, SubsetLosses):
        return compute_losses.subset(tasks)
    return compute_losses


def as_forward_result(value: Any, tasks: Sequence[str] | None = None) -> ForwardResult:
    """What a user's loss function returned, as a :class:`ForwardResult`: a ForwardResult, a
    mapping ``{task: loss}``, a sequence of scalar losses or a ``[m]`` tensor (tasks named by
    ``tasks``, or ``"0"``, ``"1"``, ... when ``tasks`` is ``None``).

    Raises:
        ConfigError: for anything else, or a number of losses that differs from ``tasks``.
    """
    if isinstance(value, ForwardResult):
        result = value
    elif isinstance(value, Mapping):
        result = ForwardResult(dict(value))
    elif isinstance(value, Tensor) and value.dim() == 1:
        result = ForwardResult(_named(list(value.unbind()), tasks))
    elif isinstance(value, Sequence) and all(isinstance(v, Tensor) for v in value):
        result = ForwardResult(_named(list(value), tasks))
    else:
        raise ConfigError(
            "the loss function must return a list of scalar task losses, a [m] tensor, a dict "
            f"{{task: loss}} or a mtlkit.ForwardResult; got {type(value).__name__}"
        )
    if tasks is not None and set(result.losses) != set(tasks):
        raise ConfigError(
            f"the loss function returned the tasks {list(result.losses)}; expected {list(tasks)}"
        )
    return result


def _named(losses: list[Tensor], tasks: Sequence[str] | None) -> dict[str, Tensor]:
    names = [str(i) for i in range(len(losses))] if tasks is None else list(tasks)
    if len(names) != len(losses):
        raise ConfigError(f"the loss function returned {len(losses)} losses for {len(names)} tasks")
    return dict(zip(names, losses))
