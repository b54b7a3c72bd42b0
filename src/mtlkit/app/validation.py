"""Up-front checks: everything that can be known to be wrong about a run before its first step.

A run that dies on a typo after an hour of training costs the user that hour, so the CLI and the
Trainer check their inputs before training and report each problem as one
:class:`~mtlkit.errors.ConfigError` (exit code 2 from the CLI, no traceback) that says what is
wrong, where, and what would be valid. The checks, in the order a run meets them:

1. **The config alone** (:func:`check_config`, before any data is read): the registered names
   (method, architecture, strategy, data set, optimizer, scheduler), the types of
   ``method_args`` / ``arch_args`` / ``strategy_args`` / ``data_args`` against the signature of
   what they build (``method_args.c=foo`` for CAGrad's ``c: float`` is refused by name, instead
   of failing inside the method), ``strategy_args.groups`` is ``"each"`` or a list of task-name
   lists, the device exists (``cuda`` without a GPU is refused here), and the output folder can be
   created.
2. **A resumed run** (:func:`check_resume`): only the budget and run-time keys may change; a
   changed model, method, strategy or data set would not match the checkpoint (and used to
   overwrite the run's ``config.yaml`` before failing).
3. **The data** (:func:`check_problem`): the tasks named by ``strategy_args.groups`` exist. The
   data set loaders check their root folder and layout themselves (a
   :class:`~mtlkit.errors.DatasetError` naming the missing path and the expected layout).
4. **Model x data x method x strategy** (:func:`mtlkit.training.preflight.check_training`,
   called by :meth:`mtlkit.Trainer.validate` from ``fit``, before the first step): input kinds,
   every method run through the step driver on its number of tasks, one dry forward pass.

The checks that the rest of mtlkit already does where the value is used stay there (the
``TrainConfig`` field types and ranges, registry argument names, the method x route checks in
:func:`mtlkit.training.step.check_method`, the data set layouts).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtlkit.app.config import TrainConfig
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.registry import Registry

__all__ = [
    "RESUMABLE_KEYS",
    "check_arguments",
    "check_config",
    "check_device",
    "check_groups",
    "check_out_dir",
    "check_plots",
    "check_problem",
    "check_resume",
    "matches_type",
]

RESUMABLE_KEYS = frozenset(
    {
        "epochs",
        "steps",
        "passes",
        "seconds",
        "forward_backward",
        "out",
        "device",
        "progress",
        "plots",
        "tensorboard",
        "loggers",
        "logger_args",
        "checkpoint_every",
        "workers",
        "baseline",
        "on_nonfinite",
    }
)
"""The config keys that ``mtlkit train --resume RUN_DIR key=value`` may change: the budget and how
the run is executed and reported. Every other key defines the model, the data or the optimisation,
which the checkpoint was taken with."""


# --------------------------------------------------------------------------- the config alone


def check_config(config: TrainConfig) -> None:
    """Checks of a config that need no data (see the module docstring, step 1).

    Raises:
        ConfigError: naming the key, the bad value and what would be valid.
        UnknownNameError: for a name that is not registered (it lists the valid ones).
    """
    from mtlkit.architectures import ARCHITECTURES
    from mtlkit.data.benchmarks import DATASETS
    from mtlkit.methods import METHODS
    from mtlkit.training.evaluation import last_k_epochs
    from mtlkit.training.optim import OPTIMIZERS, SCHEDULERS
    from mtlkit.training.strategies import STRATEGIES

    check_arguments(METHODS, config.method, config.method_args, "method_args")
    check_arguments(
        ARCHITECTURES,
        config.arch,
        config.arch_args,
        "arch_args",
        supplied=("input_shape", "task_outputs", "multi_input"),
    )
    check_arguments(
        STRATEGIES, config.strategy, config.strategy_args, "strategy_args", supplied=("method",)
    )
    check_arguments(DATASETS, config.data, config.data_args, "data_args", supplied=("seed",))
    if config.optimizer.lower() not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {config.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    if config.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"unknown scheduler {config.scheduler!r}; valid schedulers: {', '.join(SCHEDULERS)}"
        )
    if "groups" in config.strategy_args:
        check_groups(config.strategy_args["groups"], None, "strategy_args.groups")
    k = last_k_epochs(config.select)
    if k is not None and config.epochs is not None and config.epochs < k:
        raise ConfigError(
            f"select={config.select!r} averages the last {k} epochs, but epochs={config.epochs} "
            f"trains fewer; give epochs >= {k} or another select"
        )
    check_device(config.device)
    if config.out is not None:
        check_out_dir(config.out)
    check_plots(config)


def check_plots(config: TrainConfig) -> None:
    """``plots: true`` needs matplotlib: without it, a ConfigError naming the plot extra, before
    anything is trained (``plots: null``, the default, draws the figures only where matplotlib
    is installed; ``plots: false`` draws none)."""
    from mtlkit.app.plot_option import missing_matplotlib

    if config.plots is True:
        why = missing_matplotlib()
        if why is not None:
            raise ConfigError(f"plots=true: {why}; or set plots=false (or plots=null)")


def check_arguments(
    registry: Registry[Any],
    name: str,
    args: Mapping[str, Any],
    key: str,
    supplied: Sequence[str] = (),
) -> None:
    """Check the values of ``args`` against the type hints of the registered entry ``name``.

    Unknown and missing arguments are left to :meth:`Registry.get` (which lists the valid ones);
    arguments that the caller supplies itself (``supplied``) must not be given.

    Raises:
        ConfigError: ``"<key>.<arg> must be <type>, got <value>"``.
        UnknownNameError: if ``name`` is not registered.
    """
    factory = registry.factory(name)
    taken = [a for a in supplied if a in args]
    if taken:
        raise ConfigError(
            f"{key} must not set {', '.join(taken)}: mtlkit sets it from the run "
            f"({registry.kind} {name!r})"
        )
    hints = _type_hints(factory)
    for arg, value in args.items():
        hint = hints.get(arg)
        if hint is not None and not matches_type(value, hint):
            raise ConfigError(
                f"{key}.{arg} must be {describe_type(hint)}, got {value!r} "
                f"(argument of {registry.kind} {name!r})"
            )
        huge = [v for v in _floats(value) if math.isfinite(v) and abs(v) > FLOAT32_MAX]
        if (
            hint is not None and huge
        ):  # a model or method turns it into a float32 tensor: it would overflow there
            raise ConfigError(
                f"{key}.{arg} must be at most {FLOAT32_MAX:.4g} in magnitude (the computations "
                f"run in float32), got {huge[0]!r} (argument of {registry.kind} {name!r})"
            )


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _floats(value: Any) -> list[float]:
    """The floats in ``value`` and in the lists, tuples and mappings it holds."""
    if isinstance(value, float):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [f for item in value for f in _floats(item)]
    return []


def _type_hints(factory: Any) -> dict[str, Any]:
    """The resolved type hints of a factory's parameters (a class: of its ``__init__``); ``{}``
    when they cannot be resolved (the values are then checked by the factory alone)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: nothing to check against
        return {}


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a plain config value (YAML scalar, list or mapping) fits the type hint ``hint``.

    Lenient where a hint names a class that a plain value cannot be (a ``Method``, a
    ``torch.Generator``): those are accepted, and left to the factory. ``int`` is accepted for
    ``float``; a list for a ``tuple`` of the right length; a string for a path.
    """
    if hint is Any or hint is object or isinstance(hint, typing.TypeVar):
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, option) for option in args)
    if hint is None or hint is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == option and type(value) is type(option) for option in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (Path, os.PathLike) or (inspect.isclass(hint) and issubclass(hint, os.PathLike)):
        return isinstance(value, (str, os.PathLike))
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches_type(v, args[0]) for v in value)
        if args:
            return len(value) == len(args) and all(matches_type(v, a) for v, a in zip(value, args))
        return True
    if origin in (list, Sequence, typing.Sequence) or hint in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(matches_type(v, args[0]) for v in value)
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            key_type, value_type = args
            return all(
                matches_type(k, key_type) and matches_type(v, value_type) for k, v in value.items()
            )
        return True
    # A class that a plain value cannot be (Method, torch.Generator, ...): the factory decides.
    return True


def describe_type(hint: Any) -> str:
    """A short readable name of a type hint: ``float``, ``list[int] or null``, ``'sum' or
    'mean'``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(hint))
    if hint is None or hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is not None:
        parts = typing.get_args(hint)
        args = ", ".join("..." if a is Ellipsis else describe_type(a) for a in parts)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{args}]" if args else name
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def check_groups(groups: Any, tasks: Sequence[str] | None, key: str = "groups") -> None:
    """``groups`` must be ``"each"`` or a list of non-empty lists of task names (each task in
    exactly one group, when ``tasks`` is given).

    Raises:
        ConfigError: naming the problem and the valid tasks.
    """
    if isinstance(groups, str):
        if groups != "each":
            raise ConfigError(f"{key} must be 'each' or a list of task-name lists, got {groups!r}")
        return
    shape_ok = isinstance(groups, (list, tuple)) and all(
        isinstance(g, (list, tuple)) and all(isinstance(t, str) for t in g) for g in groups
    )
    if not shape_ok:
        raise ConfigError(
            f"{key} must be 'each' or a list of task-name lists such as [[left, right], [sum]], "
            f"got {groups!r}"
        )
    if tasks is not None:
        from mtlkit.training.groups import check_partition

        check_partition(groups, tasks)


def check_device(device: str) -> torch.device:
    """The device, checked to exist here (``cuda`` without CUDA, ``cuda:3`` on a one-GPU
    machine and unknown device types are refused).

    Raises:
        ConfigError: saying what exists.
    """
    from mtlkit.training.devices import resolve_device

    try:
        return resolve_device(device)
    except ConfigError:
        raise
    except MtlkitError as error:
        raise ConfigError(str(error)) from None


def check_out_dir(out: str | Path) -> None:
    """The output folder must be a folder or creatable. Probed by creating the missing folders
    and removing them again, so a failed check leaves nothing behind. Under ``torchrun`` only
    rank 0 probes (it alone creates the run folder; the other ranks wait for it, see
    :func:`mtlkit.parallel.launch.rank_zero_first`): a probe of rank 1 racing rank 0's folder was
    an ``[Errno 17] File exists`` error.

    Whether mtlkit may write into an existing folder (it must be empty or an mtlkit run folder)
    is checked when the run claims it (:func:`mtlkit.training.run_dir.claim_run_dir`).

    Raises:
        ConfigError: naming the path and why.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        return
    path = Path(out).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"out {str(path)!r} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"out {str(path)!r}: the folder is not writable")
        return
    created: list[Path] = []
    missing = [path, *path.parents]
    missing = [p for p in missing if not p.exists()]
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # another process made it meanwhile: not ours to remove
                continue
            created.append(folder)
    except OSError as error:
        raise ConfigError(f"out {str(path)!r}: cannot create the folder ({error})") from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()


# ------------------------------------------------------------------------------ a resumed run


def check_resume(saved: TrainConfig, config: TrainConfig, source: str = "the saved config") -> None:
    """A resumed run may only change :data:`RESUMABLE_KEYS` relative to its saved config (the
    run folder's ``config.yaml``, or the config its checkpoint records: ``source``).

    Raises:
        ConfigError: listing each changed key (saved value -> new value).
    """
    before, after = saved.to_dict(), config.to_dict()
    changed = [
        key
        for key in after
        if key not in RESUMABLE_KEYS and key in before and before[key] != after[key]
    ]
    if changed:
        details = "; ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed)
        raise ConfigError(
            f"--resume cannot change {', '.join(changed)} ({details}): the checkpoint was "
            f"trained with {source}; only {', '.join(sorted(RESUMABLE_KEYS))} may change "
            "(start a new run with a new out= for the rest)"
        )


# -------------------------------------------------------------------------------- the data


def check_problem(config: TrainConfig, task_names: Sequence[str]) -> None:
    """Checks of the config against the data set's tasks (after ``tasks=`` selection).

    Raises:
        ConfigError: e.g. ``strategy_args.groups`` names a task the data set does not have.
    """
    if "groups" in config.strategy_args:
        check_groups(config.strategy_args["groups"], task_names, "strategy_args.groups")
    size = config.strategy_args.get("group_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > len(task_names):
        warnings.warn(
            f"strategy_args.group_size={size} is larger than the {len(task_names)} task(s): "
            "one group of every task",
            RuntimeWarning,
            stacklevel=2,
        )


# ------------------------------------------------------- model x data x method x strategy
