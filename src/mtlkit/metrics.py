"""Task metrics as accumulators, and the multi-task performance drop Δm%.

Accumulators keep sums, not means, so that a metric over several batches of unequal size equals
the metric over their concatenation. Each declares whether higher is better, which Δm% needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal

import torch

from mtlkit.errors import MtlkitError


class Metric:
    """An accumulator: ``update(output, target)`` per batch, then ``compute()``."""

    higher_is_better: ClassVar[bool]

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        if self.count == 0:
            raise MtlkitError(f"{type(self).__name__}.compute() called before any update()")
        return self.total / self.count

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_same_shape(output: torch.Tensor, target: torch.Tensor, metric: str) -> None:
    if output.shape != target.shape:
        raise MtlkitError(
            f"{metric}: output shape {tuple(output.shape)} != target shape {tuple(target.shape)}"
        )


class Accuracy(Metric):
    """Fraction of correct class predictions; ``output`` holds logits ``[B, C, ...]``,
    ``target`` class indices ``[B, ...]``. Targets equal to ``ignore_index`` are not counted."""

    higher_is_better = True

    def __init__(self, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index
        super().__init__()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.dim() != target.dim() + 1 or output.shape[2:] != target.shape[1:]:
            raise MtlkitError(
                f"Accuracy: expected logits [B, C, ...] and targets [B, ...], got "
                f"{tuple(output.shape)} and {tuple(target.shape)}"
            )
        correct = output.argmax(dim=1) == target
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            correct = correct[keep]
        self.total += int(correct.sum())
        self.count += correct.numel()


class MeanAbsoluteError(Metric):
    """Mean absolute error over all elements."""

    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_same_shape(output, target, "MeanAbsoluteError")
        self.total += float((output.detach() - target).abs().double().sum())
        self.count += target.numel()


class MeanSquaredError(Metric):
    """Mean squared error over all elements."""

    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_same_shape(output, target, "MeanSquaredError")
        self.total += float((output.detach() - target).double().pow(2).sum())
        self.count += target.numel()


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
    mode: Literal["flat", "task_mean"] = "flat",
    task_weights: Mapping[str, float] | None = None,
) -> float:
    """Multi-task performance drop against a baseline, in percent (lower is better).

    ``mode="flat"`` (Nash-MTL, FAMO): the mean over all K metrics of all tasks,
    ``Δm = 100/K · Σ_k (−1)^{h_k} (M_k − B_k) / |B_k|`` with ``h_k = 1`` when higher is better.
    ``mode="task_mean"`` (LibMTL): the mean over tasks of each task's mean over its metrics,
    optionally weighted by ``task_weights``.

    Raises:
        MtlkitError: if a task or metric of ``results`` is missing from the baseline, or a
            baseline value is zero (the relative change is undefined).
    """
    if mode not in ("flat", "task_mean"):
        raise MtlkitError(f"delta_m: unknown mode {mode!r}; valid modes: flat, task_mean")
    per_task: dict[str, list[float]] = {}
    for task, metrics in results.items():
        if task not in baseline:
            raise MtlkitError(f"delta_m: task {task!r} has no baseline; have {sorted(baseline)}")
        for name, value in metrics.items():
            if name not in baseline[task]:
                raise MtlkitError(
                    f"delta_m: metric {task}/{name} has no baseline; have {sorted(baseline[task])}"
                )
            base = float(baseline[task][name])
            if base == 0.0 or not math.isfinite(base):
                raise MtlkitError(
                    f"delta_m: baseline {task}/{name} = {base} (must be finite, != 0)"
                )
            sign = -1.0 if higher_is_better[task][name] else 1.0
            per_task.setdefault(task, []).append(sign * (float(value) - base) / abs(base))
    if not per_task:
        raise MtlkitError("delta_m: no metrics to compare")
    if mode == "flat":
        flat = [d for ds in per_task.values() for d in ds]
        return 100.0 * sum(flat) / len(flat)
    weights = {t: (task_weights or {}).get(t, 1.0) for t in per_task}
    total = sum(weights.values())
    return 100.0 * sum(weights[t] * sum(ds) / len(ds) for t, ds in per_task.items()) / total
