"""Update strategies: what happens to one mini-batch (how many optimizer steps, on which losses,
with which optimizer state).

A strategy gets from the Trainer, once, a :class:`StrategyContext` (the model, the task names,
an optimizer *factory*, the gradient mode) and then, per batch, the batch and a
``compute_losses(batch) -> ForwardResult`` closure that it may call as often as it needs (each
call is one forward pass with the current weights; the Trainer's is a
:class:`~mtlkit.training.forward.SubsetLosses`, which also computes a subset of the tasks). It does
all backward and optimizer work itself and returns a :class:`StepReport`. A new strategy is one
class: the Trainer does not change.

``Joint(method)`` is the averaged objective of Pascal et al. (2021) ("SUS") when the method is EW:
one forward, one combined backward, one optimizer step per batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from mtlkit.engine.backward import StepRoute
from mtlkit.engine.contract import SolverStatus
from mtlkit.engine.layer_capture import LayerCapture
from mtlkit.errors import ConfigError
from mtlkit.methods import EW, Method
from mtlkit.parallel.ddp import Reducer
from mtlkit.registry import Registry
from mtlkit.training.forward import ComputeLosses, restrict
from mtlkit.training.group_selection import AffinityGroups
from mtlkit.training.groups import GroupSchedule, GroupSpec, RandomGroups, Resample
from mtlkit.training.nonfinite import NonFiniteGuard
from mtlkit.training.route_choice import AutoRoute
from mtlkit.training.step import StepEnvironment, method_step
from mtlkit.training.step import check_method as check_step

Scheduler = Any  # torch.optim.lr_scheduler.LRScheduler or anything with step()/state_dict()
OptimizerFactory = Callable[[list[nn.Parameter]], "tuple[torch.optim.Optimizer, Scheduler | None]"]


class MultiTaskModel(Protocol):
    """What strategies need of a model (HPS and the other architectures provide it)."""

    def shared_parameters(self) -> Iterator[nn.Parameter]: ...

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


@dataclass
class StrategyContext:
    """What the Trainer hands a strategy once, before training.

    Attributes:
        model: the multi-task model (``shared_parameters()``, ``task_parameters(task)``).
        tasks: the task names, in order.
        optimizer_factory: ``params -> (optimizer, scheduler or None)``; call it once per
            optimizer state the strategy needs.
        rep_grad: differentiate w.r.t. the shared representation (features route).
        route: route of gradient aggregators: a Jacobian route (see :func:`mtlkit.jacobian`) or
            ``"gramian"`` (the layer-wise Gramian of :mod:`mtlkit.engine.layer_capture`, for Gramian
            weightings on the parameter route; the context then holds its ``capture``). ``"auto"``
            measures the loop and the Gramian route for a Gramian weighting on the first steps
            and keeps the faster (:mod:`mtlkit.training.route_choice`; in one process without
            loss scaling or accumulation); other methods take the loop.
        device: where the model lives; methods are moved there.
        on_optimizer_step: to call right after every optimizer step (the Trainer measures the
            path travelled by the shared parameters with it).
        draw_batches: ``count -> [batch, ...]``: training batches independent of the current
            one, for methods with ``extra_batches > 0`` (the Trainer draws them from a separately
            shuffled copy of the training data, already on the device).
        reducer: DDP / loss-scaling hook given to :func:`mtlkit.backward`
            (:mod:`mtlkit.parallel.ddp`); ``None`` for one process in float32.
        optimizer_step: ``optimizer -> stepped``: takes an optimizer step (the Trainer's also
            synchronises gradients across processes and skips the step on an fp16 overflow).
        accumulate: micro-batches per optimizer step (:mod:`mtlkit.training.accumulation`).
        on_nonfinite: what a step does on a NaN/inf loss, gradient or solver failure:
            ``raise``, ``skip_step`` or ``skip_task`` (:mod:`mtlkit.training.nonfinite`; the
            context's ``guard`` applies it).
        environment: the :class:`~mtlkit.training.step.StepEnvironment` built from these, which
            every step of the strategy runs in (:func:`mtlkit.training.step.method_step`).
    """

    model: MultiTaskModel
    tasks: list[str]
    optimizer_factory: OptimizerFactory
    rep_grad: bool = False
    route: StepRoute = "auto"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    on_optimizer_step: Callable[[], None] = field(default=lambda: None)
    draw_batches: Callable[[int], list[Any]] = field(default=lambda count: _no_batches(count))
    reducer: Reducer | None = None
    optimizer_step: Callable[[torch.optim.Optimizer], bool] = field(
        default=lambda optimizer: optimizer.step() or True
    )
    accumulate: int = 1
    on_nonfinite: str = "raise"
    environment: StepEnvironment = field(init=False, repr=False)

    def __post_init__(self) -> None:
        capture, auto = None, None
        if self.route == "gramian" and not self.rep_grad:
            capture = LayerCapture(self.model, shared=self.model.shared_parameters(), verify=True)
        single = self.reducer is None or self.reducer.passthrough  # one process, no loss scale
        if self.route == "auto" and not self.rep_grad and single and self.accumulate == 1:
            auto = AutoRoute(self.model, list(self.model.shared_parameters()), self.device)
        self.environment = StepEnvironment(
            rep_grad=self.rep_grad,
            route=self.route,
            reducer=self.reducer,
            accumulate=self.accumulate,
            on_nonfinite=self.on_nonfinite,
            draw_batches=self.draw_batches,
            optimizer_step=self.optimizer_step,
            on_optimizer_step=self.on_optimizer_step,
            capture=capture,
            auto=auto,
        )

    @property
    def guard(self) -> NonFiniteGuard:
        """The ``on_nonfinite`` guard of the steps (its counters)."""
        return self.environment.guard

    @property
    def capture(self) -> LayerCapture | None:
        """The layer capture of the Gramian route, if it is the route."""
        return self.environment.capture

    @property
    def auto_route(self) -> AutoRoute | None:
        """The measurement of ``route="auto"`` (its choice and timings), if it applies."""
        return self.environment.auto


def _no_batches(count: int) -> list[Any]:
    raise ConfigError(
        f"a method asked for {count} extra batch(es), but this strategy context has no source of "
        "batches (StrategyContext.draw_batches); the Trainer provides one"
    )


def check_method(method: Method, context: StrategyContext) -> None:
    """Reject method x gradient-route combinations that cannot work, before training."""
    check_step(method, context.environment)


@dataclass
class StepReport:
    """What a strategy did with one batch.

    Attributes:
        losses: each task's loss on the batch before the step that trains it (``Joint``: the
            batch's forward pass; ``Alternating``: its group's).
        weights: each task's weight as the method decided (absent for weightless aggregators).
        steps: optimizer steps taken.
        backwards: backward passes through the shared part of the model (a gradient aggregator
            on the parameter route takes one per task; forward passes are counted by the
            Trainer, one per ``compute_losses`` call).
        statuses: how the methods' solvers ended, one per method step that reported one.
    """

    losses: dict[str, float]
    weights: dict[str, float]
    steps: int
    backwards: int = 1
    statuses: list[SolverStatus] = field(default_factory=list)


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

    @property
    def guard(self) -> NonFiniteGuard | None:
        """The ``on_nonfinite`` guard of the steps (its counters), once set up."""
        return getattr(getattr(self, "context", None), "guard", None)

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
        check_method(self.method, context)
        self.method.setup(len(context.tasks))
        self.method.to(context.device)
        self.shared = list(context.model.shared_parameters())
        shared_ids = {id(p) for p in self.shared}
        others = [p for p in context.model.parameters() if id(p) not in shared_ids]
        self.trained = self.shared + others
        params = list(context.model.parameters()) + list(self.method.parameters())
        self.optimizer, self.scheduler = context.optimizer_factory(params)

    def step(self, batch: Any, compute_losses: ComputeLosses, step: int) -> StepReport:
        context = self._require_setup()
        done = method_step(
            self.method,
            self.optimizer,
            batch,
            compute_losses,
            tasks=context.tasks,
            shared=self.shared,
            parameters=self.trained,
            index=step,
            environment=context.environment,
        )
        statuses = [] if done.status is None else [done.status]
        return StepReport(done.losses, done.weights, 1, done.backwards, statuses)

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


OptimizerMode = Literal["shared", "per_group"]
GroupPlan = tuple[Method, torch.optim.Optimizer, list[str], list[nn.Parameter]]
"""One group's step in :class:`Alternating`: its method, optimizer, tasks and the parameters the
step updates."""
LrScaling = Literal["none", "sqrt", "linear"]
SharedDecay = Literal["per_step", "per_batch"]


class Alternating(Strategy):
    """Independent task-specific steps (Pascal et al., 2021, "Optimization Strategies in
    Multi-Task Learning: Averaged or Independent Losses?").

    For each mini-batch and each task group ``g`` in turn, on the *same* batch: a forward pass
    with the current weights (so every step sees the previous steps' updates), the backward of
    that group's loss only (the sum of its tasks' losses, or ``method``'s combination of them),
    and an optimizer step. With ``G`` groups the shared parameters take ``G`` steps per batch.
    When ``compute_losses`` is a :class:`~mtlkit.training.forward.SubsetLosses` (the Trainer's
    is), a group's forward pass computes only that group's losses (and, for a one-task group
    of a model whose ``forward`` takes ``task=``, only its head); the report gives each task's
    loss from its own group's forward pass, before that group's step.

    * ``optimizers="shared"``: one optimizer state for everything (the paper's "IUS").
    * ``optimizers="per_group"``: one optimizer state per group, over the shared parameters and
      that group's heads (the paper's "IO": one Adam per task), each built by the Trainer's
      factory, so any ``torch.optim`` optimizer and scheduler works. Needs fixed groups.

    Idle heads never move: before each group's step the gradients are reset to ``None``, and
    ``torch.optim`` optimizers skip parameters without a gradient, so momentum does not carry a
    head that did not take part in the step. (The paper's code zero-filled the gradients, so
    Adam kept moving idle heads by momentum; this is a deliberate difference.)

    Weight decay: with ``shared_decay="per_step"`` (default) the optimizer decays the shared
    parameters at each of their ``G`` steps per batch, as the paper's code does; with
    ``"per_batch"`` their weight decay is divided by ``G`` so that they decay about as much per
    batch as under the averaged objective (heads take one step per batch either way).

    Args:
        method: how a group of several tasks is combined (EW, the sum, by default); one copy
            per group, so stateful methods keep per-group state.
        groups: ``"each"`` (one task per group, the default), a list of task-name lists,
            :class:`~mtlkit.training.groups.RandomGroups` or
            :class:`~mtlkit.training.group_selection.AffinityGroups` (selected from the
            Trainer's affinity logging).
        optimizers: ``"shared"`` or ``"per_group"``.
        order: ``"fixed"`` (the groups' order, as in the paper) or ``"random"`` (redrawn each
            batch).
        lr_scaling: multiply every learning rate by ``1/sqrt(G)`` (``"sqrt"``) or ``1/G``
            (``"linear"``); ``"none"`` by default. The paper retuned the learning rate as ``G``
            grew (1e-3 for one step, 5e-4 for 4-8 steps, 1e-4 for 40 steps per batch on CelebA).
        shared_decay: ``"per_step"`` or ``"per_batch"`` (see above).
        seed: seed of the random order.
    """

    name = "alternating"

    def __init__(
        self,
        method: Method | None = None,
        groups: GroupSpec = "each",
        optimizers: OptimizerMode = "shared",
        order: Literal["fixed", "random"] = "fixed",
        lr_scaling: LrScaling = "none",
        shared_decay: SharedDecay = "per_step",
        seed: int = 0,
    ) -> None:
        for value, name, valid in [
            (optimizers, "optimizers", ("shared", "per_group")),
            (order, "order", ("fixed", "random")),
            (lr_scaling, "lr_scaling", ("none", "sqrt", "linear")),
            (shared_decay, "shared_decay", ("per_step", "per_batch")),
        ]:
            if value not in valid:
                raise ConfigError(
                    f"Alternating {name} must be one of {', '.join(valid)}; got {value!r}"
                )
        self.prototype = method if method is not None else EW()
        self.group_spec = groups
        self.optimizer_mode = optimizers
        self.order = order
        self.lr_scaling = lr_scaling
        self.shared_decay = shared_decay
        self.seed = seed
        self.context: StrategyContext | None = None

    def __repr__(self) -> str:
        return (
            f"Alternating({self.prototype!r}, groups={self.group_spec!r}, "
            f"optimizers={self.optimizer_mode!r}, order={self.order!r}, "
            f"lr_scaling={self.lr_scaling!r}, shared_decay={self.shared_decay!r})"
        )

    # ----------------------------------------------------------------- setup
    def setup(self, context: StrategyContext) -> None:
        self.context = context
        self.schedule = GroupSchedule(self.group_spec, context.tasks)
        groups = self.schedule.groups
        if self.schedule.resample != "never":
            if self.optimizer_mode == "per_group":
                raise ConfigError(
                    "optimizers='per_group' needs fixed groups (a group's optimizer state belongs "
                    "to its tasks); use RandomGroups(resample='never') or optimizers='shared'"
                )
            if list(self.prototype.parameters()):
                raise ConfigError(
                    f"{type(self.prototype).__name__} has learnable per-task state, which needs "
                    "fixed groups; use RandomGroups(resample='never')"
                )
        if getattr(self.prototype, "conditions_model", False):  # COSMOS: one ray, all tasks
            raise ConfigError(f"{type(self.prototype).__name__} needs the Joint strategy")
        check_method(self.prototype, context)
        self.group_methods = [copy.deepcopy(self.prototype) for _ in groups]
        for method, group in zip(self.group_methods, groups):
            method.setup(len(group))
            method.to(context.device)
        self.order_generator = torch.Generator().manual_seed(self.seed)
        model = context.model
        self.shared = list(model.shared_parameters())
        heads = {t: list(model.task_parameters(t)) for t in context.tasks}
        _check_coverage(model, self.shared, heads)
        self.heads = heads
        self._plans_of: list[list[str]] | None = None  # the groups the plans were made for
        self._group_plans: list[GroupPlan] = []
        decay_scale = 1.0 / len(groups) if self.shared_decay == "per_batch" else 1.0
        if self.optimizer_mode == "shared":
            rest = [p for t in context.tasks for p in heads[t]]
            rest += [p for m in self.group_methods for p in m.parameters()]
            built = [_build(context.optimizer_factory, self.shared, rest, decay_scale)]
        else:
            built = [
                _build(
                    context.optimizer_factory,
                    self.shared,
                    [p for t in group for p in heads[t]] + list(method.parameters()),
                    decay_scale,
                )
                for group, method in zip(groups, self.group_methods)
            ]
        self.optimizers = [opt for opt, _ in built]
        self.lr_schedulers = [sched for _, sched in built if sched is not None]
        scale = {"none": 1.0, "sqrt": len(groups) ** -0.5, "linear": 1.0 / len(groups)}
        for opt, sched in built:
            _scale_learning_rate(opt, sched, scale[self.lr_scaling])

    # ------------------------------------------------------------------ step
    def step(self, batch: Any, compute_losses: ComputeLosses, step: int) -> StepReport:
        context = self._require_setup()
        if self.schedule.maybe_resample("step"):
            self._reset_group_methods()
        plans = self._plans()
        order: Sequence[int] = range(len(plans))
        if self.order == "random":
            order = torch.randperm(len(plans), generator=self.order_generator).tolist()
        environment = context.environment
        report_losses: dict[str, float] = {}
        weights: dict[str, float] = {}
        backwards, statuses = 0, []
        for offset, g in enumerate(order):
            method, optimizer, group, parameters = plans[g]
            done = method_step(
                method,
                optimizer,
                batch,
                restrict(compute_losses, group),  # the group's heads and losses only
                tasks=group,
                shared=self.shared,
                parameters=parameters,
                index=step + offset,
                environment=environment,
            )
            for t in group:
                report_losses[t] = done.losses[t]
            weights.update(done.weights)
            backwards += done.backwards
            if done.status is not None:
                statuses.append(done.status)
        losses = {t: report_losses[t] for t in context.tasks}  # in task order
        return StepReport(losses, weights, len(plans), backwards, statuses)

    def on_epoch_end(self, epoch: int) -> None:
        super().on_epoch_end(epoch)
        if self.schedule.maybe_resample("epoch"):
            self._reset_group_methods()

    def _plans(self) -> list[GroupPlan]:
        """Per group: its method, its optimizer, its tasks and the parameters its step updates
        (the shared ones and the group's heads); kept while the groups stay (a new groups list
        makes new plans)."""
        groups = self.schedule.groups
        if self._plans_of is not groups:
            shared_mode = self.optimizer_mode == "shared"
            self._group_plans = [
                (
                    self.group_methods[g],
                    self.optimizers[0 if shared_mode else g],
                    group,
                    self.shared + [p for t in group for p in self.heads[t]],
                )
                for g, group in enumerate(groups)
            ]
            self._plans_of = groups
        return self._group_plans

    def _reset_group_methods(self) -> None:
        self._plans_of = None  # new groups
        for method, group in zip(self.group_methods, self.schedule.groups):
            method.reset()
            method.setup(len(group))

    # ------------------------------------------------------------- plumbing
    @property
    def groups(self) -> list[list[str]]:
        """The current task groups."""
        return self.schedule.groups

    def methods(self) -> list[Method]:
        return list(self.group_methods)

    def schedulers(self) -> list[Scheduler]:
        return list(self.lr_schedulers)

    def state_dict(self) -> dict[str, Any]:
        self._require_setup()
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.lr_schedulers],
            "methods": [m.state_dict() for m in self.group_methods],
            "groups": self.schedule.state_dict(),
            "order_generator": self.order_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._require_setup()
        self.schedule.load_state_dict(state["groups"])
        for obj, saved in zip(self.optimizers, state["optimizers"], strict=True):
            obj.load_state_dict(saved)
        for obj, saved in zip(self.lr_schedulers, state["schedulers"], strict=True):
            obj.load_state_dict(saved)
        for obj, saved in zip(self.group_methods, state["methods"], strict=True):
            obj.load_state_dict(saved)
        self.order_generator.set_state(state["order_generator"])

    def _require_setup(self) -> StrategyContext:
        if self.context is None:
            raise RuntimeError("call setup(context) before using the strategy")
        return self.context


@STRATEGIES.register("alternating")
def alternating(
    method: Method | None = None,
    groups: str | list[list[str]] = "each",
    group_size: int | None = None,
    resample: Resample = "never",
    group_seed: int = 0,
    optimizers: OptimizerMode = "shared",
    order: Literal["fixed", "random"] = "fixed",
    lr_scaling: LrScaling = "none",
    shared_decay: SharedDecay = "per_step",
    seed: int = 0,
    affinity_groups: int | None = None,
    affinity: Literal["tag", "cosine"] = "tag",
    affinity_warmup: int = 1,
    affinity_recompute: Literal["never", "epoch"] = "never",
) -> Alternating:
    """:class:`Alternating` from plain values (CLI and configs): ``group_size=s`` draws
    :class:`~mtlkit.training.groups.RandomGroups` of ``s`` tasks (``resample``, ``group_seed``);
    ``affinity_groups=k`` selects ``k`` groups from the run's affinities
    (:class:`~mtlkit.training.group_selection.AffinityGroups` with ``affinity``,
    ``affinity_warmup`` epochs, ``affinity_recompute``; ``group_seed`` seeds the warm-up groups;
    needs the config key ``affinity_every``)."""
    if affinity_groups is not None:
        if groups != "each" or group_size is not None or resample != "never":
            raise ConfigError("give affinity_groups alone: not with groups, group_size or resample")
        spec: GroupSpec = AffinityGroups(
            affinity_groups, affinity, affinity_warmup, affinity_recompute, group_seed
        )
    elif group_size is not None:
        if groups != "each":
            raise ConfigError("give either groups or group_size, not both")
        spec = RandomGroups(group_size, resample, group_seed)
    elif resample != "never":
        raise ConfigError("resample needs group_size (random groups)")
    else:
        spec = groups
    return Alternating(method, spec, optimizers, order, lr_scaling, shared_decay, seed)


def _check_coverage(
    model: MultiTaskModel, shared: list[nn.Parameter], heads: dict[str, list[nn.Parameter]]
) -> None:
    """Every trainable parameter of the model must be shared or belong to a task."""
    covered = {id(p) for p in shared} | {id(p) for ps in heads.values() for p in ps}
    orphans = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
    if orphans:
        shapes = [tuple(p.shape) for p in orphans]
        raise ConfigError(
            f"{len(orphans)} trainable parameter(s) (shapes {shapes}) are neither in "
            "shared_parameters() nor in any task_parameters(task); alternating steps would "
            "never update them"
        )


def _build(
    factory: OptimizerFactory, shared: list[nn.Parameter], rest: list[nn.Parameter], decay: float
) -> tuple[torch.optim.Optimizer, Scheduler | None]:
    """An optimizer over ``shared + rest``; with ``decay != 1`` the shared parameters are a
    parameter group of their own whose weight decay is multiplied by ``decay``."""
    if decay == 1.0:
        return factory(shared + rest)
    optimizer, scheduler = factory([{"params": shared}, {"params": rest}])  # type: ignore[list-item]
    optimizer.param_groups[0]["weight_decay"] = (
        optimizer.param_groups[0].get("weight_decay", 0.0) * decay
    )
    return optimizer, scheduler


def _scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, scale: float) -> None:
    """Multiply every learning rate (and the scheduler's base rates) by ``scale``."""
    if scale == 1.0:
        return
    for group in optimizer.param_groups:
        group["lr"] *= scale
        if "initial_lr" in group:
            group["initial_lr"] *= scale
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
