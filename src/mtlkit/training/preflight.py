"""The pre-flight check of a training run: model x data x method x strategy, before the first step.

:func:`check_training` (called by :meth:`mtlkit.Trainer.validate` from ``fit``): multi-input data
needs a multi-input model and the other way round; each method is set up for the number of tasks
it will see (``num_tasks``, per group for ``Alternating``) and run through the step driver for a
few steps on a small random problem of that size (:func:`check_methods`: so Krum with 3 tasks,
``constant`` weights of the wrong length, NGDiff with 3 tasks are refused before training).

:func:`dry_forward` then runs one forward pass (in ``eval`` mode, without gradients, the random
state restored afterwards) and checks that the model gives an output for every task, returns its
shared representation when ``rep_grad`` needs it, and that each task's loss accepts that output
and target (shape and dtype) and returns one number. The Trainer runs it on the **first batch
the training loop draws**, before that batch's step: the training data is never peeked at, so a
user's iterable (whatever it keeps its shuffling generator in) yields exactly the batches it
would have yielded without the check. A caller that wants the check before training starts
(the CLI, before it writes the run's files) gives a sample batch of another loader
(:func:`sample_batch` of the validation split) to ``Trainer.validate(train, sample=...)``.

The dry forward also decides whether a single-input model's ``forward(x, task=t)`` computes
task ``t`` alone (:func:`task_forward`): the Trainer then uses it for the steps of one-task groups.

The checks of a config before any model exists are in :mod:`mtlkit.app.validation`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods.base import Method
from mtlkit.training.devices import model_hook, to_device
from mtlkit.training.step import Step

__all__ = ["check_methods", "check_training", "dry_forward", "sample_batch", "task_forward"]


def check_training(trainer: Any, train: Iterable[Any], sample: Any = None) -> None:
    """The checks :meth:`mtlkit.Trainer.validate` runs before the first step (module
    docstring): loader vs model input kind, every method on its number of tasks, and the dry
    forward on ``sample`` when one is given (``train`` itself is not iterated).

    Raises:
        ConfigError: naming the task, the shapes or the method at fault.
    """
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
    if sample is not None:
        dry_forward(trainer, sample)


def check_methods(methods: Sequence[Method]) -> None:
    """Run a copy of each (set-up) method through the step driver for a few steps on a small
    random problem of its number of tasks: every hook it has (``before_step``, ``prepare``,
    extra batches, ``after_step``, ``on_epoch_end``) is called as in training.

    A method that cannot work with that many tasks raises ``ValueError`` (its convention), which
    becomes a ConfigError now rather than at the first step. The problem: losses
    ``L_i = c_i exp(a_i · x)`` of six float64 parameters ``x`` (so ``L_i > 0``, and the Jacobian
    is random), one ``(a, c)`` per batch, SGD with a small learning rate. The random draws use a
    private generator and the global random state is restored.

    Raises:
        ConfigError: naming the method, the number of tasks and the method's reason.
    """
    for method in methods:
        m = getattr(method, "num_tasks", None)
        if not isinstance(m, int):
            continue
        trial = copy.deepcopy(method).cpu().double()
        try:
            with _preserved_rng(torch.device("cpu")), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _trial_steps(trial, m)
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"method {type(method).__name__} cannot run on {m} task(s): {error}"
            ) from None


def _trial_steps(method: Method, m: int, n: int = 6, batches: int = 4) -> None:
    """Three driver steps of ``method`` (an epoch end after the second) on the problem of
    :func:`check_methods`."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(batches, m, n, generator=generator, dtype=torch.float64)
    scales = torch.rand(batches, m, generator=generator, dtype=torch.float64) + 0.5
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)

    def losses(batch: int) -> list[Tensor]:
        return list((scales[batch] * torch.exp(directions[batch] @ x)).unbind())

    optimizer = torch.optim.SGD([x], lr=1e-3)
    step = Step(method, optimizer, losses, shared=[x], tasks=m, extra_batches=range(1, batches))
    step(0)
    step(0)
    step.end_epoch()
    step(0)


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


def sample_batch(loader: Any) -> Any:
    """The first batch of a fresh, unshuffled, single-process copy of ``loader`` (a
    ``DataLoader`` with a ``batch_size``, or ``{task: DataLoader}`` / a
    :class:`MultiInputLoader` of them), for :func:`dry_forward` before training; ``loader``
    itself and the global random state are left as they were. ``None`` for anything else, or
    for empty data.
    """
    if isinstance(loader, (Mapping, MultiInputLoader)):
        parts = loader.loaders if isinstance(loader, MultiInputLoader) else loader
        batches = {task: sample_batch(part) for task, part in parts.items()}
        return None if any(b is None for b in batches.values()) else batches
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return None
    twin = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    with _preserved_rng(torch.device("cpu")):
        batch = next(iter(twin), None)
    return tuple(batch) if isinstance(batch, list) else batch


def dry_forward(trainer: Any, batch: Any) -> bool:
    """One forward pass on ``batch`` (eval mode, no gradients, random state restored) checking
    outputs and losses per task.

    Returns:
        Whether the model is single-input and computes one task alone with
        ``forward(x, task=t)`` (:func:`task_forward`).

    Raises:
        ConfigError: the model fails on the batch, misses a task's output, does not give its
            shared representation for ``rep_grad``, or a task's loss rejects the output and
            target (their shapes and dtypes are named) or does not return one number; or its
            ``forward`` takes ``task=`` but does not give that task's output.
    """
    alone = False
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
                alone = task_forward(trainer, inputs, outputs)
            model_hook(model, "auxiliary_losses")  # forget what the dry pass may have left
    finally:
        model.train(was_training)
    return alone


def task_forward(trainer: Any, inputs: Any, outputs: Mapping[str, Any]) -> bool:
    """Whether a single-input model's ``forward(x, task=t)`` computes task ``t`` alone: its
    ``forward`` takes ``task`` (mtlkit's architectures do), and for the first task it gives that
    task's output of ``forward(x)`` (``outputs``), to float tolerance. Called in eval mode
    without gradients.

    Raises:
        ConfigError: the model takes ``task=`` but fails with it, or gives another output.
    """
    model = trainer.model
    if "task" not in inspect.signature(model.forward).parameters:
        return False
    task = trainer.task_names[0]
    name = type(model).__name__
    alone = _forward(trainer, inputs, name, task=task)
    expected, got = outputs[task], alone.get(task)
    same = (
        isinstance(got, Tensor)
        and isinstance(expected, Tensor)
        and got.shape == expected.shape
        and torch.allclose(got.float(), expected.float(), rtol=1e-4, atol=1e-5)
    )
    if not same:
        raise ConfigError(
            f"{name}.forward takes task=, but forward(x, task={task!r}) does not give the output "
            f"of task {task!r} that forward(x) gives ({_describe(got)} vs {_describe(expected)}"
            "); a single-input model's forward(x, task=t) must compute task t's output (the "
            "architecture contract, mtlkit.architectures.base), or not take task="
        )
    return True


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
