"""Evaluation on a split (per-task metrics and mean loss) and model selection on validation.

Model selection keeps the epoch with the lowest summed validation loss by default (as Pascal et
al., 2021, do), or the best value of one task's metric, or the last epoch. ``"last_<k>"`` (e.g.
``"last_10"``) keeps the last epoch too, and its results are the mean of the metrics of the last
``k`` epochs (:func:`mean_of_last_epochs`): the protocol of Nash-MTL (Navon et al., 2022) and
FAMO (Liu et al., 2023), who report the test metrics averaged over the last 10 epochs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.tasks import Task
from mtlkit.training.devices import to_device

Results = dict[str, dict[str, float]]  # task -> metric -> value


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    tasks: Sequence[Task],
    data: Any,
    device: torch.device,
    *,
    multi_input: bool = False,
    split: str = "test",
) -> Results:
    """Per-task metrics and mean loss of ``model`` on ``data`` (batch-size-weighted over batches),
    in eval mode. ``data`` yields ``(inputs, {task: target})``, or for a multi-input model is a
    ``{task: loader}`` / :class:`MultiInputLoader`.

    Raises:
        MtlkitError: when ``data`` has no sample of a task (``split`` names the data).
    """
    model.eval()
    by_name = {t.name: t for t in tasks}
    metrics = {t.name: t.new_metrics() for t in tasks}
    loss_sums = dict.fromkeys(by_name, 0.0)
    counts = dict.fromkeys(by_name, 0)

    def update(task: str, output: Tensor, target: Tensor) -> None:
        n = int(target.shape[0])
        loss_sums[task] += float(by_name[task].loss(output, target)) * n
        counts[task] += n
        for metric in metrics[task].values():
            metric.update(output, target)

    if multi_input:
        loaders = data.loaders if isinstance(data, MultiInputLoader) else data
        for t in by_name:
            for inputs, target in loaders[t]:
                inputs, target = to_device((inputs, target), device)
                update(t, model(inputs, task=t)[t], target)
    else:
        for batch in data:
            inputs, targets = to_device(batch, device)
            outputs = model(inputs)
            for t in by_name:
                update(t, outputs[t], targets[t])
    results: Results = {}
    for t in by_name:
        if counts[t] == 0:
            raise MtlkitError(f"evaluation data for split {split!r} has no samples of task {t!r}")
        results[t] = {"loss": loss_sums[t] / counts[t]}
        results[t].update({name: m.compute() for name, m in metrics[t].items()})
    return results


LAST_K_PREFIX = "last_"


def last_k_epochs(criterion: str) -> int | None:
    """``k`` of a ``"last_<k>"`` criterion (``"last_10"`` -> 10); ``None`` for the others.

    Raises:
        ConfigError: for ``"last_<something>"`` that is not a whole number >= 1.
    """
    if not isinstance(criterion, str) or not criterion.startswith(LAST_K_PREFIX):
        return None
    text = criterion[len(LAST_K_PREFIX) :]
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            f"selection criterion {criterion!r}: last_<k> takes a whole number k >= 1 of "
            "epochs, e.g. last_10"
        )
    return int(text)


def mean_of_last_epochs(
    history: Sequence[Mapping[str, Any]], tasks: Iterable[Task], k: int, split: str = "val"
) -> Results:
    """``{task: {metric: mean}}`` of the ``split/task/metric`` values (losses included) of the
    last ``k`` rows of ``history`` (the Trainer's rows of ``metrics.csv``, one per epoch).

    Raises:
        MtlkitError: if fewer than ``k`` epochs have ``split`` results.
    """
    tasks = list(tasks)
    keys = [(t.name, m) for t in tasks for m in ("loss", *t.metrics)]
    rows = [r for r in history if all(f"{split}/{t}/{m}" in r for t, m in keys)]
    if len(rows) < k:
        raise MtlkitError(
            f"the mean of the last {k} epochs needs {k} epochs evaluated on the {split} split; "
            f"the run has {len(rows)}"
        )
    last = rows[-k:]
    results: Results = {}
    for t, m in keys:
        results.setdefault(t, {})[m] = sum(float(r[f"{split}/{t}/{m}"]) for r in last) / k
    return results


class Selection:
    """A model-selection criterion: ``"loss"`` (lowest summed validation loss), ``"last"`` (the
    last epoch), ``"last_<k>"`` (the last epoch; the results are averaged over the last ``k``
    epochs, see :func:`mean_of_last_epochs`) or ``"task/metric"`` (e.g. ``"left/acc"``, best in
    the metric's direction).

    Raises:
        MtlkitError: for an unknown criterion, listing the valid ones.
    """

    def __init__(self, criterion: str, tasks: Iterable[Task]) -> None:
        self.by_name = {t.name: t for t in tasks}
        self.last_k = last_k_epochs(criterion)
        if criterion not in ("loss", "last") and self.last_k is None:
            task, _, metric = criterion.partition("/")
            if task not in self.by_name or metric not in self.by_name[task].metrics:
                valid = ["loss", "last", "last_<k>"] + [
                    f"{t.name}/{m}" for t in self.by_name.values() for m in t.metrics
                ]
                raise MtlkitError(
                    f"unknown selection criterion {criterion!r}; valid: {', '.join(valid)}"
                )
        self.criterion = criterion

    def score(self, results: Results, epoch: int) -> float:
        """The score of ``results`` (of epoch ``epoch``); lower is better."""
        if self.criterion == "last" or self.last_k is not None:
            return -float(epoch)
        if self.criterion == "loss":
            return sum(r["loss"] for r in results.values())
        task, _, metric = self.criterion.partition("/")
        value = results[task][metric]
        return -value if self.by_name[task].higher_is_better()[metric] else value


def flatten_results(results: Results, prefix: str) -> dict[str, float]:
    """``{task: {metric: v}}`` -> ``{"prefix/task/metric": v}``."""
    return {f"{prefix}/{t}/{m}": v for t, ms in results.items() for m, v in ms.items()}
