"""Runs of a method that trains one preference-conditioned model for the whole front (COSMOS).

:func:`build_model` builds the config's architecture for the input extended by the preference
ray and wraps it (:class:`~mtlkit.architectures.conditioned.PreferenceConditioned`) when the
method conditions the model (``conditions_model``); after training, :func:`evaluate_front`
evaluates the selected model at each of the method's test rays and writes ``front.csv`` (one
row per ray: the ray, then each task's test loss and metrics), the front the one model spans.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mtlkit.architectures import build
from mtlkit.architectures.conditioned import PreferenceConditioned, conditioned_input_shape
from mtlkit.data.benchmarks import Problem
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods.base import Method
from mtlkit.parallel.ddp import is_main_process
from mtlkit.tasks import Task
from mtlkit.training.logs import write_atomic
from mtlkit.training.trainer import Results, Trainer

FRONT_NAME = "front.csv"


def conditions_model(method: Method) -> bool:
    """Whether ``method`` trains a preference-conditioned model (COSMOS)."""
    return bool(getattr(method, "conditions_model", False))


def build_model(
    arch: str, arch_args: dict[str, Any], problem: Problem, method: Method, strategy: str
) -> nn.Module:
    """The architecture ``arch`` for ``problem``; for a method that conditions the model, built
    for the input with the ray appended and wrapped so that it reads the method's ray.

    Raises:
        ConfigError: for a conditioning method with another strategy than ``joint``, on a
            multi-input problem, or on an input that is neither a vector nor an image.
    """
    if not conditions_model(method):
        return build(
            arch, problem.input_shape, problem.task_outputs, problem.multi_input, **arch_args
        )
    name = getattr(method, "name", type(method).__name__)
    if strategy != "joint":
        raise ConfigError(
            f"method {name!r} trains one model for the whole front from a ray over all tasks "
            f"at every step; it needs strategy: joint, not {strategy!r}"
        )
    if problem.multi_input:
        raise ConfigError(
            f"method {name!r} conditions the model on a preference ray appended to the input; "
            "this problem is multi-input (one input per task), which it does not support"
        )
    m = len(problem.tasks)
    method.setup(m)
    shape = conditioned_input_shape(problem.input_shape, m)
    inner = build(arch, shape, problem.task_outputs, False, **arch_args)
    return PreferenceConditioned(inner, method.channel, problem.input_shape)


def evaluate_front(trainer: Trainer, data: Any, out_dir: Path | None) -> list[Results]:
    """The trainer's model evaluated on ``data`` at each test ray of its preference channel
    (results per ray, in the rays' order); written to ``out_dir/front.csv``. Nothing for a
    model that is not preference-conditioned (returns ``[]``)."""
    model = trainer.model
    if not isinstance(model, PreferenceConditioned):
        return []
    channel = model.channel
    fronts = []
    for ray in channel.test_rays:
        with channel.fixed(ray):
            fronts.append(trainer.evaluate(data, split="test", write=False))
    if out_dir is not None and is_main_process():
        write_atomic(out_dir / FRONT_NAME, front_table(channel.test_rays, fronts, trainer))
    return fronts


def front_table(rays: Sequence[Any], fronts: Sequence[Results], trainer: Trainer) -> str:
    """``front.csv``'s text: columns ``ray/<task>`` then ``<task>/<metric>`` (loss first)."""
    tasks = trainer.task_names
    metrics = {t: list(fronts[0][t]) if fronts else [] for t in tasks}
    columns = [f"ray/{t}" for t in tasks]
    columns += [f"{t}/{name}" for t in tasks for name in metrics[t]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for ray, results in zip(rays, fronts):
        row = [f"{float(r):.10g}" for r in ray]
        row += [f"{results[t][name]:.8g}" for t in tasks for name in metrics[t]]
        writer.writerow(row)
    return buffer.getvalue()


def front_points(path: Path, tasks: Sequence[Task]) -> list[list[float]]:
    """The test losses (one objective per task, in ``tasks``' order) of each ray of a
    ``front.csv`` written by :func:`evaluate_front`.

    Raises:
        MtlkitError: naming the file, for a missing column or a value that is not a number.
    """
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [f"{t.name}/loss" for t in tasks]
    points = []
    for number, row in enumerate(rows, start=2):
        try:
            points.append([float(row[c]) for c in columns])
        except (KeyError, TypeError, ValueError) as error:
            raise MtlkitError(
                f"{path}: line {number} has no number in the columns {columns} ({error}); the "
                "file is not a front.csv of these tasks (rerun the run, or remove the file)"
            ) from error
    return points
