"""The training loop: fit, evaluate, select the model on validation, log, summarise.

Readable top to bottom: ``fit`` runs epochs until the budget is spent; each batch goes to the
strategy, which does all forward/backward/step work through a ``compute_losses`` closure; after
each epoch the model is evaluated on the validation split and the best one (lowest summed
validation loss by default, as Pascal et al. do) is kept. There are no method-specific branches:
methods talk to the loop only through their hooks, via the strategy.

Files written to ``out_dir`` (when given): ``metrics.csv`` (one row per epoch), ``steps.csv``
(one row per optimizer-step report: losses, task weights and, for a solver-based method, its
solver's status ``solver/*``), ``summary.json`` (config, results
per split, cost) and ``model.pt`` (the selected model, ``{"model": state_dict}``), both written
atomically, and ``checkpoint.pt`` (everything a resume needs) every ``checkpoint_every`` batches
and on SIGINT/SIGTERM; with ``affinity``, ``affinity.csv`` and ``affinity.png``.
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() twice per epoch

from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.engine.backward import StepRoute
from mtlkit.engine.precision import Precision
from mtlkit.errors import ConfigError, MtlkitError, NonFiniteError
from mtlkit.methods.solvers import SolverError
from mtlkit.parallel.ddp import Parallel
from mtlkit.tasks import Task
from mtlkit.training.affinity import AffinityOptions, check_affinity_groups, tracker_for
from mtlkit.training.batches import BatchStream
from mtlkit.training.budget import Budget, Progress
from mtlkit.training.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_NAME,
    LoaderPosition,
    remove_partial_files,
    save_checkpoint,
)
from mtlkit.training.devices import model_hook, peak_memory_mb, resolve_device, to_device
from mtlkit.training.diagnostics import (
    ExplorationTracker,
    exploration_parameters,
    solver_columns,
    solver_row,
)
from mtlkit.training.evaluation import Results, Selection, evaluate_model, flatten_results
from mtlkit.training.forward import SubsetLosses
from mtlkit.training.logs import CsvLog, require_tensorboard, with_tensorboard, write_json_atomic
from mtlkit.training.model_forward import ModelForward
from mtlkit.training.nonfinite import check_policy
from mtlkit.training.optim import OptimizerFactory
from mtlkit.training.optim import optimizer as default_optimizer
from mtlkit.training.preflight import check_training, dry_forward
from mtlkit.training.signals import StopOnSignal, TrainingInterrupted
from mtlkit.training.strategies import Joint, Strategy, StrategyContext
from mtlkit.training.trackers import Tracker, TrackerSet, build_trackers, status_of
from mtlkit.training.trainer_state import (
    EpochAccumulator,
    restore_trainer,
    run_binding,
    trainer_state,
)

__all__ = ["Budget", "Progress", "Results", "Trainer", "TrainingInterrupted"]


class Trainer:
    """Train a multi-task model.

    Args:
        model: maps inputs to ``{task: output}``; has ``shared_parameters()`` and
            ``task_parameters(task)``; multi-input models take ``task=``; for ``rep_grad`` it
            returns ``(outputs, features)`` when called with ``return_features=True``.
            Optional hooks, called when the model defines them: ``auxiliary_losses() ->
            {task: scalar}`` after each training forward (added to those tasks' losses, e.g.
            DSelect-k's gate regulariser), ``on_train_step(step)`` after each optimizer step,
            ``on_epoch_end(epoch)`` after each epoch. A single-input model whose ``forward``
            takes ``task`` must give ``forward(x)[t]`` for ``forward(x, task=t)`` (checked by
            the pre-flight dry forward; :attr:`task_forward`): Alternating's one-task group
            steps then compute that task's head only.
        tasks: the tasks, in order.
        strategy: the update strategy (``Joint(EW())`` by default).
        optimizer: a factory ``params -> (optimizer, scheduler or None)`` (Adam, lr 1e-3).
        budget: when to stop (10 epochs by default).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ...
        rep_grad: gradient aggregators differentiate w.r.t. the shared representation.
        route: ``"auto"`` (default): for a Gramian weighting on the parameter route, the loop
            and the layer-wise Gramian are timed on the first steps and the faster is kept
            (:mod:`mtlkit.training.route_choice`; the choice and timings are in
            ``summary.json`` under ``route``), otherwise the loop Jacobian; or a fixed route:
            ``"loop"``, ``"batched"`` (see :func:`mtlkit.jacobian`) or ``"gramian"`` (the
            layer-wise Gramian of :mod:`mtlkit.engine.layer_capture`, for Gramian weightings).
        select: model selection on the validation split: ``"loss"`` (lowest summed validation
            loss) or ``"task/metric"`` (e.g. ``"left/acc"``), or ``"last"``.
        seed: seeds torch's global RNG at the start of ``fit`` (dropout, initial draws).
        out_dir: where to write logs and the summary; ``None`` writes nothing.
        config: a JSON-able description of the run, stored in ``summary.json``.
        progress: show a progress bar per epoch.
        track_exploration: measure the path length and the distance from the initialisation
            of the shared parameters (heads and normalisation layers excluded) at every
            optimizer step; costs a few passes over the shared parameters per step.
        checkpoint_every: write ``out_dir/checkpoint.pt`` (atomically) every this many batches,
            and at the end of ``fit``; ``None``: only on SIGINT/SIGTERM. Resume with
            ``fit(..., resume=True)``.
        tensorboard: also write the rows of ``steps.csv`` and ``metrics.csv`` as TensorBoard
            scalars to ``out_dir/tb/steps`` and ``out_dir/tb/metrics`` (needs the
            ``tensorboard`` extra).
        loggers: experiment trackers that get the same rows, the config and, at
            :meth:`close`, the result files: ``"wandb"``, ``"mlflow"`` (the extras of those
            names), ``"tensorboard"`` (as ``tensorboard=True``) or
            :class:`~mtlkit.training.trackers.Tracker` objects; needs ``out_dir``.
        amp: mixed precision of the forward pass: ``"none"``, ``"bf16"`` or ``"fp16"`` (CUDA,
            with a loss scaler), or a :class:`~mtlkit.engine.precision.Precision`.
        accumulate: micro-batches per optimizer step (gradient accumulation; see
            :mod:`mtlkit.parallel.ddp`).
        distributed: DDP over the initialised ``torch.distributed`` process group (``None``:
            when there is one of more than one process; ``False``: never). Each process gets
            its shard of every training batch, the methods see the global batch's losses and
            Jacobians, and only rank 0 writes files (:mod:`mtlkit.parallel.ddp`).
        on_nonfinite: what a step does on a NaN/inf task loss or gradient or a failed solver:
            ``"raise"`` (default; the error names the task, epoch, batch and step),
            ``"skip_step"`` or ``"skip_task"`` (:mod:`mtlkit.training.nonfinite`; counters in
            ``summary.json`` under ``nonfinite``).
        affinity: log task affinities every ``affinity.every`` batches, for ``affinity.csv``
            and AffinityGroups (:mod:`mtlkit.training.affinity`; training is left as it was).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[Task],
        strategy: Strategy | None = None,
        optimizer: OptimizerFactory | None = None,
        *,
        budget: Budget | None = None,
        device: str | torch.device = "cpu",
        rep_grad: bool = False,
        route: StepRoute = "auto",
        select: str = "loss",
        seed: int = 0,
        out_dir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        progress: bool = True,
        track_exploration: bool = True,
        checkpoint_every: int | None = None,
        tensorboard: bool = False,
        loggers: Sequence[str | Tracker] = (),
        amp: str | Precision = "none",
        accumulate: int = 1,
        distributed: bool | None = None,
        on_nonfinite: str = "raise",
        affinity: AffinityOptions | None = None,
    ) -> None:
        self.tasks = list(tasks)
        names = [t.name for t in self.tasks]
        if not names or len(set(names)) != len(names):
            raise MtlkitError(f"tasks must be non-empty with unique names, got {names}")
        self.task_names = names
        self.by_name = {t.name: t for t in self.tasks}
        self.device = resolve_device(device)
        precision = amp if isinstance(amp, Precision) else Precision(amp, self.device)
        self.parallel = Parallel(distributed, precision, accumulate)
        self.device = self.parallel.local_device(self.device)  # DDP on CUDA: LOCAL_RANK's GPU
        self.model = model.to(self.device)
        self.strategy = strategy if strategy is not None else Joint()
        self.optimizer_factory = optimizer if optimizer is not None else default_optimizer()
        self.budget = budget if budget is not None else Budget()
        self.rep_grad = rep_grad
        self.route = route
        self.select = select
        self._selection = Selection(select, self.tasks)
        self.seed = seed
        self._run_dir = Path(out_dir) if out_dir is not None else None  # every rank reads it
        self.out_dir = self._run_dir if self.parallel.is_main else None  # rank 0 writes
        self.config = dict(config or {})
        self.progress_bar = progress and self.parallel.is_main
        self.tensorboard = tensorboard or "tensorboard" in loggers
        self.trackers = TrackerSet(build_trackers(loggers) if self.parallel.is_main else [])
        if self.trackers and self.out_dir is None:
            raise MtlkitError(f"loggers {list(loggers)} mirror the run's logs: give out_dir")
        if tensorboard and self.out_dir is not None:
            require_tensorboard()  # fail before training when the extra is missing
        self.multi_input = bool(getattr(model, "multi_input", False))
        if rep_grad and not getattr(model, "has_shared_representation", False):
            raise MtlkitError(
                f"rep_grad needs a model with one shared representation; "
                f"{type(model).__name__} does not offer one (has_shared_representation is false)"
            )
        shared = exploration_parameters(model, model.shared_parameters())
        self.exploration = ExplorationTracker(shared) if track_exploration else None
        self.affinity = tracker_for(affinity, self)
        self.progress = Progress()
        self.backwards = 0
        self._batches_seen = 0
        self._optimizer_steps = 0
        self.results: dict[str, Results] = {}
        self.history: list[dict[str, Any]] = []  # the rows of metrics.csv, one per epoch
        self.best_epoch: int | None = None
        self.checkpoint_every = checkpoint_every
        if checkpoint_every is not None and checkpoint_every < 1:
            raise MtlkitError(f"checkpoint_every must be >= 1 batches, got {checkpoint_every}")
        self._best_score, self._best_state = math.inf, None
        self._epoch: EpochAccumulator | None = None
        self._final_exploration: dict[str, float] | None = None
        self._setup_done = False
        self.on_nonfinite = check_policy(on_nonfinite)
        self._validated = False
        self._checked_batch = False  # the dry forward on the first training batch is done
        self._forward = ModelForward(
            self.model, self.tasks, self.parallel, rep_grad=rep_grad, on_pass=self._count_pass
        )
        self._losses = SubsetLosses(self._forward)

    # ------------------------------------------------------------------ training
    def fit(
        self, train: Iterable[Any], val: Any = None, *, resume: str | Path | bool = False
    ) -> Progress:
        """Train until the budget is spent; keep the best model on ``val`` (if given).

        ``train`` yields batches ``(inputs, {task: target})`` (single-input), or is a
        ``{task: DataLoader}`` / :class:`MultiInputLoader` (multi-input).

        Args:
            resume: continue from a checkpoint: its path, its run folder, or ``True`` for
                ``out_dir/checkpoint.pt``. The run then goes on exactly where the checkpoint was
                taken (same next batch, same random state) given the same data and config.

        Raises:
            TrainingInterrupted: on ``SIGINT``/``SIGTERM``, after saving a checkpoint at the end
                of the current batch (when ``out_dir`` is set).
        """
        torch.manual_seed(self.seed)
        train = self._as_loader(train)
        self._extra_batches = BatchStream(
            train,
            seed=self.seed + 7919,
            transform=lambda b: to_device(self.parallel.shard_batch(b), self.device),
        )
        train = self.parallel.shard(train)  # DDP: this process's part of every batch
        self.validate(train)  # sets up the strategy; checks before the first step
        position = LoaderPosition()
        log_rows: dict[str, int] | None = None
        if resume:
            position, log_rows = restore_trainer(self, self._checkpoint_path(resume))
            if self._epoch is None:  # at an epoch boundary: the next epoch's order continues
                position.continue_generators(train)
        if self.out_dir is not None:  # temporary files of writes that a kill interrupted
            remove_partial_files(self.out_dir)
        try:
            logs = self._open_logs(log_rows)
        except (ValueError, csv.Error, OSError) as error:  # a damaged or foreign log file
            raise MtlkitError(f"cannot continue the logs in {self.out_dir}: {error}") from None
        if logs and self.tensorboard:  # the same rows as TensorBoard scalars under out_dir/tb
            logs = with_tensorboard(logs, self.out_dir / "tb", resumed=bool(resume))
        logs = self.trackers.attach(logs, self.out_dir, self.config, resumed=bool(resume))
        start = time.perf_counter() - self.progress.seconds
        try:
            with StopOnSignal() as stop:
                while not self._budget_spent() or self._epoch is not None:
                    if self._epoch is None:  # a new epoch (a resumed one continues)
                        self.progress.epoch += 1
                        position.begin(train)
                        self._epoch = EpochAccumulator.start(self, self.task_names)
                    self._train_epoch(train, position, logs, start, stop)
                    self._end_epoch(val, logs)
        except BaseException as error:  # the tracker runs end; a resume continues them
            self.trackers.close(status_of(error))
            raise
        finally:
            for log in (logs or {}).values():
                log.close()
        if self.out_dir is not None and self.checkpoint_every is not None:
            self.save_checkpoint(position, logs)  # the last weights, to train on later
        self._final_exploration = self.exploration_metrics()  # of the last weights
        if self._best_state is not None and self.select != "last":
            self.model.load_state_dict(self._best_state)
        else:
            self.best_epoch = self.progress.epoch
        if self.out_dir is not None:
            save_checkpoint(self.out_dir / MODEL_NAME, {"model": self.model.state_dict()})
        self.write_summary()
        return self.progress

    def _setup_strategy(self) -> None:
        if self._setup_done:
            return
        self.strategy.setup(
            StrategyContext(
                model=self.model,
                tasks=self.task_names,
                optimizer_factory=self.optimizer_factory,
                rep_grad=self.rep_grad,
                route=self.route,
                device=self.device,
                on_optimizer_step=self._after_optimizer_step,
                draw_batches=lambda count: self._extra_batches.draw(count),
                reducer=self.parallel.reducer,
                optimizer_step=self.parallel.optimizer_step,
                accumulate=self.parallel.accumulate,
                on_nonfinite=self.on_nonfinite,
            )
        )
        self.parallel.attach(self.model, self.strategy.methods())  # DDP: rank 0's start
        check_affinity_groups(self.strategy, self.affinity)
        self._setup_done = True

    def validate(self, train: Iterable[Any], sample: Any = None) -> None:
        """Check the run before its first step and set up the strategy (``fit`` calls it; the
        CLI calls it before writing the run's files): the loader and the model take the same
        kind of input, every method can run on its number of tasks, and, on ``sample`` (a batch
        of the training batches' form, e.g. :func:`~mtlkit.training.preflight.sample_batch` of
        the validation loader), one dry forward pass gives every task an output its loss
        accepts. ``train`` is not iterated: ``fit`` runs the dry forward again on the first
        batch it draws, before that batch's step (:mod:`mtlkit.training.preflight`).

        Raises:
            ConfigError: naming what does not fit.
        """
        if self._validated:
            return
        try:
            self._setup_strategy()
        except ValueError as error:  # a method that cannot take these tasks (its convention)
            if isinstance(error, MtlkitError):
                raise
            raise ConfigError(
                f"{self.strategy!r} cannot be set up for the tasks {self.task_names}: {error}"
            ) from error
        check_training(self, self._as_loader(train), sample)
        self._validated = True

    def _train_epoch(
        self,
        train: Iterable[Any],
        position: LoaderPosition,
        logs: dict[str, CsvLog] | None,
        start: float,
        stop: StopOnSignal,
    ) -> None:
        """Run the batches of the current epoch from ``position`` on, until the epoch or the
        budget ends; checkpoint every ``checkpoint_every`` batches and on a stop signal."""
        self.model.train()
        epoch = self._epoch
        assert epoch is not None
        iterator = position.replay(train) if position.consumed else iter(train)
        if position.consumed:
            torch.set_rng_state(epoch.rng_after_last_batch)
        total = len(train) if isinstance(train, Sized) else None
        bar = tqdm(
            iterator,
            desc=f"epoch {self.progress.epoch}",
            initial=position.consumed,
            total=total,
            leave=False,
            disable=not self.progress_bar,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for batch in bar:
            index = position.consumed
            batch = to_device(batch, self.device)
            if not self._checked_batch:  # the pre-flight dry forward, on the real first batch
                self._forward.task_forward = dry_forward(self, batch)
                self._checked_batch = True
            if self.affinity is not None and self.affinity.due(self._batches_seen):
                self.affinity.measure(batch)  # leaves no trace on training
            try:
                report = self.strategy.step(batch, self._losses, self.progress.steps)
            except (NonFiniteError, SolverError) as error:
                raise type(error)(
                    f"{error} (task order {self.task_names}) at epoch {self.progress.epoch}, "
                    f"batch {index}, step {self.progress.steps}"
                ) from error
            position.consumed += 1
            self.progress.steps += report.steps
            self.backwards += report.backwards
            self.progress.seconds = time.perf_counter() - start
            self.parallel.agree(self.progress, stop)  # DDP: every rank stops at the same batch
            self._batches_seen += 1
            epoch.add(report.losses)
            if logs:
                row = {"step": self.progress.steps, "epoch": self.progress.epoch}
                row.update({f"loss/{t}": v for t, v in report.losses.items()})
                row.update({f"weight/{t}": v for t, v in report.weights.items()})
                row.update(solver_row(report.statuses, logs["steps"].columns))
                logs["steps"].append(row)
            if self.progress_bar:
                bar.set_postfix({t: f"{v:.3f}" for t, v in report.losses.items()}, refresh=False)
            due = (
                self.checkpoint_every is not None
                and self._batches_seen % self.checkpoint_every == 0
            )
            if self.out_dir is not None and (due or stop.requested):
                self.save_checkpoint(position, logs)
            if stop.requested:
                bar.close()
                raise TrainingInterrupted(stop.requested, self._checkpoint_path(True))
            if self._budget_spent(within_epoch=True):
                break
        bar.close()

    def _end_epoch(self, val: Any, logs: dict[str, CsvLog] | None) -> None:
        """Epoch hooks, validation, model selection, the metrics row."""
        epoch = self._epoch
        assert epoch is not None
        self._check_weights()
        if self.affinity is not None:  # before the strategy's epoch end: AffinityGroups select
            self.affinity.close_epoch(self.progress.epoch, self.out_dir)
        self.strategy.on_epoch_end(self.progress.epoch)
        model_hook(self.model, "on_epoch_end", self.progress.epoch)
        batches = max(1, epoch.batches)
        row: dict[str, Any] = {
            "epoch": self.progress.epoch,
            "steps": self.progress.steps,
            "passes": self.progress.passes,
            "seconds": self.progress.seconds,
            "epoch_seconds": self.progress.seconds - epoch.seconds,
            "forwards_per_batch": (self.progress.passes - epoch.passes) / batches,
            "backwards_per_batch": (self.backwards - epoch.backwards) / batches,
        }
        row.update(self.exploration_metrics())
        row.update({f"train/{t}/loss": v / batches for t, v in epoch.loss_sums.items()})
        if val is not None:
            val_results = self.evaluate(val, split="val", write=False)
            row.update(flatten_results(val_results, prefix="val"))
            score = self._selection.score(val_results, self.progress.epoch)
            if score < self._best_score:
                self._best_score, self.best_epoch = score, self.progress.epoch
                self._best_state = copy.deepcopy(self.model.state_dict())
        self.history.append(row)
        self._epoch = None
        if logs:
            logs["metrics"].append(row)
            logs["metrics"].flush()

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_path(self, where: str | Path | bool) -> Path:
        if where is True:
            if self._run_dir is None:
                raise MtlkitError("resume=True needs out_dir (the run folder to resume)")
            return self._run_dir / CHECKPOINT_NAME
        path = Path(where)  # type: ignore[arg-type]
        return path / CHECKPOINT_NAME if path.is_dir() else path

    def save_checkpoint(
        self, position: LoaderPosition, logs: dict[str, CsvLog] | None = None
    ) -> Path:
        """Write ``out_dir/checkpoint.pt`` atomically: everything a resume needs
        (:func:`~mtlkit.training.trainer_state.trainer_state`)."""
        if self.out_dir is None:
            raise MtlkitError("save_checkpoint needs out_dir")
        self._check_weights()  # a checkpoint never holds a NaN/inf weight
        if self._epoch is not None:  # mid-epoch: the random state a resume continues from
            self._epoch.rng_after_last_batch = torch.get_rng_state()
        for log in (logs or {}).values():
            log.flush()
        path = self.out_dir / CHECKPOINT_NAME
        rows = {name: log.rows for name, log in (logs or {}).items()}
        save_checkpoint(path, trainer_state(self, position, rows))
        return path

    def run_binding(self) -> dict[str, Any]:
        """What binds a checkpoint to this run (:func:`.trainer_state.run_binding`)."""
        return run_binding(self)

    def _check_weights(self) -> None:
        """The guard's check of the weights stepped since its last check
        (:meth:`~mtlkit.training.nonfinite.NonFiniteGuard.check_weights`)."""
        guard = self._guard()
        if guard is None:
            return
        try:
            guard.check_weights()
        except NonFiniteError as error:
            raise NonFiniteError(
                f"{error} (found at epoch {self.progress.epoch}, after step {self.progress.steps})"
            ) from error

    def route_choice(self) -> dict[str, Any]:
        """The route asked for and, for ``route="auto"``, what the measurement of the first
        steps chose, why, and its timings (:mod:`mtlkit.training.route_choice`; ``measured``
        is ``None`` where it does not apply: no Gramian weighting, DDP, accumulation, ...)."""
        auto = self._auto_route()
        used = auto is not None and (auto.position > 0 or auto.choice is not None)
        measured = auto.summary() if used else None
        return {"requested": self.route, "measured": measured}

    def _auto_route(self) -> Any:
        context = getattr(self.strategy, "context", None)
        return getattr(getattr(context, "environment", None), "auto", None)

    def _guard(self) -> Any:
        """The strategy's ``on_nonfinite`` guard (its counters), once set up."""
        return getattr(self.strategy, "guard", None)

    @property
    def task_forward(self) -> bool:
        """Whether one-task steps call the model as ``forward(x, task=t)`` (that head only):
        decided by the pre-flight dry forward on the first batch (:mod:`.model_forward`)."""
        return self._forward.task_forward

    def _count_pass(self) -> None:
        self.progress.passes += 1

    def _after_optimizer_step(self) -> None:
        """Called by the strategy after every optimizer step."""
        self._optimizer_steps += 1
        if self.exploration is not None:
            self.exploration.on_step()
        model_hook(self.model, "on_train_step", self._optimizer_steps)

    def _budget_spent(self, within_epoch: bool = False) -> bool:
        p = self.progress
        # Inside an epoch only the step, pass and time limits can end it early.
        epochs = 0 if within_epoch else p.epoch
        return self.budget.spent(epochs, p.steps, p.passes, p.seconds, self.backwards)

    def exploration_metrics(self) -> dict[str, float]:
        """Path length and distance from the initialisation of the shared parameters."""
        if self.exploration is None:
            return {}
        return {
            "path_length": self.exploration.path_length(),
            "distance_from_init": self.exploration.distance_from_init(),
        }

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, data: Any, split: str = "test", write: bool = True) -> Results:
        """Per-task metrics and mean loss on ``data`` (batch-size-weighted over batches).

        The result is stored under ``split`` in ``summary.json`` when ``write`` is true.
        """
        results = evaluate_model(
            self.model, self.tasks, data, self.device, multi_input=self.multi_input, split=split
        )
        if write:
            self.results[split] = results
            self.write_summary()
            self.trackers.results(split, results, self.progress.steps)
        return results

    def close(self) -> None:
        """End the tracker runs of ``loggers``, uploading the result files (call it after the
        last :meth:`evaluate`; at exit otherwise, marked interrupted)."""
        self.trackers.close()

    # ------------------------------------------------------------------- output
    def _open_logs(self, keep_rows: dict[str, int] | None = None) -> dict[str, CsvLog] | None:
        if self.out_dir is None:
            return None
        metric_cols = ["epoch", "steps", "passes", "seconds", "epoch_seconds"]
        metric_cols += ["forwards_per_batch", "backwards_per_batch"]
        if self.exploration is not None:
            metric_cols += ["path_length", "distance_from_init"]
        metric_cols += [f"train/{t}/loss" for t in self.task_names]
        metric_cols += [f"val/{t.name}/{m}" for t in self.tasks for m in ["loss", *t.metrics]]
        step_cols = ["step", "epoch"] + [f"loss/{t}" for t in self.task_names]
        step_cols += [f"weight/{t}" for t in self.task_names]
        step_cols += solver_columns(self.strategy.methods())
        keep = keep_rows or {}
        return {
            "metrics": CsvLog(
                self.out_dir / "metrics.csv",
                metric_cols,
                flush_every=1,
                keep_rows=keep.get("metrics"),
            ),
            "steps": CsvLog(self.out_dir / "steps.csv", step_cols, keep_rows=keep.get("steps")),
        }

    def summary(self) -> dict[str, Any]:
        """The run's configuration, results per split and cost."""
        p = self.progress
        batches = self._batches_seen
        return {
            "config": self.config,
            "tasks": self.task_names,
            "strategy": repr(self.strategy),
            "nonfinite": None if self._guard() is None else self._guard().counts(),
            "route": self.route_choice(),
            "affinity": None if self.affinity is None else self.affinity.summary(),
            "results": self.results,
            "best_epoch": self.best_epoch,
            "selection": self.select,
            "cost": {
                "epochs": p.epoch,
                "steps": p.steps,
                "passes": p.passes,
                "seconds": p.seconds,
                "seconds_per_epoch": p.seconds / p.epoch if p.epoch else None,
                "forwards_per_batch": p.passes / batches if batches else None,
                "backwards_per_batch": self.backwards / batches if batches else None,
                "batches": batches,
                "backwards": self.backwards,
                "peak_memory_mb": peak_memory_mb(self.device),
                # path and distance of the last weights (not of the selected model)
                **(self._final_exploration or self.exploration_metrics()),
            },
        }

    def write_summary(self) -> None:
        if self.out_dir is not None:
            write_json_atomic(self.out_dir / "summary.json", self.summary())

    def _as_loader(self, train: Any) -> Iterable[Any]:
        if self.multi_input and isinstance(train, Mapping):
            return MultiInputLoader(train)
        return train
