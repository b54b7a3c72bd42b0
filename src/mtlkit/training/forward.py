"""One forward pass as the step driver sees it: a loss per task and, on the features route, the
shared representation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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

    def loss_list(self, tasks: Sequence[str]) -> list[Tensor]:
        return [self.losses[t] for t in tasks]

    def stacked(self, tasks: Sequence[str]) -> Tensor:
        return torch.stack(self.loss_list(tasks))


ComputeLosses = Callable[[Any], ForwardResult]


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
