"""The step driver: one method's whole step protocol around an optimizer, for every loop.

Every optimizer step of mtlkit, in a user's own loop (:class:`Step`), in the strategies
(``Joint``, ``Alternating``), in the 2-D toy and in the pre-flight check, runs through
:func:`method_step`, which calls, in this order:

1. ``method.before_step(index)``;
2. ``method.prepare(probe)`` for the methods that take virtual steps (``needs_probe``: the
   bilevel methods), with the batch, independent extra batches, the stepped parameters and the
   learning rate;
3. ``optimizer.zero_grad(set_to_none=True)``;
4. the forward pass (``compute_losses(batch)``);
5. ``method.observe_extra(jacobians)`` for the methods with ``extra_batches > 0`` (MoDo,
   SDMGrad): the Jacobians of the same tasks on that many independent batches;
6. the backward (:func:`mtlkit.engine.backward.method_backward`), guarded by the ``on_nonfinite``
   policy (:mod:`mtlkit.training.nonfinite`);
7. the optimizer step (skipped by the policy on a fault);
8. ``method.after_step(losses_after)``, with the losses recomputed on the same batch for the
   methods that ask (``needs_losses_after``: FAMO);

and ``method.on_epoch_end(epoch)`` at the end of each epoch. A method sees the same calls
whichever loop drives it, so a stateful method (FAMO, DWA, GradNorm, STCH, SLAW, the bilevel
methods, ...) trains the same in a user's loop as in the Trainer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.engine.backward import StepRoute, method_backward
from mtlkit.engine.contract import Decision, Reducer, SolverStatus
from mtlkit.engine.jacobian import jacobian
from mtlkit.engine.layer_capture import LayerCapture
from mtlkit.errors import ConfigError
from mtlkit.methods.base import Method, StepProbe
from mtlkit.training.accumulation import accumulate, check_parallel
from mtlkit.training.forward import ComputeLosses, ForwardResult, as_forward_result
from mtlkit.training.nonfinite import NonFiniteGuard, Outcome, check_policy
from mtlkit.training.route_choice import AutoRoute

__all__ = [
    "Step",
    "StepEnvironment",
    "StepResult",
    "check_method",
    "method_step",
]


def _no_batches(count: int) -> list[Any]:
    raise ConfigError(
        f"a method asked for {count} extra batch(es), but no source of independent batches was "
        "given (mtlkit.Step(..., extra_batches=loader); the Trainer provides one)"
    )


def _plain_step(optimizer: torch.optim.Optimizer) -> bool:
    optimizer.step()
    return True


@dataclass
class StepEnvironment:
    """How the steps of a run are taken: set once, shared by all its method steps.

    Attributes:
        rep_grad: differentiate w.r.t. the shared representation (the features route); the
            forward pass must then return its features.
        route: a Jacobian route (:func:`mtlkit.jacobian`) or ``"gramian"`` (the layer-wise
            Gramian; ``capture`` then holds the layer capture).
        reducer: DDP / loss-scaling hook given to the engine (:mod:`mtlkit.parallel.ddp`).
        accumulate: micro-batches per optimizer step (:mod:`mtlkit.training.accumulation`).
        on_nonfinite: ``raise``, ``skip_step`` or ``skip_task`` (:mod:`mtlkit.training.nonfinite`).
        draw_batches: ``count -> [batch, ...]``: training batches independent of the current one,
            for methods with ``extra_batches > 0`` or a probe.
        optimizer_step: ``optimizer -> stepped`` (the Trainer's also synchronises gradients
            across processes and skips the step on an fp16 overflow).
        on_optimizer_step: called right after every optimizer step.
        capture: the layer capture of the Gramian route (with ``auto``: while the Gramian route
            is measured or chosen).
        auto: for ``route="auto"``, the measurement that picks the loop or the Gramian route
            for Gramian weightings (:mod:`mtlkit.training.route_choice`); ``None``: the loop.
    """

    rep_grad: bool = False
    route: StepRoute = "auto"
    reducer: Reducer | None = None
    accumulate: int = 1
    on_nonfinite: str = "raise"
    draw_batches: Callable[[int], list[Any]] = _no_batches
    optimizer_step: Callable[[torch.optim.Optimizer], bool] = _plain_step
    on_optimizer_step: Callable[[], None] = field(default=lambda: None)
    capture: LayerCapture | None = None
    auto: AutoRoute | None = None
    guard: NonFiniteGuard = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_policy(self.on_nonfinite)
        distributed = bool(getattr(self.reducer, "distributed", False))
        self.guard = NonFiniteGuard(self.on_nonfinite, self.accumulate, distributed)

    @property
    def jacobian_route(self) -> str:
        """The route of the Jacobians that are still formed (extra batches)."""
        return "auto" if self.route == "gramian" else self.route

    def backward_route(self, method: Method, num_tasks: int, features: Any) -> str:
        """``"gramian"`` or the Jacobian route of this step's backward of ``method``."""
        if method.kind != "gradient" or features is not None:
            return self.jacobian_route
        if self.auto is not None and getattr(method, "gramian_weighting", False):
            route = self.auto.route(method, num_tasks)
            self.capture = self.auto.capture  # registered, kept or removed by the measurement
            return route
        return "gramian" if self.capture is not None else self.jacobian_route


@dataclass
class StepResult:
    """What one method step did.

    Attributes:
        losses: the step's task losses, before the step.
        weights: each task's weight as the method decided (empty for weightless aggregators, and
            for a skipped step).
        stepped: whether the optimizer stepped (``False``: skipped by the ``on_nonfinite``
            policy).
        backwards: backward passes through the shared part of the model.
        status: how the method's solver ended, if it has one.
    """

    losses: dict[str, float]
    weights: dict[str, float]
    stepped: bool
    backwards: int
    status: SolverStatus | None = None


def check_method(method: Method, environment: StepEnvironment) -> None:
    """Reject method x gradient-route combinations that cannot work, before training."""
    if environment.route == "gramian" and method.kind == "gradient":
        if environment.rep_grad:
            raise ConfigError(
                "route=gramian is a parameter-route engine; with rep_grad=true the Jacobian "
                "w.r.t. the features is already small: use route=auto"
            )
        if not getattr(method, "gramian_weighting", False):
            raise ConfigError(
                f"route=gramian needs a Gramian weighting (a method whose direction is "
                f"weights(J Jᵀ) @ J); {type(method).__name__} needs the Jacobian itself: use "
                "route=auto, loop or batched"
            )
    if method.extra_batches and not method.needs_probe and environment.rep_grad:
        raise ConfigError(
            f"{type(method).__name__} needs Jacobians of independent batches w.r.t. the shared "
            "parameters (extra_batches > 0); the features route (rep_grad) gives per-sample "
            "feature gradients that cannot be paired across batches: use rep_grad=false"
        )
    check_parallel(method, environment)


def method_update(
    result: ForwardResult,
    tasks: Sequence[str],
    method: Method,
    shared: Sequence[nn.Parameter],
    environment: StepEnvironment,
    compute_losses: ComputeLosses,
) -> Outcome:
    """The backward of one method over ``tasks``: the features route when the environment asks
    for it (and the forward returned features), otherwise the shared parameters. A method with
    ``extra_batches > 0`` first observes the Jacobians of ``tasks`` on that many independent
    batches (one forward pass each). Guarded by the environment's ``on_nonfinite`` policy.

    Returns:
        The task weights the method used (empty for weightless aggregators), the number of
        backward passes through the shared part of the model, and the solver status.
    """
    update = partial(_unguarded_update, method, shared, environment, compute_losses)
    return environment.guard.update(result, tasks, update, environment)


def _unguarded_update(
    method: Method,
    shared: Sequence[nn.Parameter],
    environment: StepEnvironment,
    compute_losses: ComputeLosses,
    result: ForwardResult,
    tasks: Sequence[str],
) -> Outcome:
    """:func:`method_update` without the guard (the guard runs it, and again on a redo)."""
    backwards = 0
    if method.extra_batches and not method.needs_probe:
        jacobians = []
        for batch in environment.draw_batches(method.extra_batches):
            losses = compute_losses(batch).loss_list(tasks)
            jac = jacobian(losses, shared, route=environment.jacobian_route, retain_graph=False)
            reducer = environment.reducer
            jacobians.append(jac if reducer is None else reducer.reduce_jacobian(jac))
            backwards += len(tasks)
        method.observe_extra(jacobians)
    losses = result.loss_list(tasks)  # a list, not a stack: see mtlkit.engine.jacobian.loss_list
    if method.kind != "gradient":  # a loss weighting: one seeded backward, no route to choose
        decision = method_backward(losses, method=method, check_losses=False)
        backwards += 1
    else:
        decision = _aggregate(method, losses, shared, environment, result.features)
        per_task = not environment.rep_grad or result.features is None
        backwards += len(tasks) if per_task and len(tasks) > 1 else 1
    if environment.capture is not None:
        environment.capture.clear()  # records this backward did not consume (loss weightings)
    weights = decision.weights
    named = {} if weights is None else dict(zip(tasks, weights.tolist()))
    return named, backwards, decision.status


def _aggregate(
    method: Method,
    losses: list[Tensor],
    shared: Sequence[nn.Parameter],
    environment: StepEnvironment,
    features: Any,
) -> Decision:
    """The backward of a gradient aggregator on the environment's route (``route="auto"``:
    measured on the first steps, :mod:`mtlkit.training.route_choice`)."""
    features = features if environment.rep_grad else None
    route = environment.backward_route(method, len(losses), features)

    def backward(with_method: Method, capture: LayerCapture | None, retain: bool) -> Decision:
        return method_backward(
            losses,
            shared=shared,
            method=with_method,
            features=features,
            route=environment.jacobian_route,
            capture=capture,
            reducer=environment.reducer,
            retain_graph=retain,
            check_losses=False,  # the guard checked them
        )

    auto = environment.auto
    if auto is not None and route == "loop" and auto.choice is None:
        return auto.measure(method, losses, backward)  # route="auto" still measuring
    return backward(method, environment.capture if route == "gramian" else None, False)


def method_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    compute_losses: ComputeLosses,
    *,
    tasks: Sequence[str],
    shared: Sequence[nn.Parameter],
    parameters: list[nn.Parameter],
    index: int,
    environment: StepEnvironment,
) -> StepResult:
    """One optimizer step of ``method`` over ``tasks`` on ``batch``: the protocol of the module
    docstring.

    Args:
        method: the method, set up for ``len(tasks)`` tasks.
        optimizer: the optimizer that takes the step.
        batch: the training batch.
        compute_losses: ``batch -> ForwardResult`` (one forward pass with the current weights).
        tasks: the tasks of this step, in the method's order.
        shared: the shared parameters (the parameter route's Jacobian is taken w.r.t. them).
        parameters: every parameter this step updates (shared ones first): what the probe may
            move and the non-finite guard checks.
        index: the global index of this optimizer step (``before_step``).
        environment: how the run's steps are taken.
    """
    guard = environment.guard
    guard.begin(parameters, method, lambda: compute_losses(batch))
    method.before_step(index)
    if method.needs_probe:
        extra = environment.draw_batches(method.extra_batches) if method.extra_batches else []
        method.prepare(
            StepProbe(
                batch=batch,
                extra=extra,
                parameters=parameters,
                learning_rate=float(optimizer.param_groups[0]["lr"]),
                compute=lambda b: compute_losses(b).loss_list(tasks),
            )
        )
    optimizer.zero_grad(set_to_none=True)
    if environment.accumulate > 1:
        result, weights, backwards, status = accumulate(
            batch, tasks, method, shared, parameters, environment, compute_losses, method_update
        )
    else:
        result = compute_losses(batch)
        weights, backwards, status = method_update(
            result, tasks, method, shared, environment, compute_losses
        )
    losses = result.floats()
    stepped = guard.commit(environment)  # False: a skipped step (mtlkit.training.nonfinite)
    if stepped:
        environment.optimizer_step(optimizer)
        guard.stepped()  # its weights: checked by the next fault or check_weights()
        environment.on_optimizer_step()
        after = None
        if method.needs_losses_after:
            with torch.no_grad():
                after = compute_losses(batch).stacked(tasks)
        method.after_step(after)
    return StepResult(losses, weights if stepped else {}, stepped, backwards, status)


class Step:
    """A method's whole step protocol around your optimizer, for your own training loop.

    ::

        def task_losses(batch):
            x, y = batch
            z = encoder(x)
            return [crit[t](heads[t](z), y[t]) for t in tasks]

        step = mtlkit.Step(methods.FAMO(), optimizer, task_losses, shared=encoder.parameters())
        for epoch in range(epochs):
            for batch in loader:
                step(batch)              # before_step, zero_grad, forward, backward, step, after
            step.end_epoch()             # the method's epoch hook (DWA, STCH, ...)

    Each call runs :func:`method_step`: the hooks of every registered method, in the order the
    Trainer runs them, so a method trains the same here and in the Trainer. ``loss_fn(batch)``
    is the forward pass; the driver may call it more than once per step (FAMO's losses after
    the step, the bilevel methods' virtual steps, extra batches), always with the current
    weights. It returns a list of scalar task losses, a ``[m]`` tensor, a dict
    ``{task: loss}``, or a :class:`~mtlkit.training.forward.ForwardResult` with the shared
    representation for ``features=True``.

    The method is set up for the number of tasks on the first call (one extra forward pass,
    without gradient, when ``tasks`` is not given); learnable method parameters (UW's
    log-variances) that the optimizer does not hold yet are added to it as a parameter group.

    Args:
        method: a registered method (:mod:`mtlkit.methods`).
        optimizer: a ``torch.optim`` optimizer over the model's parameters.
        loss_fn: ``batch -> task losses``, one forward pass.
        shared: the shared parameters (needed by gradient aggregators on the parameter route).
        features: differentiate w.r.t. the shared representation returned by ``loss_fn`` in a
            ForwardResult (the cheaper features route).
        tasks: the task names (or their number), if known.
        route: the Jacobian route (``"auto"``, ``"loop"``, ``"batched"``).
        extra_batches: an iterable of training batches independent of the loop's (e.g. a
            second DataLoader over the training set), for the methods that need them (MoDo,
            SDMGrad, Auto-Lambda, MOML, FORUM); it is cycled.
        on_nonfinite: ``"raise"`` (default), ``"skip_step"`` or ``"skip_task"``
            (:mod:`mtlkit.training.nonfinite`): every method gets the same checks of its losses,
            gradients and weights.
        reducer: data parallelism and loss scaling (:class:`mtlkit.parallel.ddp.Reducer`).
    """

    def __init__(
        self,
        method: Method,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any], Any],
        *,
        shared: Iterable[nn.Parameter] | None = None,
        features: bool = False,
        tasks: Sequence[str] | int | None = None,
        route: StepRoute = "auto",
        extra_batches: Iterable[Any] | None = None,
        on_nonfinite: str = "raise",
        reducer: Reducer | None = None,
    ) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method must be a mtlkit method, got {type(method).__name__}")
        if route == "gramian":
            raise ConfigError(
                "mtlkit.Step takes the Jacobian routes (auto, loop, batched); for the Gramian "
                "route call mtlkit.backward(..., capture=LayerCapture(encoder)) in your loop"
            )
        self.method = method
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.shared = [] if shared is None else list(shared)
        if method.kind == "gradient" and not features and not self.shared:
            raise ConfigError(
                f"{type(method).__name__} aggregates gradients: give shared=<the shared "
                "parameters> or features=True (and return the features from loss_fn)"
            )
        self.tasks = [str(i) for i in range(tasks)] if isinstance(tasks, int) else tasks
        self._extra: Iterator[Any] | None = None
        needs_batches = method.extra_batches > 0
        if needs_batches and extra_batches is None:
            raise ConfigError(
                f"{type(method).__name__} needs {method.extra_batches} independent batch(es) "
                "per step: give mtlkit.Step(..., extra_batches=<a second loader over the "
                "training data>)"
            )
        if extra_batches is not None:
            self._extra = itertools.cycle(extra_batches)
        self.environment = StepEnvironment(
            rep_grad=features,
            route=route,
            reducer=reducer,
            on_nonfinite=on_nonfinite,
            draw_batches=self._draw,
        )
        check_method(method, self.environment)
        self.index = 0
        self.epoch = 0
        self._ready = False

    def __repr__(self) -> str:
        return f"Step({self.method!r}, index={self.index}, epoch={self.epoch})"

    def _draw(self, count: int) -> list[Any]:
        if self._extra is None:
            return _no_batches(count)
        return [next(self._extra) for _ in range(count)]

    def _compute(self, batch: Any) -> ForwardResult:
        result = as_forward_result(self.loss_fn(batch), self.tasks)
        if self.environment.rep_grad and result.features is None:
            raise ConfigError(
                "features=True: loss_fn must return mtlkit.ForwardResult(losses, features=z) "
                "with the shared representation z"
            )
        return result

    def _setup(self, batch: Any) -> None:
        if self.tasks is None:
            with torch.no_grad():
                self.tasks = list(self._compute(batch).losses)
        self.method.setup(len(self.tasks))
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        own = [p for p in self.method.parameters() if id(p) not in held]
        if own:
            self.optimizer.add_param_group({"params": own})

    def __call__(self, batch: Any) -> StepResult:
        """One optimizer step on ``batch``."""
        if not self._ready:
            self._setup(batch)
            self._ready = True
        tasks = list(self.tasks)  # type: ignore[arg-type]
        held = [p for group in self.optimizer.param_groups for p in group["params"]]
        shared_ids = {id(p) for p in self.shared}
        parameters = self.shared + [p for p in held if id(p) not in shared_ids]
        result = method_step(
            self.method,
            self.optimizer,
            batch,
            self._compute,
            tasks=tasks,
            shared=self.shared,
            parameters=parameters,
            index=self.index,
            environment=self.environment,
        )
        self.index += 1
        return result

    def end_epoch(self) -> None:
        """The end of a training epoch: the weights stepped are checked (finite), then the
        method's ``on_epoch_end``.

        Raises:
            NonFiniteError: if a step left a NaN or infinite weight.
        """
        self.environment.guard.check_weights()
        self.method.on_epoch_end(self.epoch)
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """The method's state and the step and epoch counters (the optimizer is yours)."""
        return {
            "method": self.method.state_dict(),
            "index": self.index,
            "epoch": self.epoch,
            "guard": self.environment.guard.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.index = int(state["index"])
        self.epoch = int(state["epoch"])
        self.environment.guard.load_state_dict(state["guard"])
