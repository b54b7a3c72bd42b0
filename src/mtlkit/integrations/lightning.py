"""PyTorch Lightning: a ``LightningModule`` with several task losses, balanced by any mtlkit method.

:class:`MultiTaskModule` is a mixin placed before ``LightningModule``::

    import lightning as L
    from mtlkit import methods
    from mtlkit.integrations.lightning import MultiTaskModule

    class Model(MultiTaskModule, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder, self.heads = ..., nn.ModuleDict(...)
            self.configure_mtl(methods.UPGrad(), tasks=["left", "right"])

        def shared_parameters(self):
            return self.encoder.parameters()

        def task_losses(self, batch):            # one forward pass
            x, y = batch
            z = self.encoder(x)
            return {t: loss(self.heads[t](z), y[t]) for t in ...}

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    L.Trainer(max_epochs=3).fit(Model(), loader)

The mixin switches Lightning to manual optimisation (``automatic_optimization`` is ``False``)
and implements ``training_step`` and ``on_train_epoch_end``: each training batch is one call of
an mtlkit strategy (:class:`~mtlkit.Joint` for a method, or the given
:class:`~mtlkit.Alternating`), whose every optimizer step runs through
:func:`mtlkit.training.step.method_step`, the driver of :class:`mtlkit.Step` and of mtlkit's
Trainer: ``before_step``, the probes of the bilevel methods, the forward pass, the extra
batches, the method's backward on the parameter route (w.r.t. ``shared_parameters()``) or the
features route (``features=True``: ``task_losses`` returns ``mtlkit.ForwardResult(losses,
features=z)``), the ``on_nonfinite`` checks, the optimizer step (Lightning's optimizer, so its
``on_before_optimizer_step`` hooks and step counting apply), ``after_step``; and the method's
``on_epoch_end`` at the end of each training epoch. A method therefore trains here exactly as in
:class:`mtlkit.Step` (tested to 1e-6 on the same batches).

Supported:

* Lightning strategies: one device (``SingleDeviceStrategy``) and ``DDPStrategy`` in all its
  launchers (``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``). Under DDP the gradients are
  *not* synchronised by PyTorch's ``DistributedDataParallel`` (in manual optimisation it only
  acts in ``manual_backward``, which is not called): mtlkit's reducer
  (:mod:`mtlkit.parallel.ddp`) runs in Lightning's process group, so every process runs the
  method on the losses, Jacobian or Gramian of the global batch and all take the step one
  process would take on the union of their shards (the data are sharded by Lightning's
  ``DistributedSampler``; the features route needs equal shard sizes).
* Precision ``32-true``, ``64-true`` and ``bf16-mixed`` (the forward pass autocasts; the
  backward and the method run outside autocast).
* Learning-rate schedulers with ``interval="epoch"`` and ``frequency=1``, stepped at the end of
  each epoch as mtlkit's Trainer steps them.
* Checkpoints: the methods' state, the step counter and the non-finite counters are saved in
  Lightning's checkpoint (``checkpoint["mtlkit"]``) and restored on resume.

Refused with a :class:`~mtlkit.errors.ConfigError` when training starts: other Lightning
strategies (FSDP, DeepSpeed, XLA, model parallel: they shard or wrap parameters that the
method must see whole), other precisions (``16-mixed`` needs Lightning's gradient scaler inside
a backward that mtlkit takes itself), a number of optimizers that does not fit the strategy, and
epoch schedulers that are not stepped once per epoch. Lightning itself refuses gradient clipping
and gradient accumulation under manual optimisation. ``on_before_backward`` /
``on_after_backward`` hooks are not called (the backward is mtlkit's, not ``manual_backward``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mtlkit.engine.backward import StepRoute
from mtlkit.errors import ConfigError
from mtlkit.integrations import require
from mtlkit.methods import Method
from mtlkit.methods import get as get_method
from mtlkit.parallel.ddp import Parallel
from mtlkit.training.devices import to_device
from mtlkit.training.forward import ForwardResult, as_forward_result
from mtlkit.training.strategies import Joint, Strategy, StrategyContext

__all__ = ["SUPPORTED_PRECISIONS", "MultiTaskModule", "check_trainer", "require_lightning"]

SUPPORTED_PRECISIONS = ("32-true", "64-true", "bf16-mixed")
_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
_SHARDING_STRATEGIES = ("DeepSpeedStrategy", "XLAStrategy", "SingleDeviceXLAStrategy")


def require_lightning() -> Any:
    """The ``lightning`` package (or the older ``pytorch_lightning``), or a
    :class:`~mtlkit.integrations.MissingExtraError` naming the extra."""
    try:
        return require("lightning", "lightning", "mtlkit.integrations.lightning")
    except ImportError as missing:
        try:
            return require("pytorch_lightning", "lightning", "mtlkit.integrations.lightning")
        except ImportError:
            raise missing from None


def check_trainer(strategy: Any, precision: str) -> bool:
    """Refuse a Lightning strategy or precision that the mixin cannot run; returns whether the
    strategy is data-parallel (DDP).

    Raises:
        ConfigError: naming the strategy or precision and the supported ones.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names & set(_SHARDING_STRATEGIES) or not names & set(_SUPPORTED_STRATEGIES):
        raise ConfigError(
            f"mtlkit's Lightning integration runs on one device or under DDP; got the "
            f"{type(strategy).__name__} strategy (supported: strategy='auto' on one device, "
            "'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook'); sharded and wrapped strategies "
            "(FSDP, DeepSpeed, XLA, model parallel) split parameters the method must see whole"
        )
    if str(precision) not in SUPPORTED_PRECISIONS:
        raise ConfigError(
            f"mtlkit's Lightning integration does not support precision={precision!r}; "
            f"supported: {', '.join(SUPPORTED_PRECISIONS)} (16-mixed needs Lightning's gradient "
            "scaler inside the backward, which mtlkit takes itself)"
        )
    return "DDPStrategy" in names


class _Balancer:
    """The strategy and its step environment, built once Lightning has set up the optimizers.
    A plain object: the methods it holds are not submodules of the LightningModule (their
    parameters go into the optimizer as a group of their own, and Alternating's per-group
    copies would otherwise look like parameters of no task)."""

    def __init__(self, module: MultiTaskModule, config: dict[str, Any]) -> None:
        trainer = module.trainer
        distributed = check_trainer(trainer.strategy, trainer.precision)
        self.module = module
        self.config = config
        self.strategy: Strategy = config["strategy"]
        self.tasks: list[str] = config["tasks"]
        self.features: bool = config["features"]
        self.parallel = Parallel(distributed=distributed and trainer.world_size > 1)
        self.optimizers = _optimizer_list(module.optimizers())
        self.schedulers = _epoch_schedulers(trainer, self.optimizers)
        self._handed: list[Any] = []
        extra = config["extra_batches"]
        self._extra = None if extra is None else itertools.cycle(extra)
        self.strategy.setup(
            StrategyContext(
                model=module,  # type: ignore[arg-type]  (shared_/task_parameters)
                tasks=self.tasks,
                optimizer_factory=self._factory,
                rep_grad=self.features,
                route=config["route"],
                device=module.device,
                draw_batches=self._draw,
                reducer=self.parallel.reducer,
                optimizer_step=self.parallel.optimizer_step,
                on_nonfinite=config["on_nonfinite"],
            )
        )
        if len(self._handed) != len(self.optimizers):
            raise ConfigError(
                f"configure_optimizers returned {len(self.optimizers)} optimizers; "
                f"{self.strategy!r} uses {len(self._handed)} (one, or with "
                "Alternating(optimizers='per_group') one per task group, in group order)"
            )
        self.parallel.attach(module, self.strategy.methods())
        self.steps = 0

    def _factory(self, params: list[Any]) -> tuple[torch.optim.Optimizer, Any]:
        """The strategy's optimizer factory: the next optimizer of ``configure_optimizers``,
        which must hold the parameters the strategy steps with it (the method's own learnable
        parameters, e.g. UW's, are added to it as a parameter group)."""
        index = len(self._handed)
        if index >= len(self.optimizers):
            raise ConfigError(
                f"{self.strategy!r} needs more than the {len(self.optimizers)} optimizer(s) "
                "configure_optimizers returned (Alternating(optimizers='per_group') needs one "
                "per task group, in group order)"
            )
        optimizer = self.optimizers[index]
        self._handed.append(optimizer)
        flat = [p for x in params for p in (x["params"] if isinstance(x, dict) else [x])]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        method_ids = {id(p) for m in self.strategy.methods() for p in m.parameters()}
        own = [p for p in flat if id(p) not in held and id(p) in method_ids]
        missing = [p for p in flat if id(p) not in held and id(p) not in method_ids]
        if missing:
            shapes = [tuple(p.shape) for p in missing]
            raise ConfigError(
                f"optimizer {index} of configure_optimizers does not hold {len(missing)} "
                f"parameter(s) that {self.strategy!r} steps with it (shapes {shapes})"
            )
        if own:
            optimizer.add_param_group({"params": own, "weight_decay": 0.0})
        return optimizer, self.schedulers.get(id(optimizer))

    def _draw(self, count: int) -> list[Any]:
        if self._extra is None:
            raise ConfigError(
                f"a method asked for {count} extra batch(es) per step: give "
                "configure_mtl(..., extra_batches=<a second loader over the training data>)"
            )
        device = self.module.device
        return [
            to_device(self.parallel.shard_batch(next(self._extra)), device) for _ in range(count)
        ]

    def compute(self, batch: Any) -> ForwardResult:
        """One forward pass of the module's ``task_losses`` (autocast as Lightning's precision
        asks), as the strategies need it: every task's loss, global values under DDP."""
        with self.module.trainer.precision_plugin.forward_context():
            value = self.module.task_losses(batch)
        result = as_forward_result(value, self.tasks)
        if self.features and result.features is None:
            raise ConfigError(
                "configure_mtl(features=True): task_losses must return "
                "mtlkit.ForwardResult(losses, features=z) with the shared representation z"
            )
        return self.parallel.prepare(result)

    def step(self, batch: Any) -> Any:
        with torch.autocast(self.module.device.type, enabled=False):  # the backward and method
            report = self.strategy.step(batch, self.compute, self.steps)
        self.steps += report.steps
        return report

    def end_epoch(self, epoch: int) -> None:
        guard = self.strategy.guard
        if guard is not None:
            guard.check_weights()
        self.strategy.on_epoch_end(epoch)

    def state_dict(self) -> dict[str, Any]:
        guard = self.strategy.guard
        return {
            "strategy": self.strategy.state_dict(),
            "steps": self.steps,
            "guard": None if guard is None else guard.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.steps = int(state["steps"])
        guard = self.strategy.guard
        if guard is not None and state.get("guard") is not None:
            guard.load_state_dict(state["guard"])


def _optimizer_list(optimizers: Any) -> list[Any]:
    found = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
    if not found or any(not hasattr(o, "param_groups") for o in found):
        raise ConfigError(
            "configure_optimizers must return the torch optimizer(s) the steps use; got "
            f"{optimizers!r}"
        )
    return found


def _epoch_schedulers(trainer: Any, optimizers: list[Any]) -> dict[int, Any]:
    """``id(optimizer) -> scheduler`` of Lightning's scheduler configs, stepped per epoch."""
    inner = {id(getattr(o, "optimizer", o)): o for o in optimizers}
    found: dict[int, Any] = {}
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if config.interval != "epoch" or config.frequency != 1 or config.reduce_on_plateau:
            raise ConfigError(
                f"mtlkit's Lightning integration steps a scheduler once per epoch; "
                f"{type(scheduler).__name__} has interval={config.interval!r}, frequency="
                f"{config.frequency}{', reduce_on_plateau' if config.reduce_on_plateau else ''} "
                "(use interval='epoch', frequency=1, or step it yourself in a hook)"
            )
        owner = inner.get(id(getattr(scheduler, "optimizer", None)))
        if owner is None:
            raise ConfigError(f"{type(scheduler).__name__} steps none of the optimizers")
        found[id(owner)] = scheduler
    return found


class MultiTaskModule:
    """Mixin for a ``LightningModule`` with several task losses (see the module docstring).

    The subclass calls :meth:`configure_mtl` in ``__init__`` and implements
    ``task_losses(batch)`` (one forward pass: ``{task: loss}``, a list in task order, or a
    :class:`mtlkit.ForwardResult`), ``shared_parameters()`` (the parameter route's Jacobian is
    taken w.r.t. them; Joint also needs them to tell the heads apart), ``task_parameters(task)``
    (Alternating only) and ``configure_optimizers``. An override of ``training_step`` or
    ``on_train_epoch_end`` must call ``super()``'s.
    """

    def configure_mtl(
        self,
        method: Method | Strategy | str,
        *,
        tasks: Iterable[str],
        features: bool = False,
        route: StepRoute = "auto",
        on_nonfinite: str = "raise",
        extra_batches: Iterable[Any] | None = None,
        log: bool = True,
    ) -> None:
        """Choose how the task losses are balanced.

        Args:
            method: a method (trained with :class:`~mtlkit.Joint`), its registered name, or a
                strategy (``mtlkit.Joint(...)``, ``mtlkit.Alternating(...)``).
            tasks: the task names, in the order the method sees them.
            features: the features route (``task_losses`` returns ``ForwardResult(losses,
                features=z)``); otherwise the parameter route, w.r.t. ``shared_parameters()``.
            route: the Jacobian route (``auto``, ``loop``, ``batched``) or ``gramian``.
            on_nonfinite: ``raise``, ``skip_step`` or ``skip_task``
                (:mod:`mtlkit.training.nonfinite`).
            extra_batches: a second iterable over the training data (cycled), for methods that
                need independent batches (MoDo, SDMGrad, Auto-Lambda, MOML, FORUM); sharded per
                process under DDP.
            log: log each task's loss (``loss/<task>``) and weight (``weight/<task>``) per step.
        """
        require_lightning()
        if isinstance(method, str):
            method = get_method(method)
        if isinstance(method, Method):
            strategy: Strategy = Joint(method)
        elif isinstance(method, Strategy):
            strategy = method
        else:
            raise ConfigError(
                "configure_mtl takes a mtlkit method, its name, or a strategy (mtlkit.Joint, "
                f"mtlkit.Alternating); got {type(method).__name__}"
            )
        names = [str(t) for t in tasks]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"tasks must be distinct names, at least one; got {names}")
        self.automatic_optimization = False
        self._mtl_config = {
            "strategy": strategy,
            "tasks": names,
            "features": bool(features),
            "route": route,
            "on_nonfinite": on_nonfinite,
            "extra_batches": extra_batches,
            "log": bool(log),
        }
        self._mtl_balancer: _Balancer | None = None
        self._mtl_saved: Mapping[str, Any] | None = None

    # ----------------------------------------------------------- the user's part
    def task_losses(self, batch: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} must implement task_losses(batch): one forward pass returning "
            "{task: loss} (or mtlkit.ForwardResult(losses, features=z) with features=True)"
        )

    def shared_parameters(self) -> Iterable[nn.Parameter]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement shared_parameters(): the parameters of the "
            "shared part of the model (the encoder)"
        )

    def task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement task_parameters(task) (the parameters of "
            "task's head) for Alternating"
        )

    # ------------------------------------------------------------ Lightning's hooks
    @property
    def mtl_strategy(self) -> Strategy:
        """The mtlkit strategy that trains the module (its methods: ``.methods()``)."""
        return self._mtl()["strategy"]

    def _mtl(self) -> dict[str, Any]:
        config = self.__dict__.get("_mtl_config")
        if config is None:
            raise ConfigError(
                f"{type(self).__name__}.__init__ must call self.configure_mtl(method, tasks=...)"
            )
        return config

    def _balancer(self) -> _Balancer:
        config = self._mtl()
        if self._mtl_balancer is None:
            self._mtl_balancer = _Balancer(self, config)
            if self._mtl_saved is not None:
                self._mtl_balancer.load_state_dict(self._mtl_saved)
                self._mtl_saved = None
        return self._mtl_balancer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One batch: the strategy's optimizer step(s) through mtlkit's step driver."""
        report = self._balancer().step(batch)
        if self._mtl()["log"]:
            logged = {f"loss/{t}": v for t, v in report.losses.items()}
            logged.update({f"weight/{t}": v for t, v in report.weights.items()})
            self.log_dict(logged, on_step=True, on_epoch=False)  # type: ignore[attr-defined]
        return torch.tensor(sum(report.losses.values()))

    def on_train_epoch_end(self) -> None:
        """The methods' ``on_epoch_end`` (DWA, STCH, ...) and the epoch schedulers."""
        if self._mtl_balancer is not None:
            self._mtl_balancer.end_epoch(int(self.current_epoch))  # type: ignore[attr-defined]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._mtl_balancer is not None:
            checkpoint["mtlkit"] = self._mtl_balancer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._mtl_saved = checkpoint.get("mtlkit")
        self._mtl_balancer = None  # rebuilt on the next training step, with the saved state
