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
4. **Model x data x method x strategy** (:func:`check_training`, called by
   :meth:`mtlkit.Trainer.validate` from ``fit``, before the first step): multi-input data needs a
   multi-input model and the other way round; each method is set up for the number of tasks it
   will see (``num_tasks``, per group for ``Alternating``) and called once on a random
   Jacobian or loss vector of that size (so Krum with 3 tasks, ``constant`` weights of the wrong
   length, NGDiff with 3 tasks are refused before training); and one dry forward pass on the first
   training batch (in ``eval`` mode, without gradients, the random state restored afterwards, so
   the run is unchanged) checks that the model gives an output for every task, returns its shared
   representation when ``rep_grad`` needs it, and that each task's loss accepts that output and
   target (shape and dtype) and returns one number.

The checks that the rest of mtlkit already does where the value is used stay there (the
``TrainConfig`` field types and ranges, registry argument names, the method x route checks in
:func:`mtlkit.training.strategies.check_method`, the data set layouts).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import types
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.app.config import TrainConfig
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.registry import Registry

__all__ = [
    "RESUMABLE_KEYS",
    "check_arguments",
    "check_config",
    "check_device",
    "check_groups",
    "check_methods",
    "check_out_dir",
    "check_problem",
    "check_resume",
    "check_training",
    "dry_forward",
    "matches_type",
    "peek_first_batch",
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
    check_device(config.device)
    if config.out is not None:
        check_out_dir(config.out)


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
    from mtlkit.training.trainer import resolve_device

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
def check_training(trainer: Any, train: Iterable[Any]) -> None:
    """The checks :meth:`mtlkit.Trainer.validate` runs before the first step (module docstring,
    step 4): loader vs model input kind, every method on its number of tasks, one dry forward.

    Raises:
        ConfigError: naming the task, the shapes or the method at fault.
    """
    from mtlkit.data.multi_input import MultiInputLoader

    multi_data = isinstance(train, (Mapping, MultiInputLoader))
    model_name = type(trainer.model).__name__
    if multi_data and not trainer.multi_input:
        raise ConfigError(
            f"the training data is multi-input (one loader per task), but {model_name} is a "
            "single-input model (multi_input is false): build it with multi_input=True"
        )
    if trainer.multi_input and not multi_data:
        raise ConfigError(
            f"{model_name} is a multi-input model (one input per task, multi_input=True), but the "
            "training data is one loader of (inputs, {task: target}) batches: give "
            "{task: DataLoader} (or a MultiInputLoader), or build the model with multi_input=False"
        )
    check_methods(trainer.strategy.methods())
    batch = peek_first_batch(train)
    if batch is not None:
        dry_forward(trainer, batch)


def check_methods(methods: Sequence[nn.Module]) -> None:
    """Call a copy of each (set-up) method once on a random problem of its number of tasks.

    A method that cannot work with that many tasks raises ``ValueError`` (its convention), which
    becomes a ConfigError now rather than at the first step. Methods that decide their update in
    ``prepare`` (bilevel ones) are only set up, not called. The random draws use a private
    generator and the global random state is restored.

    Raises:
        ConfigError: naming the method, the number of tasks and the method's reason.
    """
    from mtlkit.methods.base import GradientAggregator, LossWeighting

    generator = torch.Generator().manual_seed(0)
    for method in methods:
        m = getattr(method, "num_tasks", None)
        if not isinstance(m, int) or getattr(method, "needs_probe", False):
            continue
        trial = copy.deepcopy(method).cpu()
        n = 6
        try:
            with _preserved_rng(torch.device("cpu")), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial.before_step(0)
                losses = torch.rand(m, generator=generator, dtype=torch.float64) + 0.5
                if isinstance(trial, GradientAggregator):
                    trial = trial.double()
                    if trial.extra_batches:
                        trial.observe_extra(
                            [
                                torch.randn(m, n, generator=generator, dtype=torch.float64)
                                for _ in range(trial.extra_batches)
                            ]
                        )
                    jac = torch.randn(m, n, generator=generator, dtype=torch.float64)
                    trial(jac, losses, blocks=[n])
                elif isinstance(trial, LossWeighting):
                    trial(losses.float())
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"method {type(method).__name__} cannot run on {m} task(s): {error}"
            ) from None


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the global CPU (and CUDA) random state on exit."""
    cpu = torch.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state(device)
        if device.type == "cuda" and torch.cuda.is_available()
        else None
    )
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def peek_first_batch(train: Iterable[Any]) -> Any:
    """The first batch of ``train`` without changing the run: the loaders' shuffling generators
    and the global random state are restored afterwards, so the epoch then starts exactly as it
    would have. ``None`` for a one-shot iterator (peeking would lose the batch) or empty data.
    """
    if isinstance(train, Iterator) or not isinstance(train, Iterable):
        return None  # a one-shot iterator: peeking would consume its first batch
    gens = _generators(train)
    states = [g.get_state() for g in gens]
    with _preserved_rng(torch.device("cpu")):
        try:
            batch = next(iter(train), None)
        finally:
            for gen, state in zip(gens, states):
                gen.set_state(state)
    return batch


_LOADER_PARTS = ("generator", "sampler", "batch_sampler", "loader", "loaders")


def _generators(obj: Any, depth: int = 0, found: dict[int, torch.Generator] | None = None):
    """Every ``torch.Generator`` a loader draws from: its own, its samplers', and those of the
    loaders it wraps (multi-input, sharded), each once."""
    found = {} if found is None else found
    if isinstance(obj, torch.Generator):
        found.setdefault(id(obj), obj)
    elif depth < 6 and obj is not None:
        items = obj.values() if isinstance(obj, Mapping) else None
        if items is not None:
            for item in items:
                _generators(item, depth + 1, found)
        else:
            for name in _LOADER_PARTS:
                part = getattr(obj, name, None) if not isinstance(obj, Tensor) else None
                if part is not None and part is not obj:
                    _generators(part, depth + 1, found)
    return list(found.values())


def dry_forward(trainer: Any, batch: Any) -> None:
    """One forward pass on ``batch`` (eval mode, no gradients, random state restored) checking
    outputs and losses per task.

    Raises:
        ConfigError: the model fails on the batch, misses a task's output, does not give its
            shared representation for ``rep_grad``, or a task's loss rejects the output and
            target (their shapes and dtypes are named) or does not return one number.
    """
    from mtlkit.training.trainer import model_hook, to_device

    model = trainer.model
    name = type(model).__name__
    batch = to_device(batch, trainer.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _preserved_rng(trainer.device):
            if trainer.multi_input:
                if not isinstance(batch, Mapping):
                    raise ConfigError(
                        f"multi-input batches must be {{task: (inputs, target)}}, got "
                        f"{type(batch).__name__}"
                    )
                for task in trainer.task_names:
                    if task not in batch:
                        raise ConfigError(
                            f"the multi-input training data has no loader for task {task!r} "
                            f"(it has {', '.join(map(str, batch))})"
                        )
                    inputs, target = _pair(batch[task], f"the batch of task {task!r}")
                    outputs = _forward(trainer, inputs, name, task=task)
                    _check_task(trainer, task, outputs, target)
            else:
                inputs, targets = _pair(batch, "a training batch")
                if not isinstance(targets, Mapping):
                    raise ConfigError(
                        "single-input batches must be (inputs, {task: target}); the targets are "
                        f"a {type(targets).__name__}"
                    )
                outputs = _forward(trainer, inputs, name)
                for task in trainer.task_names:
                    if task not in targets:
                        raise ConfigError(
                            f"the training data has no target for task {task!r} (targets: "
                            f"{', '.join(map(str, targets))})"
                        )
                    _check_task(trainer, task, outputs, targets[task])
            model_hook(model, "auxiliary_losses")  # forget what the dry pass may have left
    finally:
        model.train(was_training)


def _pair(batch: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigError(f"{what} must be a pair (inputs, targets), got {_describe(batch)}")
    return batch[0], batch[1]


def _forward(trainer: Any, inputs: Any, name: str, task: str | None = None) -> Mapping[str, Any]:
    kwargs: dict[str, Any] = {} if task is None else {"task": task}
    if trainer.rep_grad:
        kwargs["return_features"] = True
    try:
        result = trainer.model(inputs, **kwargs)
    except MtlkitError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        where = f" (task {task!r})" if task is not None else ""
        raise ConfigError(
            f"{name} cannot process a training batch{where}: inputs {_describe(inputs)}; "
            f"{type(error).__name__}: {_first_line(error)}"
        ) from None
    if trainer.rep_grad:
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Tensor)):
            raise ConfigError(
                f"rep_grad needs {name}(x, return_features=True) to return (outputs, features); "
                f"it returned {_describe(result)}"
            )
        result = result[0]
    if not isinstance(result, Mapping):
        raise ConfigError(f"{name} must return {{task: output}}, returned {_describe(result)}")
    return result


def _check_task(trainer: Any, task: str, outputs: Mapping[str, Any], target: Any) -> None:
    if task not in outputs:
        raise ConfigError(
            f"{type(trainer.model).__name__} gives no output for task {task!r} "
            f"(outputs: {', '.join(map(str, outputs)) or 'none'})"
        )
    output = outputs[task]
    spec = trainer.by_name[task]
    loss_name = getattr(spec.loss, "__name__", type(spec.loss).__name__)
    try:
        loss = spec.loss(output, target)
    except MtlkitError as error:
        raise ConfigError(f"task {task!r}: {error}") from None
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise ConfigError(
            f"task {task!r}: its loss {loss_name} cannot take the model's output "
            f"{_describe(output)} with the target {_describe(target)} "
            f"({type(error).__name__}: {_first_line(error)}); the architecture's head for "
            f"{task!r} does not fit this task (e.g. a dense backbone such as segnet on a "
            "classification task)"
        ) from None
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ConfigError(
            f"task {task!r}: its loss {loss_name} must return one number, returned "
            f"{_describe(loss)}"
        )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {list(value.shape)} ({str(value.dtype).replace('torch.', '')})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe(v) for v in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"{type(value).__name__} ({inner}{more})"
    return type(value).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
