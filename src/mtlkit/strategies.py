"""Update strategies: what happens to one mini-batch (how many optimizer steps, on which losses,
with which optimizer state).

A strategy gets from the Trainer, once, a :class:`StrategyContext` (the model, the task names,
an optimizer *factory*, the gradient mode) and then, per batch, the batch and a
``compute_losses(batch) -> ForwardResult`` closure that it may call as often as it needs (each
call is one forward pass with the current weights). It does all backward and optimizer work itself
and returns a :class:`StepReport`. A new strategy is one class: the Trainer does not change.

``Joint(method)`` is the averaged objective of Pascal et al. (2021) ("SUS") when the method is EW:
one forward, one combined backward, one optimizer step per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from mtlkit.autograd import Route, backward
from mtlkit.methods import EW, Method
from mtlkit.registry import Registry

Scheduler = Any  # torch.optim.lr_scheduler.LRScheduler or anything with step()/state_dict()
OptimizerFactory = Callable[[list[nn.Parameter]], "tuple[torch.optim.Optimizer, Scheduler | None]"]


class MultiTaskModel(Protocol):
    """What strategies need of a model (HPS and the other architectures provide it)."""

    def shared_parameters(self) -> Iterator[nn.Parameter]: ...

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


@dataclass
class ForwardResult:
    """One forward pass: a loss per task and, in the features route, the shared
    representation(s) (one tensor, or one per task for multi-input models)."""

    losses: dict[str, Tensor]
    features: Tensor | list[Tensor] | None = None

    def stacked(self, tasks: Sequence[str]) -> Tensor:
        return torch.stack([self.losses[t] for t in tasks])


ComputeLosses = Callable[[Any], ForwardResult]


@dataclass
class StrategyContext:
    """What the Trainer hands a strategy once, before training.

    Attributes:
        model: the multi-task model (``shared_parameters()``, ``task_parameters(task)``).
        tasks: the task names, in order.
        optimizer_factory: ``params -> (optimizer, scheduler or None)``; call it once per
            optimizer state the strategy needs.
        rep_grad: differentiate w.r.t. the shared representation (features route).
        route: Jacobian route for gradient aggregators (see :func:`mtlkit.jacobian`).
        device: where the model lives; methods are moved there.
    """

    model: MultiTaskModel
    tasks: list[str]
    optimizer_factory: OptimizerFactory
    rep_grad: bool = False
    route: Route = "auto"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class StepReport:
    """What a strategy did with one batch.

    Attributes:
        losses: each task's loss at the first forward pass of the batch.
        weights: each task's weight as the method decided (absent for weightless aggregators).
        steps: optimizer steps taken.
    """

    losses: dict[str, float]
    weights: dict[str, float]
    steps: int


class Strategy:
    """Base class of update strategies; see the module docstring for the contract."""

    name: ClassVar[str] = ""

    def setup(self, context: StrategyContext) -> None:
        """Build optimizers (through the factory) and set up methods. Called once."""
        raise NotImplementedError

    def step(self, batch: Any, compute_losses: ComputeLosses, step: int) -> StepReport:
        """Process one batch; ``step`` is the index of the first optimizer step it takes."""
        raise NotImplementedError

    def methods(self) -> list[Method]:
        """The method objects this strategy drives (for hooks and checkpoints)."""
        raise NotImplementedError

    def schedulers(self) -> list[Scheduler]:
        """The learning-rate schedulers, stepped once per epoch by ``on_epoch_end``."""
        return []

    def on_epoch_end(self, epoch: int) -> None:
        for scheduler in self.schedulers():
            scheduler.step()
        for method in self.methods():
            method.on_epoch_end(epoch)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


STRATEGIES: Registry[Strategy] = Registry("strategy")


def method_update(
    result: ForwardResult,
    tasks: Sequence[str],
    method: Method,
    shared: Sequence[nn.Parameter],
    context: StrategyContext,
) -> Tensor | None:
    """The backward of one method over ``tasks``: the features route when the context asks for
    it (and the forward returned features), otherwise the shared parameters."""
    losses = [result.losses[t] for t in tasks]  # a list, not a stack: see autograd.loss_list
    features = result.features if context.rep_grad else None
    return backward(losses, shared=shared, method=method, features=features, route=context.route)


def losses_after_step(
    method: Method, batch: Any, compute_losses: ComputeLosses, tasks: Sequence[str]
) -> Tensor | None:
    """The task losses on the same batch after the step, if the method asks for them."""
    if not method.needs_losses_after:
        return None
    with torch.no_grad():
        return compute_losses(batch).stacked(tasks)


@STRATEGIES.register("joint")
class Joint(Strategy):
    """One forward pass, one combined backward through ``method``, one optimizer step per batch.

    Args:
        method: the method that combines the tasks (EW, the averaged objective, by default).
    """

    name = "joint"

    def __init__(self, method: Method | None = None) -> None:
        self.method = method if method is not None else EW()
        self.context: StrategyContext | None = None

    def __repr__(self) -> str:
        return f"Joint({self.method!r})"

    def setup(self, context: StrategyContext) -> None:
        self.context = context
        self.method.setup(len(context.tasks))
        self.method.to(context.device)
        self.shared = list(context.model.shared_parameters())
        params = list(context.model.parameters()) + list(self.method.parameters())
        self.optimizer, self.scheduler = context.optimizer_factory(params)

    def step(self, batch: Any, compute_losses: ComputeLosses, step: int) -> StepReport:
        context = self._require_setup()
        self.method.before_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        result = compute_losses(batch)
        weights = method_update(result, context.tasks, self.method, self.shared, context)
        self.optimizer.step()
        self.method.after_step(losses_after_step(self.method, batch, compute_losses, context.tasks))
        return StepReport(
            losses={t: float(result.losses[t].detach()) for t in context.tasks},
            weights={} if weights is None else dict(zip(context.tasks, weights.tolist())),
            steps=1,
        )

    def methods(self) -> list[Method]:
        return [self.method]

    def schedulers(self) -> list[Scheduler]:
        return [] if self.scheduler is None else [self.scheduler]

    def state_dict(self) -> dict[str, Any]:
        self._require_setup()
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "method": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._require_setup()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])

    def _require_setup(self) -> StrategyContext:
        if self.context is None:
            raise RuntimeError("call setup(context) before using the strategy")
        return self.context
