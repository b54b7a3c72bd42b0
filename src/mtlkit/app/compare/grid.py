"""``mtlkit compare``: a grid of methods x strategies x seeds (x budgets), one table, plots.

A compare config is a train config (:class:`~mtlkit.app.config.TrainConfig`: data, model,
optimizer, ...) plus the grid keys:

* ``methods``: a list of method names, or of mappings ``{name: cagrad, args: {c: 0.4},
  label: cagrad04}`` (``args`` and ``label`` optional; the label names the run folders and the
  table rows, by default the name, followed by the arguments);
* ``strategies``: the same for update strategies (``joint``, ``alternating``);
* ``seeds``: a list of seeds;
* ``budgets``: a list of budgets, each a mapping of one or more of ``epochs``, ``steps``,
  ``passes`` (forward passes), ``forward_backward`` (forward passes plus backward passes through
  the shared layers, the compute a method spends) and ``seconds``, with an optional ``name``
  (default: e.g. ``epochs4``, ``fb600``). Every method then runs once per budget, so that
  methods of different cost are compared at equal epochs *and* at equal compute. Without
  ``budgets`` the runs use the config's own ``epochs``/``steps``/... keys;
* ``stl``: ``per_seed`` (default: single-task baselines trained once for each seed, each run's
  Δm% taken against its seed's) or ``once`` (trained with the first seed, used for every run).
  The baselines are trained with the config's own budget keys (``epochs``, ...), and are not
  trained at all when the config names a ``baseline`` file (an ``stl_baseline.json``).

Without ``methods``/``strategies``/``seeds`` the grid takes the config's ``method``/
``strategy``/``seed``; giving both forms of a key is an error, as are unknown keys, names or
arguments, all reported before any run starts.

``run_grid`` trains every run into ``OUT/runs/<method>-<strategy>-seed<k>[-<budget>]/`` through
the single-run code path of ``mtlkit train`` (:func:`mtlkit.app.runner.run`; baselines through
:func:`mtlkit.app.runner.run_stl` into ``OUT/stl/seed<k>/``). A run whose ``summary.json`` holds its
test results is finished and skipped on the next invocation (its saved ``config.yaml`` must
match, or the grid stops with an error before training); a run with a ``checkpoint.pt`` (written
on Ctrl-C, or every ``checkpoint_every`` batches) resumes from it; any other is trained from the
start. ``jobs`` runs train at a time, each in a fresh worker process (spawned; torch threads =
CPUs // jobs), so that each run's peak memory and time are its own; ``jobs=0`` trains them one
after the other in this process (faster to start; on the CPU the peak memory is then the
process's running maximum). Then ``OUT/results.csv`` (one row per run), ``OUT/results.md``
(mean ± std over seeds, 95% CI of Δm%), ``OUT/compare.json`` (what the plots need) and the plots
of :func:`mtlkit.app.plots.plot_compare` are written.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from mtlkit.app.config import (
    BUDGET_KEYS,
    TrainConfig,
    apply_overrides,
    config_keys,
    parse_value,
    read_config_file,
)
from mtlkit.app.runner import (
    STL_BASELINE,
    check_baseline,
    draw_plots,
    load_baseline,
    load_problem,
    make_loaders,
    run,
    run_stl,
)
from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods import EW, METHODS
from mtlkit.metrics import delta_m
from mtlkit.registry import Registry, normalize_name
from mtlkit.tasks import Task
from mtlkit.training.logs import atomic_file, write_atomic, write_json_atomic
from mtlkit.training.strategies import STRATEGIES
from mtlkit.training.trainer import TrainingInterrupted

GRID_KEYS = ("methods", "strategies", "seeds", "budgets", "stl")
"""The keys a compare config adds to a train config."""
STL_MODES = ("per_seed", "once")
ENTRY_KEYS = ("name", "args", "label")
BUDGET_ABBREVIATIONS = {"forward_backward": "fb"}
# Keys that do not change what a run computes: a finished run is reused whatever their values.
PRESENTATION_KEYS = {
    "progress",
    "plots",
    "tensorboard",
    "workers",
    "checkpoint_every",
    "out",
    "baseline",
}
LABEL = re.compile(r"^[A-Za-z0-9_.]+$")
BUDGET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

EXIT_FAILED_RUNS = 1
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------- the grid config
@dataclass(frozen=True)
class Entry:
    """A method or strategy of the grid: registered name, constructor arguments, label."""

    name: str
    args: dict[str, Any]
    label: str

    def to_config(self) -> dict[str, Any] | str:
        if not self.args and self.label == self.name:
            return self.name
        return {"name": self.name, "args": dict(self.args), "label": self.label}


@dataclass(frozen=True)
class BudgetSpec:
    """One training budget of the grid: its name and its limits (the others are unset)."""

    name: str
    limits: dict[str, float | int]

    def config_values(self) -> dict[str, float | int | None]:
        return {key: self.limits.get(key) for key in BUDGET_KEYS}

    def describe(self) -> str:
        return ", ".join(f"{key}={_number(v)}" for key, v in self.limits.items())


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    name: str
    method: Entry
    strategy: Entry
    seed: int
    budget: BudgetSpec | None
    config: TrainConfig


@dataclass
class Grid:
    """A validated compare config: the base train config and the grid."""

    base: TrainConfig
    methods: list[Entry]
    strategies: list[Entry]
    seeds: list[int]
    budgets: list[BudgetSpec] | None
    stl: str = "per_seed"
    source: str | None = None  # the config file's stem, for the default output folder

    def out_dir(self) -> Path:
        """``out``, or ``runs/<config file name>`` (``runs/compare-<data>`` without a file):
        a fixed folder, so that invoking the same command again resumes the grid."""
        if self.base.out is not None:
            return Path(self.base.out)
        return Path("runs") / (self.source or f"compare-{self.base.data}")

    def runs(self, out_dir: Path) -> list[RunSpec]:
        """Every run, in execution order: seed by seed (so that an early stop leaves whole
        seeds), then budget, method, strategy."""
        specs = []
        for seed in self.seeds:
            for budget in self.budgets or [None]:
                for method in self.methods:
                    for strategy in self.strategies:
                        name = f"{method.label}-{strategy.label}-seed{seed}"
                        if budget is not None:
                            name += f"-{budget.name}"
                        config = dataclasses.replace(
                            self.base,
                            method=method.name,
                            method_args=dict(method.args),
                            strategy=strategy.name,
                            strategy_args=dict(strategy.args),
                            seed=seed,
                            out=str(out_dir / "runs" / name),
                            baseline=None,
                            **(budget.config_values() if budget is not None else {}),
                        )
                        specs.append(RunSpec(name, method, strategy, seed, budget, config))
        return specs

    def stl_seeds(self) -> list[int]:
        """The seeds single-task baselines are trained for (none with a ``baseline`` file)."""
        if self.base.baseline is not None:
            return []
        return list(self.seeds) if self.stl == "per_seed" else self.seeds[:1]

    def stl_config(self, seed: int, out_dir: Path) -> TrainConfig:
        return dataclasses.replace(
            self.base, seed=seed, out=str(stl_dir(out_dir, seed)), baseline=None
        )

    def baseline_seed(self, seed: int) -> int:
        """The seed whose baselines a run of ``seed`` is compared with."""
        return seed if self.stl == "per_seed" else self.seeds[0]

    def to_dict(self) -> dict[str, Any]:
        data = self.base.to_dict()
        for key in ("method", "method_args", "strategy", "strategy_args", "seed"):
            data.pop(key)
        data["methods"] = [m.to_config() for m in self.methods]
        data["strategies"] = [s.to_config() for s in self.strategies]
        data["seeds"] = list(self.seeds)
        if self.budgets is not None:
            data["budgets"] = [{"name": b.name, **b.limits} for b in self.budgets]
        data["stl"] = self.stl
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def grid_keys() -> list[str]:
    """Every key of a compare config: the train config's, then the grid's."""
    return [*config_keys(), *GRID_KEYS]


def load_grid(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Grid:
    """The compare config from a YAML file (optional) and ``key=value`` overrides (train keys
    and grid keys, e.g. ``methods=[ew,mgda]``), validated: every name, argument and budget is
    checked here, before any run starts.

    Raises:
        ConfigError: naming the bad key or value and the valid choices.
    """
    data = read_config_file(path)
    valid = grid_keys()
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
        )
    grid = {k: data.pop(k) for k in GRID_KEYS if k in data}
    train_overrides = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        top = key.partition(".")[0]
        if sep and top in GRID_KEYS:
            if key != top:
                raise ConfigError(f"grid key {top!r} takes a whole value: {top}=[...], not {key!r}")
            grid[top] = parse_value(text)
        elif sep and top not in config_keys():
            raise ConfigError(f"unknown config key {top!r}; valid keys: {', '.join(valid)}")
        else:
            train_overrides.append(item)
    given = set(data) | {i.partition("=")[0].strip().replace("-", "_") for i in train_overrides}
    for single, plural in (
        ("method", "methods"),
        ("method_args", "methods"),
        ("strategy", "strategies"),
        ("strategy_args", "strategies"),
        ("seed", "seeds"),
    ):
        if plural in grid and any(g == single or g.startswith(f"{single}.") for g in given):
            raise ConfigError(
                f"give {plural!r} or {single!r}, not both (a compare config lists "
                f"{plural}: [...]; arguments go in entries like {{name: ..., args: {{...}}}})"
            )
    base = TrainConfig(**apply_overrides(data, train_overrides))
    methods = _entries(
        grid.get("methods", [{"name": base.method, "args": base.method_args}]), METHODS, "methods"
    )
    strategies = _entries(
        grid.get("strategies", [{"name": base.strategy, "args": base.strategy_args}]),
        STRATEGIES,
        "strategies",
    )
    seeds = _seeds(grid.get("seeds", [base.seed]))
    budgets = _budgets(grid["budgets"], base) if grid.get("budgets") is not None else None
    stl = grid.get("stl", "per_seed")
    if stl not in STL_MODES:
        raise ConfigError(f"stl must be one of {', '.join(STL_MODES)}; got {stl!r}")
    source = Path(path).stem if path is not None else None
    result = Grid(base, methods, strategies, seeds, budgets, stl, source)
    result.runs(result.out_dir())  # builds (so validates) the config of every run
    return result


def _entries(value: Any, registry: Registry[Any], key: str) -> list[Entry]:
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"{key} must be a non-empty list of names or of {{name:, args:, label:}} mappings, "
            f"got {value!r}"
        )
    entries = []
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping):
            raise ConfigError(f"{key}: entry {item!r} is not a name or a mapping")
        extra = sorted(set(item) - set(ENTRY_KEYS))
        if extra:
            raise ConfigError(
                f"{key}: entry {dict(item)} has unknown key(s) {', '.join(map(str, extra))}; "
                f"valid keys: {', '.join(ENTRY_KEYS)}"
            )
        name = item.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{key}: entry {dict(item)} needs a name (a string)")
        registry.factory(name)  # an unknown name: one error listing the valid ones
        name = normalize_name(name)
        args = item.get("args") or {}
        if not isinstance(args, Mapping):
            raise ConfigError(f"{key}: args of {name!r} must be a mapping, got {args!r}")
        args = {str(k): v for k, v in args.items()}
        if registry is STRATEGIES:
            registry.get(name, method=EW(), **args)
        else:
            registry.get(name, **args)
        label = item.get("label") or _default_label(name, args)
        if not isinstance(label, str) or not LABEL.match(label):
            raise ConfigError(
                f"{key}: label {label!r} of {name!r} may hold only letters, digits, '_' and '.'"
            )
        entries.append(Entry(name, args, label))
    labels = [e.label for e in entries]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(
            f"{key}: label(s) {', '.join(map(repr, repeated))} used twice; give each entry "
            "its own label: {name: ..., args: {...}, label: ...}"
        )
    return entries


def _default_label(name: str, args: Mapping[str, Any]) -> str:
    parts = [name] + [f"{k}{_number(v) if isinstance(v, float) else v}" for k, v in args.items()]
    return re.sub(r"[^A-Za-z0-9_.]", "", "_".join(parts))


def _seeds(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, list) and value
    if not ok or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {value!r}")
    repeated = sorted({s for s in value if value.count(s) > 1})
    if repeated:
        raise ConfigError(f"seeds lists {', '.join(map(str, repeated))} more than once")
    return list(value)


def _budgets(value: Any, base: TrainConfig) -> list[BudgetSpec]:
    valid = ["name", *BUDGET_KEYS]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"budgets must be a non-empty list of mappings like {{epochs: 3}} or "
            f"{{forward_backward: 600, name: equal_compute}}; got {value!r}"
        )
    budgets = []
    for item in value:
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"budget {item!r} is not a mapping; valid keys: {', '.join(valid)} "
                "(e.g. {epochs: 3})"
            )
        unknown = sorted(set(map(str, item)) - set(valid))
        if unknown:
            raise ConfigError(
                f"budget {dict(item)} has unknown key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(valid)}"
            )
        limits = {k: item[k] for k in BUDGET_KEYS if item.get(k) is not None}
        if not limits:
            raise ConfigError(
                f"budget {dict(item)} sets no limit; give one or more of {', '.join(BUDGET_KEYS)}"
            )
        try:
            checked = dataclasses.replace(base, **{k: limits.get(k) for k in BUDGET_KEYS})
        except ConfigError as error:
            raise ConfigError(f"budget {dict(item)}: {error}") from error
        limits = {k: getattr(checked, k) for k in limits}
        name = item.get("name") or "-".join(
            f"{BUDGET_ABBREVIATIONS.get(k, k)}{_number(v)}" for k, v in limits.items()
        )
        if not isinstance(name, str) or not BUDGET_NAME.match(name):
            raise ConfigError(
                f"budget name {name!r} may hold only letters, digits, '_', '.' and '-'"
            )
        budgets.append(BudgetSpec(name, limits))
    names = [b.name for b in budgets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"budget name(s) {', '.join(map(repr, repeated))} used twice")
    return budgets


def _number(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def stl_dir(out_dir: Path, seed: int) -> Path:
    return out_dir / "stl" / f"seed{seed}"


# ------------------------------------------------------------------------------- one job
@dataclass(frozen=True)
class Job:
    """One unit of work for a worker: a run, or the single-task baselines of one seed."""

    kind: Literal["run", "stl"]
    name: str
    config: dict[str, Any]
    resume: bool = False


@dataclass
class Outcome:
    name: str
    status: Literal["done", "failed", "interrupted"]
    seconds: float
    error: str | None = None


def execute(job: Job, threads: int | None = None) -> Outcome:
    """Do ``job`` (in this process or in a worker): :func:`mtlkit.app.runner.run` (and the run's
    plots when ``plots``) or :func:`mtlkit.app.runner.run_stl`. User-level failures (an
    :class:`MtlkitError`, e.g. a loss that became NaN) are returned, and written to the run
    folder's ``error.txt``; a bug propagates."""
    if threads is not None:
        torch.set_num_threads(threads)
    config = TrainConfig(**job.config)
    out_dir = Path(str(config.out))
    if config.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # each run's own peak (jobs=0)
    start = time.perf_counter()
    error_file = out_dir / "error.txt"
    try:
        if job.kind == "stl":
            run_stl(config, out_dir)
        else:
            run(config, out_dir, resume=job.resume)
            if config.plots:
                draw_plots(out_dir)
    except TrainingInterrupted as stop:
        return Outcome(job.name, "interrupted", time.perf_counter() - start, str(stop))
    except MtlkitError as error:
        write_atomic(error_file, f"{type(error).__name__}: {error}\n")
        return Outcome(job.name, "failed", time.perf_counter() - start, str(error))
    error_file.unlink(missing_ok=True)
    return Outcome(job.name, "done", time.perf_counter() - start)


def _worker(job: Job, threads: int, conn: Connection) -> None:
    """A worker process: :func:`execute` ``job`` and send back ``("outcome", Outcome)``, or
    ``("crash", traceback)`` for a bug. It starts with Ctrl-C ignored (inherited, so that a
    Ctrl-C while it imports is no traceback); during ``fit`` the Trainer's handler checkpoints
    and stops the run on SIGINT or SIGTERM."""
    try:
        conn.send(("outcome", execute(job, threads)))
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
    finally:
        conn.close()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while a worker is started: a process started with SIGINT ignored keeps it
    ignored (Python then installs no KeyboardInterrupt handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- the grid run
@dataclass
class GridReport:
    """What :func:`run_grid` did: the outcome of each job it ran, the names it skipped, and the
    results table."""

    out_dir: Path
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    written: list[Path] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)

    @property
    def executed(self) -> list[str]:
        return [o.name for o in self.outcomes]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def is_finished(run_dir: Path, tasks: Sequence[Task]) -> bool:
    """Whether ``run_dir/summary.json`` holds the test value of every metric of every task
    (the Trainer writes it atomically after the test evaluation)."""
    summary = _read_json(run_dir / "summary.json")
    test = (summary or {}).get("results", {}).get("test")
    if not isinstance(test, Mapping) or "cost" not in (summary or {}):
        return False
    return all(
        isinstance(test.get(t.name), Mapping) and all(m in test[t.name] for m in t.metrics)
        for t in tasks
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_same_config(folder: Path, expected: TrainConfig, what: str) -> None:
    """Raise a ConfigError if ``folder`` holds the results of another config than
    ``expected`` (keys that do not change results aside)."""
    saved = folder / "config.yaml"
    if not saved.is_file():
        return
    try:
        loaded = yaml.safe_load(saved.read_text(encoding="utf-8"))
        old = TrainConfig(**loaded).to_dict()
    except (yaml.YAMLError, TypeError, MtlkitError) as error:
        raise ConfigError(
            f"{what} {str(folder)!r} holds a config.yaml this version cannot read ({error}); "
            "move it away or choose another out"
        ) from error
    new = expected.to_dict()
    changed = [k for k in new if k not in PRESENTATION_KEYS and old.get(k) != new[k]]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(
            f"{what} {str(folder)!r} was trained with another config ({diff}); give another "
            "out, or remove that folder to retrain it"
        )


def run_grid(
    grid: Grid,
    jobs: int = 1,
    echo: Callable[[str], None] = print,
) -> GridReport:
    """Train every run of ``grid`` not finished yet (and the baselines), then write the results
    and plots; see the module docstring. ``jobs``: runs at a time in worker processes (0: in
    this process)."""
    if jobs < 0:
        raise ConfigError(f"jobs must be >= 0 (0: in this process), got {jobs}")
    out_dir = grid.out_dir()
    problem = load_problem(dataclasses.replace(grid.base, seed=grid.seeds[0]), None)
    tasks = problem.tasks
    specs = grid.runs(out_dir)
    external = None
    if grid.base.baseline is not None:
        external = load_baseline(grid.base.baseline)
        check_baseline(external, tasks, grid.base.baseline)
    # Plan: every check before the first run.
    plan: list[Job] = []
    report = GridReport(out_dir, tasks=list(tasks))
    for seed in grid.stl_seeds():
        config = grid.stl_config(seed, out_dir)
        folder = stl_dir(out_dir, seed)
        check_same_config(folder, config, "single-task baselines")
        if (folder / STL_BASELINE).is_file():
            report.skipped.append(f"stl-seed{seed}")
        else:
            quiet = dataclasses.replace(config, progress=False) if jobs > 1 else config
            plan.append(Job("stl", f"stl-seed{seed}", quiet.to_dict()))
    for spec in specs:
        folder = Path(str(spec.config.out))
        check_same_config(folder, spec.config, "run")
        if is_finished(folder, tasks):
            report.skipped.append(spec.name)
            continue
        config = spec.config
        if jobs > 1:  # no interleaved progress bars
            config = dataclasses.replace(config, progress=False)
        resume = (folder / "checkpoint.pt").is_file()
        plan.append(Job("run", spec.name, config.to_dict(), resume=resume))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "compare.yaml", grid.to_yaml())
    if jobs > 1 and any(b.limits.get("seconds") for b in grid.budgets or []):
        echo(f"note: time budgets with --jobs {jobs}: the runs share the CPUs")
    total = len(specs) + len(grid.stl_seeds())
    done = len(report.skipped)
    if report.skipped:
        echo(f"{done} of {total} finished before, skipped ({out_dir})")

    def record(job: Job, outcome: Outcome) -> None:
        nonlocal done
        done += 1
        report.outcomes.append(outcome)
        verb = {"done": "done", "failed": "FAILED", "interrupted": "interrupted"}[outcome.status]
        how = " (resumed)" if job.resume else ""
        line = f"[{done}/{total}] {job.name}{how}: {verb} in {outcome.seconds:.1f} s"
        if outcome.status == "done" and job.kind == "run":
            seed = grid.baseline_seed(job.config["seed"])
            baseline = grid.base.baseline or stl_dir(out_dir, seed) / STL_BASELINE
            line += _delta_m_note(Path(job.config["out"]), tasks, Path(baseline))
        if outcome.error:
            line += f": {outcome.error}"
        echo(line)

    try:
        if jobs == 0:
            for job in plan:
                outcome = execute(job)
                record(job, outcome)
                if outcome.status == "interrupted":
                    report.interrupted = True
                    break
        elif plan:
            report.interrupted = _run_in_workers(plan, jobs, record)
    except KeyboardInterrupt:
        report.interrupted = True
    baselines = load_baselines(grid, out_dir, external)
    epoch_batches = batches_per_epoch(problem, grid.base)
    report.rows = collect_rows(grid, specs, tasks, baselines, epoch_batches)
    report.written = write_results(grid, report.rows, tasks, out_dir, baselines, echo)
    return report


def _delta_m_note(run_dir: Path, tasks: Sequence[Task], baseline: Path) -> str:
    """``", Δm +1.23%"`` for a progress line, when the run's baseline exists already."""
    if not baseline.is_file():
        return ""
    summary = _read_json(run_dir / "summary.json") or {}
    try:
        flat, _ = run_delta_m(summary["results"]["test"], tasks, load_baseline(baseline))
    except (KeyError, TypeError, MtlkitError):
        return ""
    return f", Δm {flat:+.2f}%"


def _run_in_workers(plan: list[Job], jobs: int, record: Callable[[Job, Outcome], None]) -> bool:
    """Run ``plan`` in at most ``jobs`` worker processes at a time, a fresh (spawned) one per
    job; return whether it was interrupted. On Ctrl-C no new job starts, and the running ones get
    SIGTERM: those training save a checkpoint and stop, the others end (and start over next
    time). A worker that dies (killed, out of memory) fails its run; a bug in a worker is raised
    here with the worker's traceback."""
    threads = max(1, available_cpus() // jobs)
    context = multiprocessing.get_context("spawn")
    waiting = list(plan)
    running: dict[Connection, tuple[Any, Job]] = {}  # result pipe -> process, job
    interrupted = False

    def finish(conn: Connection) -> None:
        """Collect a worker's result (waiting for it if need be) or notice its death."""
        nonlocal interrupted
        process, job = running.pop(conn)
        try:
            message = conn.recv()
        except EOFError:  # the worker ended without an answer
            message = None
        conn.close()
        process.join()
        if message is None:
            code = process.exitcode
            died = f"its worker process died (exit code {code}; killed? out of memory?)"
            outcome = Outcome(job.name, "failed", 0.0, died)
            if code == -signal.SIGTERM and interrupted:
                outcome = Outcome(job.name, "interrupted", 0.0, "stopped before training")
        elif message[0] == "crash":
            raise RuntimeError(f"{job.name} crashed in its worker process:\n{message[1]}")
        else:
            outcome = message[1]
        interrupted |= outcome.status == "interrupted"
        record(job, outcome)

    try:
        while (waiting and not interrupted) or running:
            while waiting and not interrupted and len(running) < jobs:
                job = waiting.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(job, threads, send))
                with _sigint_ignored():
                    process.start()
                send.close()  # so that the worker's end closing is an EOF here
                running[receive] = (process, job)
            for conn in wait(list(running)):
                finish(conn)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        interrupted = True
        for process, _ in running.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for conn in list(running):
            finish(conn)
    finally:
        for process, _ in running.values():  # only after an error: leave no orphans
            process.kill()
            process.join()
    return interrupted


def batches_per_epoch(problem: Any, config: TrainConfig) -> int:
    """Training batches in one epoch (for the time per epoch of runs that stop mid-epoch)."""
    train = make_loaders(problem, config)["train"]
    return len(MultiInputLoader(train)) if isinstance(train, Mapping) else len(train)


# ------------------------------------------------------------------------------- results
def result_columns(tasks: Sequence[Task]) -> list[str]:
    """The columns of ``results.csv``."""
    metrics = [f"{t.name}/{m}" for t in tasks for m in t.metrics]
    losses = [f"{t.name}/loss" for t in tasks]
    cost = ["epochs", "steps", "batches", "passes", "backwards", "forward_backward"]
    cost += ["seconds", "seconds_per_epoch", "peak_memory_mb", "best_epoch"]
    head = ["run", "method", "strategy", "seed", "budget"]
    return [*head, *metrics, *losses, "delta_m", "delta_m_task", *cost]


def load_baselines(
    grid: Grid, out_dir: Path, external: dict[str, dict[str, float]] | None
) -> dict[int, dict[str, dict[str, float]]]:
    """The single-task baseline of each seed of the grid (those that exist)."""
    baselines = {}
    for seed in grid.seeds:
        if external is not None:
            baselines[seed] = external
            continue
        path = stl_dir(out_dir, grid.baseline_seed(seed)) / STL_BASELINE
        if path.is_file():
            baselines[seed] = load_baseline(path)
    return baselines


def run_delta_m(
    test: Mapping[str, Mapping[str, float]],
    tasks: Sequence[Task],
    baseline: Mapping[str, Mapping[str, float]] | None,
) -> tuple[float, float]:
    """Δm% of one run's test metrics against ``baseline`` (NaN without one): the mean over
    all metrics (Nash-MTL, FAMO) and the ``Task.weight``-weighted mean over tasks (LibMTL)."""
    if baseline is None:
        return math.nan, math.nan
    metrics = {t.name: {m: test[t.name][m] for m in t.metrics} for t in tasks}
    directions = {t.name: t.higher_is_better() for t in tasks}
    weights = {t.name: t.weight for t in tasks}
    flat = delta_m(metrics, baseline, directions, mode="flat")
    per_task = delta_m(metrics, baseline, directions, mode="task_mean", task_weights=weights)
    return flat, per_task


def collect_rows(
    grid: Grid,
    specs: Sequence[RunSpec],
    tasks: Sequence[Task],
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
    epoch_batches: int,
) -> list[dict[str, Any]]:
    """One row per finished run (in grid order: budget, method, strategy, seed), from its
    ``summary.json``."""
    position = {
        **{("b", b.name): i for i, b in enumerate(grid.budgets or [])},
        **{("m", m.label): i for i, m in enumerate(grid.methods)},
        **{("s", s.label): i for i, s in enumerate(grid.strategies)},
        **{("seed", k): i for i, k in enumerate(grid.seeds)},
    }

    def key(spec: RunSpec) -> tuple[int, ...]:
        budget = position[("b", spec.budget.name)] if spec.budget is not None else 0
        return (
            budget,
            position[("m", spec.method.label)],
            position[("s", spec.strategy.label)],
            position[("seed", spec.seed)],
        )

    rows = []
    for spec in sorted(specs, key=key):
        folder = Path(str(spec.config.out))
        if not is_finished(folder, tasks):
            continue
        summary = _read_json(folder / "summary.json") or {}
        test, cost = summary["results"]["test"], summary["cost"]
        row: dict[str, Any] = {
            "run": spec.name,
            "method": spec.method.label,
            "strategy": spec.strategy.label,
            "seed": spec.seed,
            "budget": spec.budget.name if spec.budget is not None else "",
        }
        row.update({f"{t.name}/{m}": test[t.name][m] for t in tasks for m in t.metrics})
        row.update({f"{t.name}/loss": test[t.name].get("loss") for t in tasks})
        row["delta_m"], row["delta_m_task"] = run_delta_m(test, tasks, baselines.get(spec.seed))
        batches = cost.get("batches") or 0
        seconds = cost["seconds"]
        row.update(
            epochs=cost["epochs"],
            steps=cost["steps"],
            batches=batches,
            passes=cost["passes"],
            backwards=cost.get("backwards"),
            forward_backward=cost["passes"] + (cost.get("backwards") or 0),
            seconds=seconds,
            seconds_per_epoch=seconds * epoch_batches / batches if batches else math.nan,
            peak_memory_mb=cost.get("peak_memory_mb"),
            best_epoch=summary.get("best_epoch"),
        )
        rows.append(row)
    return rows


def write_results(
    grid: Grid,
    rows: Sequence[Mapping[str, Any]],
    tasks: Sequence[Task],
    out_dir: Path,
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Write ``results.csv``, ``compare.json``, ``results.md`` (atomically) and, when
    ``plots``, the figures; return the paths written."""
    columns = result_columns(tasks)
    with atomic_file(out_dir / "results.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    meta = {
        "tasks": {t.name: {"metrics": t.higher_is_better(), "weight": t.weight} for t in tasks},
        "methods": [m.label for m in grid.methods],
        "strategies": [s.label for s in grid.strategies],
        "seeds": list(grid.seeds),
        "budgets": [{"name": b.name, **b.limits} for b in grid.budgets or []],
        "baseline": baseline_description(grid),
        "baselines": {str(seed): b for seed, b in baselines.items()},
    }
    write_json_atomic(out_dir / "compare.json", meta)
    write_atomic(out_dir / "results.md", results_markdown(grid, rows, tasks, out_dir))
    written = [out_dir / "results.csv", out_dir / "results.md", out_dir / "compare.json"]
    if grid.base.plots and rows:
        from mtlkit.app.plots import plot_compare

        try:
            written += plot_compare(out_dir)
        except MtlkitError as error:
            if "matplotlib" not in str(error):
                raise
            echo(f"mtlkit: plots not drawn: {error}; plots=false hides this")
    return written


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def baseline_description(grid: Grid) -> str:
    if grid.base.baseline is not None:
        return f"the single-task baselines of {grid.base.baseline}"
    budget = ", ".join(
        f"{k}={_number(getattr(grid.base, k))}"
        for k in BUDGET_KEYS
        if getattr(grid.base, k) is not None
    )
    which = "one per seed" if grid.stl == "per_seed" else f"seed {grid.seeds[0]}, for all seeds"
    return f"single-task baselines ({which}, trained with {budget})"


def results_markdown(
    grid: Grid, rows: Sequence[Mapping[str, Any]], tasks: Sequence[Task], out_dir: Path
) -> str:
    """``results.md``: the setup in words, then one table row per budget x method x strategy
    with the mean ± std over seeds."""
    lines = [f"# mtlkit compare: {out_dir.name}", ""]
    names = ", ".join(t.name for t in tasks)
    lines.append(
        f"`{grid.base.arch}` on `{grid.base.data}` (tasks: {names}); seeds "
        f"{', '.join(map(str, grid.seeds))}. Test metrics of the model selected on the "
        f"validation split (select={grid.base.select}), mean ± std over seeds. Δm%: the mean "
        f"relative change of the tasks' metrics against {baseline_description(grid)}, signed "
        "so that lower is better (0: single-task level); 95% CI: Student t interval of the "
        "mean over seeds."
    )
    if grid.budgets:
        described = "; ".join(f"`{b.name}`: {b.describe()}" for b in grid.budgets)
        lines += [
            "",
            f"Budgets: {described} (forward_backward: forward passes plus backward passes "
            "through the shared layers).",
        ]
    lines += ["", *format_table(grid, rows, tasks)]
    failed = [r for r in rows if not math.isfinite(_float(r.get("delta_m")))]
    if failed:
        lines += ["", f"No Δm% for {len(failed)} run(s): their baseline is missing."]
    lines += [
        "",
        "time/epoch: training seconds (validation included) per epoch of batches; fwd+bwd: "
        "forward plus backward passes through the shared layers; peak memory: the run's peak "
        "RSS on the CPU (with `--jobs 0`, the running maximum of the one process), the CUDA "
        "allocator's peak on a GPU. One row per run: `results.csv`.",
        "",
    ]
    return "\n".join(lines)


def aggregate(
    grid: Grid, rows: Sequence[Mapping[str, Any]], tasks: Sequence[Task]
) -> list[dict[str, Any]]:
    """The rows grouped by budget, method and strategy (grid order), with the values over
    seeds of each numeric column."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["method"], row["strategy"]), []).append(row)
    numeric = [c for c in result_columns(tasks) if c not in ("run", "method", "strategy")]
    numeric.remove("budget")
    out = []
    for (budget, method, strategy), members in groups.items():
        values = {c: [_float(r.get(c)) for r in members] for c in numeric}
        out.append(
            {"budget": budget, "method": method, "strategy": strategy, "n": len(members)}
            | {"values": values}
        )
    return out


def format_table(grid: Grid, rows: Sequence[Mapping[str, Any]], tasks: Sequence[Task]) -> list[str]:
    """The Markdown table of :func:`results_markdown` (the best Δm% of each budget in bold)."""
    if not rows:
        return ["(no finished runs yet)"]
    groups = aggregate(grid, rows, tasks)
    arrows = {t.name: t.higher_is_better() for t in tasks}
    metric_cols = [(t.name, m) for t in tasks for m in t.metrics]
    header = ["budget"] if grid.budgets else []
    header += ["method", "strategy", "seeds"]
    header += [f"{t} {m} {'↑' if arrows[t][m] else '↓'}" for t, m in metric_cols]
    header += ["Δm% ↓", "Δm% 95% CI", "time/epoch (s)", "steps", "fwd+bwd", "peak mem (MB)"]
    best: dict[str, float] = {}
    for g in groups:
        mean = _mean(g["values"]["delta_m"])
        if math.isfinite(mean):
            best[g["budget"]] = min(best.get(g["budget"], math.inf), mean)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        v = g["values"]
        dm = _mean_std(v["delta_m"], "+.2f")
        if math.isfinite(_mean(v["delta_m"])) and _mean(v["delta_m"]) == best.get(g["budget"]):
            dm = f"**{dm}**"
        cells = [g["budget"]] if grid.budgets else []
        cells += [g["method"], g["strategy"], str(g["n"])]
        cells += [_mean_std(v[f"{t}/{m}"], ".4f") for t, m in metric_cols]
        cells += [dm, _confidence(v["delta_m"])]
        cells += [
            _mean_std(v["seconds_per_epoch"], ".2f", std=False),
            _mean_std(v["steps"], ".0f", std=False),
            _mean_std(v["forward_backward"], ".0f", std=False),
            _mean_std(v["peak_memory_mb"], ".0f", std=False),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _mean(values: Sequence[float]) -> float:
    kept = _finite(values)
    return statistics.fmean(kept) if kept else math.nan


def _mean_std(values: Sequence[float], spec: str, std: bool = True) -> str:
    kept = _finite(values)
    if not kept:
        return "n/a"
    text = format(statistics.fmean(kept), spec)
    if std and len(kept) > 1:
        text += f" ± {format(statistics.stdev(kept), spec.lstrip('+'))}"
    return text


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The Student t confidence interval of the mean of ``values`` (NaN for fewer than 2)."""
    kept = _finite(values)
    if len(kept) < 2:
        return math.nan, math.nan
    from scipy.stats import t as student

    mean = statistics.fmean(kept)
    half = float(student.ppf(0.5 + level / 2, len(kept) - 1)) * statistics.stdev(kept)
    half /= math.sqrt(len(kept))
    return mean - half, mean + half


def _confidence(values: Sequence[float]) -> str:
    low, high = confidence_interval(values)
    return "n/a" if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"


# ----------------------------------------------------------------------------------- cli
def compare_command(args: argparse.Namespace) -> int:
    """``mtlkit compare``: load and check the grid config, run what is not finished, write and
    print the table."""
    overrides = list(args.overrides)
    if args.flag_out is not None:
        overrides.append(f"out={args.flag_out}")
    if args.no_progress:
        overrides.append("progress=false")
    if args.tensorboard:
        overrides.append("tensorboard=true")
    grid = load_grid(args.config, overrides)
    if args.print_config:
        print(grid.to_yaml(), end="")
        return 0
    start = time.perf_counter()
    try:
        report = run_grid(grid, jobs=args.jobs, echo=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("mtlkit: compare interrupted; run the same command to go on", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("\n".join(format_table(grid, report.rows, report.tasks)))
    elapsed = time.perf_counter() - start
    print(
        f"{len(report.executed)} job(s) run, {len(report.skipped)} skipped (finished before), "
        f"{elapsed:.1f} s; written to {report.out_dir}: "
        + ", ".join(p.name for p in report.written)
    )
    if report.interrupted:
        print(
            "mtlkit: compare interrupted (runs with a checkpoint resume); run the same command "
            "to go on",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if report.failed:
        names = ", ".join(o.name for o in report.failed)
        print(f"mtlkit: {len(report.failed)} run(s) failed: {names}", file=sys.stderr)
        return EXIT_FAILED_RUNS
    return 0
