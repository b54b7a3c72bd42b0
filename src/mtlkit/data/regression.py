"""Regression tasks on standardised targets, measured in the targets' own units.

Targets of very different scales (QM9's 11 properties range from 0.1 to 1e4) are usually
standardised, ``z = (y - mean) / std`` with the mean and standard deviation of the *training*
split, so that each task's MSE starts near 1; the error a reader wants is still in the original
units. :class:`Standardizer` fits ``mean`` and ``std`` per task (per target element) on the
training split, transforms every split with them, and makes metrics that undo the transform
(:class:`~mtlkit.metrics.OriginalUnits`); :func:`regression_tasks` builds the tasks: MSE on the
standardised targets, MAE and RMSE in original units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.data.tensors import TensorTasks
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.metrics import MeanAbsoluteError, Metric, OriginalUnits, RootMeanSquaredError
from mtlkit.tasks import Task

__all__ = ["Standardizer", "regression_loss", "regression_tasks"]

REGRESSION_METRICS: dict[str, Callable[[], Metric]] = {
    "mae": MeanAbsoluteError,
    "rmse": RootMeanSquaredError,
}


def regression_loss(output: Tensor, target: Tensor) -> Tensor:
    """The mean squared error; an output ``[B, 1]`` against a target ``[B]`` is read as
    ``[B]`` (a head with one unit), any other shape mismatch is an error (``mse_loss`` would
    broadcast ``[B, 1]`` against ``[B]`` to ``[B, B]`` with only a warning)."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    if output.shape != target.shape:
        raise MtlkitError(
            f"regression_loss: output shape {tuple(output.shape)} != target shape "
            f"{tuple(target.shape)} (a head's outputs must match one sample's target)"
        )
    return F.mse_loss(output, target.to(output.dtype))


def _targets_of(data: TensorTasks | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, TensorTasks):
        return data.targets
    if isinstance(data, Mapping):
        return data
    raise ConfigError(
        "Standardizer.fit takes a TensorTasks (the training split) or {task: targets}, got "
        f"{type(data).__name__}"
    )


class Standardizer:
    """``z = (y - mean) / std`` per regression task, per target element.

    Args:
        mean, std: ``{task: tensor}`` of one sample's target shape (``[]`` for ``[N]``
            targets, ``[k]`` for ``[N, k]``); ``std`` finite and > 0.

    Build it with :meth:`fit` on the training split (never on validation or test data), apply
    it to every split with :meth:`transform`, and measure in original units with
    :meth:`metric` (or :func:`regression_tasks`).
    """

    def __init__(self, mean: Mapping[str, Any], std: Mapping[str, Any]) -> None:
        if set(mean) != set(std) or not mean:
            raise ConfigError(
                f"Standardizer: mean and std need the same, non-empty tasks; got "
                f"{sorted(mean)} and {sorted(std)}"
            )
        self.mean = {t: torch.as_tensor(v, dtype=torch.float64) for t, v in mean.items()}
        self.std = {t: torch.as_tensor(std[t], dtype=torch.float64) for t in mean}
        for task in self.mean:
            m, s = self.mean[task], self.std[task]
            if m.shape != s.shape:
                raise ConfigError(
                    f"Standardizer: task {task!r} has mean of shape {tuple(m.shape)} and std of "
                    f"shape {tuple(s.shape)}"
                )
            if not bool(torch.isfinite(m).all()):
                raise ConfigError(f"Standardizer: task {task!r} has a non-finite mean {m.tolist()}")
            bad = ~(torch.isfinite(s) & (s > 0))
            if bool(bad.any()):
                where = tuple(int(i) for i in bad.nonzero()[0]) if s.dim() else ()
                raise ConfigError(
                    f"Standardizer: task {task!r} has std {float(s[where])} at element "
                    f"{list(where)} (a constant target cannot be standardised; must be finite "
                    "and > 0)"
                )

    @classmethod
    def fit(
        cls, data: TensorTasks | Mapping[str, Any], tasks: Sequence[str] | None = None
    ) -> Standardizer:
        """The mean and the (population, ``ddof=0``) standard deviation over the samples of
        each task's targets in ``data``, in float64. ``tasks``: the regression tasks to
        standardise (default: all of ``data``'s).

        Raises:
            ConfigError: for an unknown task, integer (class) targets, fewer than two samples,
                a non-finite target, or a constant target element (std 0), naming the task.
        """
        targets = _targets_of(data)
        names = list(targets) if tasks is None else list(tasks)
        unknown = [t for t in names if t not in targets]
        if unknown:
            raise ConfigError(
                f"Standardizer.fit: unknown task(s) {', '.join(map(repr, unknown))}; tasks: "
                f"{', '.join(targets)}"
            )
        mean, std = {}, {}
        for task in names:
            y = torch.as_tensor(targets[task])
            if not y.is_floating_point():
                raise ConfigError(
                    f"Standardizer.fit: task {task!r} has {y.dtype} targets (class indices?); "
                    "only regression targets are standardised: give tasks=[...] without it"
                )
            if y.dim() == 0 or y.shape[0] < 2:
                raise ConfigError(
                    f"Standardizer.fit: task {task!r} needs at least 2 samples, got "
                    f"{y.shape[0] if y.dim() else 0}"
                )
            y = y.double()
            if not bool(torch.isfinite(y).all()):
                raise ConfigError(f"Standardizer.fit: task {task!r} has non-finite targets")
            mean[task] = y.mean(dim=0)
            std[task] = y.std(dim=0, correction=0)
        return cls(mean, std)

    @property
    def tasks(self) -> list[str]:
        return list(self.mean)

    def _check_task(self, task: str) -> None:
        if task not in self.mean:
            raise ConfigError(
                f"Standardizer: no task {task!r}; it standardises {', '.join(self.mean)}"
            )

    def standardize(self, task: str, y: Tensor) -> Tensor:
        """``(y - mean) / std`` of ``task``, in ``y``'s floating dtype."""
        self._check_task(task)
        dtype = y.dtype if y.is_floating_point() else torch.float32
        z = (y.double() - self.mean[task].to(y.device)) / self.std[task].to(y.device)
        return z.to(dtype)

    def inverse(self, task: str, z: Tensor) -> Tensor:
        """``z * std + mean`` of ``task`` (a standardised target or prediction), in float64."""
        self._check_task(task)
        return z.double() * self.std[task].to(z.device) + self.mean[task].to(z.device)

    def transform(self, data: TensorTasks) -> TensorTasks:
        """``data`` with the standardised targets of this standardiser's tasks (the others, and
        the inputs, unchanged)."""
        if not isinstance(data, TensorTasks):
            raise ConfigError(
                f"Standardizer.transform takes a TensorTasks, got {type(data).__name__}"
            )
        for task in self.mean:
            if task not in data.targets:
                raise ConfigError(
                    f"Standardizer.transform: the data has no task {task!r}; tasks: "
                    f"{', '.join(data.targets)}"
                )
        return data.with_targets(
            {task: self.standardize(task, data.targets[task]) for task in self.mean}
        )

    def metric(
        self, task: str, metric: Callable[[], Metric] = MeanAbsoluteError
    ) -> Callable[[], Metric]:
        """The factory of ``metric`` (a :class:`~mtlkit.metrics.Metric` factory) computed in
        ``task``'s original units, for ``Task.metrics``."""
        self._check_task(task)
        return functools.partial(OriginalUnits, metric, mean=self.mean[task], scale=self.std[task])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{"mean": {task: list}, "std": {task: list}}`` (JSON-able; :meth:`from_dict`)."""
        return {
            "mean": {t: v.tolist() for t, v in self.mean.items()},
            "std": {t: v.tolist() for t, v in self.std.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Mapping[str, Any]]) -> Standardizer:
        if not isinstance(state, Mapping) or set(state) != {"mean", "std"}:
            raise ConfigError("Standardizer.from_dict takes {'mean': {...}, 'std': {...}}")
        return cls(state["mean"], state["std"])

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{t}: mean {_short(self.mean[t])}, std {_short(self.std[t])}" for t in self.mean
        )
        return f"Standardizer({shown})"


def _short(value: Tensor) -> str:
    if value.dim() == 0:
        return f"{float(value):.4g}"
    items = [f"{float(v):.4g}" for v in value.flatten()[:3]]
    return "[" + ", ".join(items) + (", ...]" if value.numel() > 3 else "]")


def regression_tasks(
    names: Sequence[str],
    standardizer: Standardizer | None = None,
    metrics: Sequence[str] = ("mae", "rmse"),
    weights: Mapping[str, float] | None = None,
) -> list[Task]:
    """Regression tasks: :func:`regression_loss` (MSE) on the targets as the model sees them
    (standardised when ``standardizer`` is given) and ``metrics`` (``mae``, ``rmse``) in the
    original units (undoing ``standardizer``'s transform for each task).

    Raises:
        ConfigError: for an unknown metric, no task, a task the standardiser does not know, or a
            weight of an unknown task.
    """
    names = list(names)
    if not names:
        raise ConfigError("regression_tasks: give at least one task name")
    unknown = [m for m in metrics if m not in REGRESSION_METRICS]
    if unknown or not metrics:
        raise ConfigError(
            f"regression_tasks: unknown metric(s) {', '.join(map(repr, unknown)) or '(none)'}; "
            f"valid metrics: {', '.join(REGRESSION_METRICS)}"
        )
    weights = dict(weights or {})
    stray = sorted(set(weights) - set(names))
    if stray:
        raise ConfigError(f"regression_tasks: weights for unknown task(s) {', '.join(stray)}")
    tasks = []
    for name in names:
        if standardizer is not None:
            measured = {m: standardizer.metric(name, REGRESSION_METRICS[m]) for m in metrics}
        else:
            measured = {m: functools.partial(OriginalUnits, REGRESSION_METRICS[m]) for m in metrics}
        weight = float(weights.get(name, 1.0))
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"regression_tasks: weight of {name!r} must be > 0, got {weight}")
        tasks.append(Task(name, regression_loss, measured, weight=weight))
    return tasks
