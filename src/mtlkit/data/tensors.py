"""A multi-task data set from tensors you already have, and a seeded train/val/test split.

:class:`TensorTasks` holds one input tensor and one target tensor per task, all with the same
first dimension (the samples), and yields ``(x[i], {task: y_task[i]})``: the single-input batch
form of the :class:`~mtlkit.Trainer` (PyTorch's default collate stacks the items into
``(x [B, ...], {task: y [B, ...]})``). :func:`split_dataset` splits any data set into
``{"train", "val", "test"}`` by a seeded permutation, the same for the same seed whatever the
global random state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mtlkit.errors import ConfigError

__all__ = ["TensorTasks", "split_dataset"]


def _as_tensor(what: str, value: Any) -> Tensor:
    """``value`` (a tensor or anything :func:`torch.as_tensor` takes: NumPy arrays, lists) as a
    tensor with a sample dimension."""
    if isinstance(value, Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ConfigError(
                f"TensorTasks: {what} must be a tensor (or an array), got "
                f"{type(value).__name__}: {error}"
            ) from None
    if tensor.dim() == 0:
        raise ConfigError(f"TensorTasks: {what} must have a first (sample) dimension, got a scalar")
    return tensor


class TensorTasks(Dataset):
    """A single-input multi-task data set of tensors: item ``i`` is
    ``(inputs[i], {task: targets[task][i]})``.

    Args:
        inputs: ``[N, ...]``, one row per sample (a tensor, or a NumPy array).
        targets: ``{task: [N, ...]}``, the targets of each task for the same ``N`` samples:
            class indices ``[N]`` (int64) for a classification task, ``[N, k]`` (or ``[N]``)
            floats for a regression task with ``k`` outputs.

    Raises:
        ConfigError: for no task, a task name that is not a non-empty string, a value that is
            not a tensor, or a target whose first dimension is not ``N`` (naming the task and
            both lengths).
    """

    def __init__(self, inputs: Any, targets: Mapping[str, Any]) -> None:
        self.inputs = _as_tensor("inputs", inputs)
        if not isinstance(targets, Mapping) or not targets:
            got = "an empty mapping" if isinstance(targets, Mapping) else type(targets).__name__
            raise ConfigError(f"TensorTasks: targets must be a mapping {{task: tensor}}, got {got}")
        n = self.inputs.shape[0]
        self.targets: dict[str, Tensor] = {}
        for task, target in targets.items():
            if not isinstance(task, str) or not task:
                raise ConfigError(f"TensorTasks: task names are non-empty strings, got {task!r}")
            tensor = _as_tensor(f"the target of task {task!r}", target)
            if tensor.shape[0] != n:
                raise ConfigError(
                    f"TensorTasks: task {task!r} has {tensor.shape[0]} targets but the inputs "
                    f"have {n} samples (the first dimensions must be equal)"
                )
            self.targets[task] = tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.inputs[i], {task: y[i] for task, y in self.targets.items()}

    @property
    def task_names(self) -> list[str]:
        return list(self.targets)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input (what :func:`mtlkit.architectures.build` takes)."""
        return tuple(self.inputs.shape[1:])

    def target_sizes(self) -> dict[str, int]:
        """``{task: elements per sample}``: the head width of each task read as a regression
        (1 for ``[N]`` or ``[N, 1]`` targets, ``k`` for ``[N, k]``). A classification task's head
        has one output per class instead, which its targets do not say."""
        return {task: math.prod(y.shape[1:]) for task, y in self.targets.items()}

    def subset(self, indices: Sequence[int] | Tensor) -> TensorTasks:
        """The samples ``indices`` (in that order), as a new :class:`TensorTasks` (copies)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return TensorTasks(self.inputs[index], {task: y[index] for task, y in self.targets.items()})

    def with_targets(self, targets: Mapping[str, Tensor]) -> TensorTasks:
        """The same inputs with some tasks' targets replaced (the others kept)."""
        unknown = sorted(set(targets) - set(self.targets))
        if unknown:
            raise ConfigError(
                f"TensorTasks: unknown task(s) {', '.join(map(repr, unknown))}; tasks: "
                f"{', '.join(self.targets)}"
            )
        return TensorTasks(self.inputs, {**self.targets, **targets})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{t}: {tuple(y.shape[1:])}" for t, y in self.targets.items())
        return f"TensorTasks(n={len(self)}, input_shape={self.input_shape}, targets={{{shapes}}})"


def _split_size(name: str, value: Any, n: int) -> int:
    """The number of samples a ``val``/``test`` argument asks for: a fraction in (0, 1) of
    ``n`` (rounded, at least 1) or a count >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"split_dataset: {name} must be a fraction in (0, 1) or a count >= 1, got {value!r}"
        )
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"split_dataset: {name} must be a count >= 1, got {value}")
        return value
    if not 0.0 < value < 1.0:
        raise ConfigError(f"split_dataset: {name} must be a fraction in (0, 1), got {value!r}")
    return max(1, round(value * n))


def split_dataset(
    data: Dataset, val: float | int = 0.1, test: float | int = 0.1, seed: int = 0
) -> dict[str, Any]:
    """``{"train", "val", "test"}`` of ``data``: a permutation of its samples drawn from
    ``seed`` (its own generator: the global random state is neither used nor changed), then the
    first ``val`` samples for validation, the next ``test`` for test and the rest for training.
    ``val`` and ``test`` are fractions in (0, 1) of ``len(data)`` (rounded, at least one sample)
    or counts. A :class:`TensorTasks` splits into :class:`TensorTasks`; any other data set into
    :class:`torch.utils.data.Subset`.

    Raises:
        ConfigError: for a bad fraction, count or seed, or sizes that leave no training sample.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"split_dataset: seed must be an integer >= 0, got {seed!r}")
    n = len(data)  # type: ignore[arg-type]
    n_val, n_test = _split_size("val", val, n), _split_size("test", test, n)
    if n_val + n_test >= n:
        raise ConfigError(
            f"split_dataset: val={val!r} ({n_val} samples) and test={test!r} ({n_test}) leave "
            f"no training sample of the {n}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = {
        "train": order[n_val + n_test :],
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
    }
    if isinstance(data, TensorTasks):
        return {split: data.subset(index) for split, index in parts.items()}
    return {split: Subset(data, index.tolist()) for split, index in parts.items()}
