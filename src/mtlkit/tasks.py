"""The :class:`Task`: what a task is called, how its loss is computed and how it is measured."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mtlkit.metrics import Metric, delta_m, delta_p

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Task:
    """One task of a multi-task problem.

    Args:
        name: the key of this task in the model's output and in the targets.
        loss: ``loss(output, target) -> scalar tensor`` (mean over the batch).
        metrics: factories of the metric accumulators of this task, by name, e.g.
            ``{"acc": Accuracy}``. Each metric knows whether higher is better.
        weight: weight of this task in the mean over tasks (LibMTL's Δp; 1 by default).
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


DELTA_M_LABEL = "Nash-MTL, FAMO: the mean over all metrics, lower is better"
DELTA_P_LABEL = "LibMTL: the mean over tasks of each task's mean, higher is better"


def baseline_deltas(
    results: Mapping[str, Mapping[str, float]],
    tasks: Sequence[Task],
    baseline: Mapping[str, Mapping[str, float]],
) -> tuple[float, float]:
    """``(Δm%, Δp)`` of ``results`` against ``baseline`` over the tasks' metrics (losses left
    out): Nash-MTL's and FAMO's Δm% (:func:`~mtlkit.metrics.delta_m`, lower is better) and
    LibMTL's Δp (:func:`~mtlkit.metrics.delta_p`, higher is better, tasks weighted by
    ``Task.weight``)."""
    metrics = {t.name: {m: results[t.name][m] for m in t.metrics} for t in tasks}
    directions = {t.name: t.higher_is_better() for t in tasks}
    weights = {t.name: t.weight for t in tasks}
    return (
        delta_m(metrics, baseline, directions, mode="flat"),
        delta_p(metrics, baseline, directions, task_weights=weights),
    )
