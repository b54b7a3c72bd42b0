"""Experiment trackers: the rows of ``steps.csv`` and ``metrics.csv`` mirrored to Weights &
Biases or MLflow as they are written, the config as the run's parameters, the results of each
evaluated split, and the result files as artifacts when the run is closed.

A :class:`Tracker` has five calls: ``start`` (a new tracker run, or the one a resumed mtlkit run
started: its id is kept in ``trackers.json`` in the run folder), ``log`` (one CSV row),
``results`` (one evaluated split), ``flush`` and ``finish`` (the files as artifacts, the run's
status). The scalars are those TensorBoard gets (:class:`~mtlkit.training.logs.TensorBoardLog`):
every numeric, finite column of a row but its first, which is the row's step (``step`` for
``steps.csv``, ``epoch`` for ``metrics.csv``).

* :class:`WandbTracker`: keys ``steps/<column>`` and ``metrics/<column>``, plotted against
  ``steps/step`` and ``metrics/epoch`` (``define_metric``); the config as ``wandb.config``; the
  results in the run summary as ``results/<split>/<task>/<metric>``; the files as one artifact
  of type ``results``. ``WANDB_MODE=offline`` writes the run under ``dir`` only.
* :class:`MlflowTracker`: each column a metric of its own name, at step ``step`` or ``epoch``;
  the config flattened (``method_args.c``) as params; the results as metrics
  ``results/<split>/<task>/<metric>``; the files as artifacts. Metrics are sent in batches (at
  each flush of the log: every 100 steps and every epoch).

A resumed run goes on in the same tracker run, and the rows logged before the interruption but
after the checkpoint (which the run does again, with the same values) are not sent twice: the
last step sent per log is kept in ``trackers.json`` at each flush.
"""

from __future__ import annotations

import atexit
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.training.logs import write_json_atomic
from mtlkit.training.signals import TrainingInterrupted

TRACKERS_NAME = "trackers.json"
"""The run folder's record of its tracker runs: ``{tracker: {"id": ..., "logged": {log: x}}}``."""
LOGGERS = ("tensorboard", "wandb", "mlflow")
"""The names ``loggers`` takes (``tensorboard`` is the Trainer's ``tensorboard=True``)."""
LOGGER_ARGS: dict[str, tuple[str, ...]] = {
    "project": ("wandb",),
    "entity": ("wandb",),
    "group": ("wandb",),
    "tags": ("wandb", "mlflow"),
    "run_name": ("wandb", "mlflow"),
    "experiment": ("mlflow",),
    "tracking_uri": ("mlflow",),
}
"""The options of the trackers (config key ``logger_args``), each with the trackers it is for."""
RESULT_FILES = ("summary.json", "metrics.csv", "steps.csv", "config.yaml", "model.pt")
"""The files of the run folder uploaded as artifacts when the run is closed (those present)."""


def status_of(error: BaseException) -> str:
    """The tracker status of a run that ``error`` ended: ``interrupted`` (SIGINT/SIGTERM,
    Ctrl-C; a resume continues it) or ``failed``."""
    return (
        "interrupted" if isinstance(error, (TrainingInterrupted, KeyboardInterrupt)) else "failed"
    )


def require_wandb() -> Any:
    """The ``wandb`` module, or an error naming the extra to install."""
    try:
        import wandb
    except ImportError as error:
        raise MtlkitError(
            'logging to Weights & Biases needs wandb: pip install "mtlkit[wandb]" '
            f"(or pip install wandb) ({error})"
        ) from error
    return wandb


def require_mlflow() -> Any:
    """MLflow's ``MlflowClient`` class, or an error naming the extra to install."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise MtlkitError(
            'logging to MLflow needs mlflow: pip install "mtlkit[mlflow]" '
            f"(or pip install mlflow-skinny) ({error})"
        ) from error
    return MlflowClient


def scalars(row: Mapping[str, Any], x: str) -> dict[str, float]:
    """The values of ``row`` a tracker gets: numeric (not bool), finite, ``x`` excluded."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != x
        and not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
    }


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"method_args": {"c": 0.4}}`` -> ``{"method_args.c": "0.4"}`` (MLflow params are
    strings); an empty mapping is kept as ``"{}"``."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


class Tracker:
    """An experiment tracker the Trainer mirrors its logs to (see the module docstring).
    ``name`` keys its entry in ``trackers.json``."""

    name = "tracker"

    def start(
        self, out_dir: Path, config: Mapping[str, Any], run_id: str | None
    ) -> str:  # pragma: no cover (interface)
        """Start a tracker run, or continue run ``run_id``; return the run's id."""
        raise NotImplementedError

    def log(self, log: str, x: str, row: Mapping[str, Any]) -> None:  # pragma: no cover
        """One row of the log ``log`` (``steps`` or ``metrics``) whose step column is ``x``."""
        raise NotImplementedError

    def results(self, split: str, flat: Mapping[str, float], step: int) -> None:
        """The results of an evaluated split, ``{"task/metric": value}``."""

    def flush(self) -> None:
        """Send what is buffered."""

    def finish(self, files: Sequence[Path], status: str) -> None:  # pragma: no cover
        """Upload ``files`` and end the run: ``status`` is ``done``, ``failed`` or
        ``interrupted``."""
        raise NotImplementedError


class WandbTracker(Tracker):
    """Weights & Biases (``wandb.init``; see the module docstring). ``dir``: where wandb writes
    (default: the run folder; ``WANDB_DIR`` when set); ``run_name``: default the run folder's
    name. The mode (``WANDB_MODE=offline``), the API key and the host are wandb's own
    settings."""

    name = "wandb"

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        dir: str | Path | None = None,
    ) -> None:
        self.wandb = require_wandb()
        self.project, self.entity, self.group, self.tags = project, entity, group, list(tags)
        self.run_name, self.dir = run_name, dir
        self.run: Any = None

    def start(self, out_dir: Path, config: Mapping[str, Any], run_id: str | None) -> str:
        import os

        where = self.dir or os.environ.get("WANDB_DIR") or out_dir
        Path(where).mkdir(parents=True, exist_ok=True)
        version = tuple(int(p) for p in re.findall(r"\d+", self.wandb.__version__)[:2])
        self.run = self.wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=self.tags or None,
            name=self.run_name or out_dir.name,
            dir=str(where),
            config=dict(config),
            id=run_id,
            resume="allow" if run_id is not None else None,
            reinit="create_new" if version >= (0, 19) else True,
        )
        for log, x in (("steps", "step"), ("metrics", "epoch")):
            self.run.define_metric(f"{log}/{x}")
            self.run.define_metric(f"{log}/*", step_metric=f"{log}/{x}")
        return str(self.run.id)

    def log(self, log: str, x: str, row: Mapping[str, Any]) -> None:
        values = {f"{log}/{k}": v for k, v in scalars(row, x).items()}
        values[f"{log}/{x}"] = int(row[x])
        self.run.log(values)

    def results(self, split: str, flat: Mapping[str, float], step: int) -> None:
        for key, value in flat.items():
            self.run.summary[f"results/{split}/{key}"] = value

    def finish(self, files: Sequence[Path], status: str) -> None:
        if files:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.run.name or self.run.id}-results")
            artifact = self.wandb.Artifact(name, type="results")
            for path in files:
                artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status == "done" else 1)
        self.run = None


class MlflowTracker(Tracker):
    """MLflow, through ``MlflowClient`` (see the module docstring). ``tracking_uri``: default
    MLflow's own (``MLFLOW_TRACKING_URI``); ``experiment``: default ``MLFLOW_EXPERIMENT_NAME``,
    else ``mtlkit`` (created when missing); ``run_name``: default the run folder's name.
    A resumed run logs the params it was started with; a resumable key given another value on
    resume (a longer budget) is recorded as the tag ``mtlkit.resumed.<key>``, since MLflow never
    changes a logged param."""

    name = "mlflow"
    BATCH = 1000  # MLflow's limit of metrics per log_batch call
    PARAM_BATCH = 100  # and of params

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        self.client_class = require_mlflow()
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_name, self.tags = run_name, list(tags)
        self.client: Any = None
        self.run_id: str | None = None
        self._pending: list[Any] = []

    def start(self, out_dir: Path, config: Mapping[str, Any], run_id: str | None) -> str:
        import os

        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        try:
            self.client = self.client_class(tracking_uri=self.tracking_uri)
            params = flatten_config(config)
            if run_id is not None:
                saved = self.client.get_run(run_id).data.params
                self.client.update_run(run_id, status="RUNNING")
                changed = {k: v for k, v in params.items() if k in saved and saved[k] != v}
                for key, value in changed.items():
                    self.client.set_tag(run_id, f"mtlkit.resumed.{key}", value)
                params = {k: v for k, v in params.items() if k not in saved}
                self.run_id = run_id
            else:
                name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mtlkit"
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else self.client.create_experiment(name)
                )
                tags = {"mtlkit.run_dir": str(out_dir), **{t: "" for t in self.tags}}
                run = self.client.create_run(
                    experiment_id, run_name=self.run_name or out_dir.name, tags=tags
                )
                self.run_id = run.info.run_id
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), self.PARAM_BATCH):
                self.client.log_batch(self.run_id, params=items[i : i + self.PARAM_BATCH])
        except MlflowException as error:
            uri = self.tracking_uri or "MLflow's default (MLFLOW_TRACKING_URI)"
            raise MtlkitError(f"MLflow at {uri}: {error}") from error
        return str(self.run_id)

    def _metric(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        self._pending.append(Metric(key, value, int(time.time() * 1000), step))

    def log(self, log: str, x: str, row: Mapping[str, Any]) -> None:
        step = int(row[x])
        for key, value in scalars(row, x).items():
            self._metric(key, value, step)

    def results(self, split: str, flat: Mapping[str, float], step: int) -> None:
        for key, value in flat.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._metric(f"results/{split}/{key}", float(value), step)
        self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), self.BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i : i + self.BATCH])

    def finish(self, files: Sequence[Path], status: str) -> None:
        self.flush()
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        states = {"done": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
        self.client.set_terminated(self.run_id, status=states[status])
        self.run_id = None


def build_trackers(
    loggers: Sequence[str | Tracker], logger_args: Mapping[str, Any] | None = None
) -> list[Tracker]:
    """The trackers of ``loggers`` (names of :data:`LOGGERS` or :class:`Tracker` objects;
    ``tensorboard`` is not one: the Trainer's ``tensorboard`` flag does it), named ones built
    with the ``logger_args`` that are theirs (:data:`LOGGER_ARGS`).

    Raises:
        ConfigError: an unknown logger name, or an option no given logger takes.
    """
    args = dict(logger_args or {})
    names = [n for n in loggers if isinstance(n, str)]
    check_loggers(names, args)
    trackers: list[Tracker] = []
    for entry in loggers:
        if isinstance(entry, Tracker):
            trackers.append(entry)
        elif entry in ("wandb", "mlflow"):
            mine = {k: v for k, v in args.items() if entry in LOGGER_ARGS[k]}
            trackers.append(WandbTracker(**mine) if entry == "wandb" else MlflowTracker(**mine))
        elif entry != "tensorboard":
            raise ConfigError(f"loggers takes names or Tracker objects, got {entry!r}")
    return trackers


def check_loggers(names: Sequence[str], logger_args: Mapping[str, Any]) -> None:
    """Refuse an unknown or repeated logger name, and an option that none of ``names`` takes."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"unknown logger(s) {', '.join(map(repr, unknown))}; valid: {', '.join(LOGGERS)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"loggers lists {', '.join(map(repr, repeated))} more than once")
    for key in logger_args:
        if key not in LOGGER_ARGS:
            raise ConfigError(f"logger_args has no option {key!r}; valid: {', '.join(LOGGER_ARGS)}")
        if not set(LOGGER_ARGS[key]) & set(names):
            raise ConfigError(
                f"logger_args.{key} is an option of {' and '.join(LOGGER_ARGS[key])}, which "
                f"loggers does not name (loggers: {list(names) or 'none'})"
            )


class TrackedLog:
    """A CSV log (or its TensorBoard mirror) whose rows also go to ``trackers``; it has the
    log's interface. Rows whose step is at most ``skip_through`` (those a resumed run does
    again, already sent) are written to the CSV only."""

    def __init__(self, log: Any, name: str, trackers: TrackerSet, skip_through: int | None):
        self.log, self.name, self.trackers = log, name, trackers
        self.x = log.columns[0]
        self.skip_through = skip_through
        self.last: int | None = skip_through
        self._since_flush = 0

    @property
    def rows(self) -> int:
        return int(self.log.rows)

    @property
    def columns(self) -> list[str]:
        return list(self.log.columns)

    def append(self, row: Mapping[str, Any]) -> None:
        self.log.append(row)
        step = int(row[self.x])
        if self.skip_through is not None and step <= self.skip_through:
            return
        for tracker in self.trackers.trackers:
            tracker.log(self.name, self.x, row)
        self.last = step
        self._since_flush += 1
        if self._since_flush >= 100:
            self.flush()

    def flush(self) -> None:
        self.log.flush()
        self.trackers.flush()
        self._since_flush = 0

    def close(self) -> None:
        self.log.close()
        self.trackers.flush()


class TrackerSet:
    """The trackers of one Trainer: started at the first ``fit`` (into the run folder's tracker
    runs when resumed), mirroring its logs, finished by :meth:`close` (or at exit)."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)
        self.out_dir: Path | None = None
        self.logs: dict[str, TrackedLog] = {}
        self._record: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def attach(
        self,
        logs: dict[str, Any] | None,
        out_dir: Path | None,
        config: Mapping[str, Any],
        resumed: bool,
    ) -> dict[str, Any] | None:
        """Start the trackers (once) and return ``logs`` mirrored to them."""
        if not self.trackers or logs is None or out_dir is None:
            return logs
        if self.out_dir is None:
            self.out_dir = out_dir
            path = out_dir / TRACKERS_NAME
            saved = (
                json.loads(path.read_text(encoding="utf-8")) if resumed and path.is_file() else {}
            )
            for tracker in self.trackers:
                entry = saved.get(tracker.name, {})
                run_id = tracker.start(out_dir, config, entry.get("id") if resumed else None)
                self._record[tracker.name] = {"id": run_id, "logged": dict(entry.get("logged", {}))}
            self._write()
            atexit.register(self.close, "interrupted")
        logged = next(iter(self._record.values()))["logged"]
        self.logs = {
            name: TrackedLog(log, name, self, logged.get(name) if resumed else None)
            for name, log in logs.items()
        }
        return dict(self.logs)

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()
        if self.out_dir is not None:
            for entry in self._record.values():
                entry["logged"].update(
                    {n: log.last for n, log in self.logs.items() if log.last is not None}
                )
            self._write()

    def results(self, split: str, results: Mapping[str, Mapping[str, float]], step: int) -> None:
        """An evaluated split's ``{task: {metric: value}}``, to every tracker (if started)."""
        if self.out_dir is not None:
            flat = {f"{t}/{m}": v for t, ms in results.items() for m, v in ms.items()}
            for tracker in self.trackers:
                tracker.results(split, flat, step)

    def close(self, status: str = "done") -> None:
        """Upload the result files and end the tracker runs (a no-op once closed)."""
        if self.out_dir is None:
            return
        atexit.unregister(self.close)
        self.flush()
        files = [self.out_dir / n for n in RESULT_FILES if (self.out_dir / n).is_file()]
        for tracker in self.trackers:
            tracker.finish(files if status == "done" else [], status)
        self.out_dir, self.logs = None, {}

    def _write(self) -> None:
        assert self.out_dir is not None
        write_json_atomic(self.out_dir / TRACKERS_NAME, self._record)
