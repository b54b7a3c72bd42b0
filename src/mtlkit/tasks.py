"""The :class:`Task`: what a task is called, how its loss is computed and how it is measured."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from mtlkit.metrics import Metric

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Task:
    """One task of a multi-task problem.

    Args:
        name: the key of this task in the model's output and in the targets.
        loss: ``loss(output, target) -> scalar tensor`` (mean over the batch).
        metrics: factories of the metric accumulators of this task, by name, e.g.
            ``{"acc": Accuracy}``. Each metric knows whether higher is better.
        weight: weight of this task in Δm% (1 by default).
    """

    name: str
    loss: LossFn
    metrics: Mapping[str, Callable[[], Metric]] = field(default_factory=dict)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a task name must be a non-empty string, got {self.name!r}")

    def new_metrics(self) -> dict[str, Metric]:
        """Fresh accumulators, one per metric of this task."""
        return {name: make() for name, make in self.metrics.items()}

    def higher_is_better(self) -> dict[str, bool]:
        """Whether higher is better, for each metric of this task."""
        return {name: metric.higher_is_better for name, metric in self.new_metrics().items()}
