"""What of a :class:`~mtlkit.Trainer` a checkpoint holds, and putting it back.

:func:`trainer_state` gathers everything a resume needs (the entries of
:data:`mtlkit.training.checkpoint.TRAINER_SCHEMA`): model, strategy (optimizers, schedulers,
methods), the non-finite counters, the progress counters, the exploration tracker, the best model
so far, the metrics history, the current epoch's sums (:class:`EpochAccumulator`), the loader
position, the extra-batch stream, the random state, the log rows written and the run binding
(:func:`run_binding`). :func:`restore_trainer` checks a checkpoint's schema and run and loads
each entry back, naming the entry that does not fit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import MtlkitError
from mtlkit.training.budget import Progress
from mtlkit.training.checkpoint import (
    LoaderPosition,
    check_trainer_state,
    load_checkpoint,
    one_line,
)
from mtlkit.training.run_dir import config_hash, read_marker

_LOAD_ERRORS = (RuntimeError, ValueError, KeyError, IndexError, TypeError)


@dataclass
class EpochAccumulator:
    """What the current epoch has summed so far (for its metrics row), and the counters at its
    start; part of a checkpoint taken mid-epoch."""

    loss_sums: dict[str, float]
    batches: int
    passes: int
    backwards: int
    seconds: float
    rng_after_last_batch: Tensor

    @classmethod
    def start(cls, trainer: Any, tasks: Sequence[str]) -> EpochAccumulator:
        return cls(
            dict.fromkeys(tasks, 0.0),
            0,
            trainer.progress.passes,
            trainer.backwards,
            trainer.progress.seconds,
            torch.get_rng_state(),
        )

    def add(self, losses: Mapping[str, float]) -> None:
        for task, value in losses.items():
            self.loss_sums[task] += value
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, state: Mapping[str, Any]) -> EpochAccumulator:
        return cls(**state)


def trainer_state(trainer: Any, position: LoaderPosition, log_rows: dict[str, int]) -> dict:
    """Everything a resume of ``trainer`` needs, as :func:`save_checkpoint` writes it."""
    guard = getattr(trainer.strategy, "guard", None)
    exploration = trainer.exploration
    return {
        "model": trainer.model.state_dict(),
        "strategy": trainer.strategy.state_dict(),
        "nonfinite": None if guard is None else guard.state_dict(),
        "progress": asdict(trainer.progress),
        "counters": {
            "backwards": trainer.backwards,
            "batches_seen": trainer._batches_seen,
            "optimizer_steps": trainer._optimizer_steps,
        },
        "exploration": None if exploration is None else exploration.state_dict(),
        "best": {
            "score": trainer._best_score,
            "epoch": trainer.best_epoch,
            "state": trainer._best_state,
        },
        "history": trainer.history,
        "results": trainer.results,
        "epoch": None if trainer._epoch is None else trainer._epoch.state_dict(),
        "position": position.state_dict(),
        "extra_batches": trainer._extra_batches.state_dict(),
        "rng": torch.get_rng_state(),
        "log_rows": dict(log_rows),
        "precision": trainer.parallel.state_dict(),
        "run": run_binding(trainer),
        "route": None if trainer._auto_route() is None else trainer._auto_route().state_dict(),
        "affinity": None if trainer.affinity is None else trainer.affinity.state_dict(),
    }


def run_binding(trainer: Any) -> dict[str, Any]:
    """What binds a checkpoint to its run (its ``run`` entry): the config (as JSON values), its
    hash, the run folder's id (its marker, :mod:`mtlkit.training.run_dir`; ``None`` without
    one), the model, strategy and method classes, the tasks and the seed."""
    config = json.loads(json.dumps(trainer.config, default=str))  # plain values: weights_only
    run_dir = trainer._run_dir
    marker = read_marker(run_dir) if run_dir is not None else None
    return {
        "config": config,
        "config_hash": config_hash(config),
        "run_id": None if marker is None else marker.run_id,
        "model": type(trainer.model).__name__,
        "strategy": type(trainer.strategy).__name__,
        "methods": [type(m).__name__ for m in trainer.strategy.methods()],
        "tasks": list(trainer.task_names),
        "seed": trainer.seed,
    }


def check_binding(mine: Mapping[str, Any], saved: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another run (a stale one, or one copied from another folder),
    naming what differs. The run ids are compared when both the checkpoint and the folder have
    one."""
    if None not in (saved["run_id"], mine["run_id"]) and saved["run_id"] != mine["run_id"]:
        raise MtlkitError(
            f"checkpoint {str(path)!r} belongs to another run (run id {saved['run_id']}; "
            f"this run folder is run {mine['run_id']}): a stale checkpoint of an earlier "
            "run, or one copied from another folder; it is not resumed"
        )
    keys = ("model", "strategy", "methods", "tasks", "seed")
    changed = [k for k in keys if saved[k] != mine[k]]
    if changed:
        details = "; ".join(f"{k}: {saved[k]!r} -> {mine[k]!r}" for k in changed)
        raise MtlkitError(
            f"checkpoint {str(path)!r} was written by another run ({details}); it is not resumed"
        )


def restore_trainer(trainer: Any, path: Path) -> tuple[LoaderPosition, dict[str, int]]:
    """Load the checkpoint ``path`` into ``trainer``: its schema and its run are checked first
    (:func:`~mtlkit.training.checkpoint.check_trainer_state`, :func:`check_binding`), then each
    entry is restored; an entry that does not fit is named in one error.

    Returns:
        Where the interrupted epoch stood in the training data, and the rows each log had.
    """
    state = load_checkpoint(path)
    check_trainer_state(state, path)
    check_binding(run_binding(trainer), state["run"], path)
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.strategy.load_state_dict(state["strategy"])
    except _LOAD_ERRORS as error:
        raise MtlkitError(
            f"checkpoint {str(path)!r} does not fit this model and strategy (was it written "
            f"by a run with another architecture, method, strategy or tasks?): "
            f"{one_line(error)}"
        ) from None

    def restore(entry: str, load: Callable[[], Any]) -> Any:
        try:
            return load()
        except _LOAD_ERRORS as error:
            raise MtlkitError(
                f"checkpoint {str(path)!r}: entry {entry!r} does not fit this run: "
                f"{one_line(error)}"
            ) from None

    guard = getattr(trainer.strategy, "guard", None)
    if state["nonfinite"] and guard is not None:
        restore("nonfinite", lambda: guard.load_state_dict(state["nonfinite"]))
    trainer.progress = Progress(**state["progress"])
    counters = state["counters"]
    trainer.backwards = counters["backwards"]
    trainer._batches_seen = counters["batches_seen"]
    trainer._optimizer_steps = counters["optimizer_steps"]
    exploration = trainer.exploration
    if exploration is not None and state["exploration"] is not None:
        restore("exploration", lambda: exploration.load_state_dict(state["exploration"]))
    best = state["best"]
    trainer._best_score = float(best["score"])
    trainer.best_epoch = best["epoch"]
    trainer._best_state = best["state"]
    trainer.history = list(state["history"])
    trainer.results = dict(state["results"])
    epoch = state["epoch"]
    trainer._epoch = (
        None if epoch is None else restore("epoch", lambda: EpochAccumulator.load(epoch))
    )
    position = LoaderPosition()
    restore("position", lambda: position.load_state_dict(state["position"]))
    extra = trainer._extra_batches
    restore("extra_batches", lambda: extra.load_state_dict(state["extra_batches"]))
    restore("rng", lambda: torch.set_rng_state(state["rng"]))
    restore("precision", lambda: trainer.parallel.load_state_dict(state["precision"]))
    auto = trainer._auto_route()
    if auto is not None and state.get("route") is not None:  # absent before route="auto" measured
        restore("route", lambda: auto.load_state_dict(state["route"]))
    affinity = trainer.affinity
    if affinity is not None and state.get("affinity") is not None:
        restore("affinity", lambda: affinity.load_state_dict(state["affinity"]))
    return position, dict(state["log_rows"])
