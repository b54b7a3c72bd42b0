"""Size checks of a config against the data and the machine's memory, before anything is built.

An absurd size (``data_args.n_train=10**9``, ``arch_args.widths=[100000, 100000]``,
``arch_args.num_experts=10**6``, a batch of 10**5 x 10**5 images) would otherwise end in an
allocator traceback after minutes, or swap the machine to a halt. These checks estimate the
memory first and raise one :class:`~mtlkit.errors.ConfigError` naming the key, the estimate and
the limit:

* :func:`check_sizes` (config only, before the data are loaded): the counts of copied modules in
  ``arch_args`` (at most :data:`MAX_COPIES` experts, levels, layers or branches, each built as
  its own module), and the memory of generating a generated data set
  (:func:`mtlkit.data.benchmarks.estimated_bytes`).
* :func:`check_model_size` (after the data are loaded, before the model is built): the model is
  built on PyTorch's ``meta`` device (shapes only, no memory), and its parameters and buffers,
  times :func:`training_factor` for the gradients, Adam's two moments and one gradient per task
  (the Jacobian that gradient-aggregation methods form), must fit the device's memory; so must
  one batch of inputs.

The limit (:func:`memory_limit`) is the device's total memory: for CPU runs the physical memory
(``SC_PAGE_SIZE * SC_PHYS_PAGES``), or the cgroup's limit if lower; for CUDA the GPU's total
memory. The environment variable ``MTLKIT_MEMORY_LIMIT`` (bytes, or with a ``K``/``M``/``G``/``T``
suffix, binary) replaces it. The estimates leave out activations, so a run can still run out of
memory; they catch sizes that cannot fit at all.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlkit.app.config import TrainConfig
from mtlkit.architectures import ARCHITECTURES, build
from mtlkit.data.benchmarks import Problem, estimated_bytes
from mtlkit.errors import ConfigError

__all__ = [
    "COPY_ARGUMENTS",
    "MAX_COPIES",
    "MEMORY_LIMIT_ENV",
    "check_model_size",
    "check_sizes",
    "estimate_model_bytes",
    "format_bytes",
    "memory_limit",
    "training_factor",
]

MAX_COPIES = 1024
"""The most experts, levels, layers or branches an architecture argument may ask for: each is a
module of its own, and building 10**6 of them takes minutes before any memory check could run."""

COPY_ARGUMENTS = ("num_experts", "task_experts", "shared_experts", "levels")
"""The integer ``arch_args`` that count copied modules (MMoE, DSelect-k, CGC, PLE)."""

LIST_ARGUMENTS = ("widths", "branches")
"""The list ``arch_args`` with one module (layer, stage) per entry."""

MEMORY_LIMIT_ENV = "MTLKIT_MEMORY_LIMIT"
"""The environment variable that sets the memory limit (bytes, or e.g. ``16G``)."""

_ESTIMATE_AS = {"max_roaming": "hps"}
"""Architectures whose construction draws data-dependent masks (``torch.nonzero``), which the
``meta`` device cannot run, estimated as the architecture with the same parameters: Maximum
Roaming is an HPS backbone and heads plus masks (buffers of one value per unit and task)."""

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def format_bytes(n: float) -> str:
    """``n`` bytes as ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _cgroup_limit() -> int | None:
    for name in _CGROUP_FILES:
        path = Path(name)
        if path.is_file():
            text = path.read_text(encoding="ascii").strip()
            if text.isdigit():
                return int(text)
    return None


def memory_limit(device: str = "cpu") -> tuple[int, str]:
    """The memory a run on ``device`` may use, in bytes, and where the number comes from.

    Raises:
        ConfigError: if ``MTLKIT_MEMORY_LIMIT`` is set but not a size.
    """
    text = os.environ.get(MEMORY_LIMIT_ENV)
    if text is not None:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, flags=re.IGNORECASE)
        if match is None:
            raise ConfigError(
                f"{MEMORY_LIMIT_ENV}={text!r} is not a size; give bytes, or e.g. 512M, 16G"
            )
        size = float(match.group(1)) * _UNITS[match.group(2).upper()]
        return int(size), MEMORY_LIMIT_ENV
    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"device {device!r} is not a device: {error}") from None
    if target.type == "cuda" and torch.cuda.is_available():
        index = target.index if target.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"memory of {target}"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup < physical:
        return cgroup, "the cgroup's memory limit"
    return physical, "physical memory"


def _refuse(what: str, estimate: int, limit: tuple[int, str], fix: str) -> ConfigError:
    return ConfigError(
        f"{what} needs about {format_bytes(estimate)}, more than the memory limit "
        f"{format_bytes(limit[0])} ({limit[1]}; {MEMORY_LIMIT_ENV} sets it); {fix}"
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sizes(config: TrainConfig) -> None:
    """The size checks that need only the config: call before the data are loaded.

    Raises:
        ConfigError: if an ``arch_args`` count is above :data:`MAX_COPIES`, or generating the
            data set would take more than :func:`memory_limit`.
    """
    for key in COPY_ARGUMENTS:
        value = config.arch_args.get(key)
        if _is_count(value) and value > MAX_COPIES:
            raise ConfigError(
                f"arch_args.{key}={value} is too large: at most {MAX_COPIES} (each is a module "
                "of its own)"
            )
    for key in LIST_ARGUMENTS:
        value = config.arch_args.get(key)
        if isinstance(value, Sized) and not isinstance(value, str) and len(value) > MAX_COPIES:
            raise ConfigError(
                f"arch_args.{key} has {len(value)} entries, at most {MAX_COPIES} (one module each)"
            )
    need = estimated_bytes(config.data, **config.data_args)
    limit = memory_limit("cpu")  # data sets are generated on the CPU
    if need is not None and need > limit[0]:
        given = ", ".join(f"data_args.{k}={v!r}" for k, v in config.data_args.items())
        raise _refuse(
            f"generating data {config.data!r} ({given or 'the default sizes'})",
            need,
            limit,
            "use smaller data_args (n_train, n_val, n_test, input_dim, ...)",
        )


def training_factor(num_tasks: int) -> int:
    """Bytes of training state per byte of parameters: the weights, their gradient, Adam's two
    moments and one gradient per task (``4 + num_tasks``)."""
    return 4 + num_tasks


def estimate_model_bytes(config: TrainConfig, problem: Problem) -> tuple[int, int] | None:
    """``(parameters, bytes)`` of the model of ``config`` for ``problem`` in training: the
    parameter bytes times :func:`training_factor`, plus the buffers; built on the ``meta``
    device, so nothing is allocated. ``None`` for an architecture that cannot be built there
    (a user's architecture with data-dependent construction; the real build then runs unchecked).

    Raises:
        ConfigError: if the architecture refuses its arguments, or its size overflows.
    """
    name = _ESTIMATE_AS.get(config.arch, config.arch)
    accepted = {a.name for a in ARCHITECTURES.arguments(name)}
    args = {  # a weights file does not change the sizes: it is not read here
        k: v
        for k, v in config.arch_args.items()
        if k != "weights" and (name == config.arch or k in accepted)
    }
    try:
        with torch.device("meta"):
            model = build(
                name,
                problem.input_shape,
                problem.task_outputs,
                multi_input=problem.multi_input,
                **args,
            )
    except NotImplementedError:
        return None
    except RuntimeError as error:
        raise ConfigError(
            f"arch {config.arch!r} with arch_args {config.arch_args} cannot be built: {error}"
        ) from error
    return _training_bytes(model, len(problem.tasks))


def _training_bytes(model: nn.Module, num_tasks: int) -> tuple[int, int]:
    parameters = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return parameters, weights * training_factor(num_tasks) + buffers


def _batch_inputs(problem: Problem, batch_size: int) -> int:
    """The inputs in one training step: ``batch_size``, or the training split if smaller; for
    multi-input problems, one such batch per task."""
    train = problem.splits["train"]
    sets = list(train.values()) if isinstance(train, Mapping) else [train]
    return sum(min(batch_size, len(s)) if isinstance(s, Sized) else batch_size for s in sets)


def check_model_size(config: TrainConfig, problem: Problem) -> None:
    """The size checks of the model and of one batch: call after the data are loaded (and the
    tasks selected), before the model is built.

    Raises:
        ConfigError: naming ``arch_args`` (or ``batch_size``), the estimate and the limit, if
            the model's training state, or one batch of float32 inputs, exceeds
            :func:`memory_limit` of ``config.device``.
    """
    limit = memory_limit(config.device)
    estimate = estimate_model_bytes(config, problem)
    if estimate is not None and estimate[1] > limit[0]:
        parameters, need = estimate
        raise _refuse(
            f"arch {config.arch!r} with arch_args {config.arch_args or '{}'} has "
            f"{parameters:,} parameters; training it (x{training_factor(len(problem.tasks))}: "
            "weights, gradients, Adam state, one gradient per task)",
            need,
            limit,
            "use smaller arch_args (widths, dim, num_experts, ...)",
        )
    samples = _batch_inputs(problem, config.batch_size)
    need = samples * math.prod(problem.input_shape) * 4
    if need > limit[0]:
        raise _refuse(
            f"one batch of batch_size={config.batch_size} inputs of shape "
            f"{list(problem.input_shape)}",
            need,
            limit,
            "use a smaller batch_size, or smaller images (data_args.size or image_size)",
        )
