"""The grid of ``mtlkit compare``: its config keys, validated into a :class:`Grid` of runs.

A compare config is a train config (:class:`~mtlkit.app.config.TrainConfig`) plus the keys of
:data:`GRID_KEYS` (see :mod:`mtlkit.app.compare`). :func:`load_grid` checks every name,
argument, label and budget before any run starts; :meth:`Grid.runs` names each run and builds
its train config.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtlkit.app.compare.cluster import LAUNCHERS, check_submitit_options
from mtlkit.app.compare.search_spec import SearchSpec
from mtlkit.app.compare.sweep import check_sweep, expand_sweeps, repeated_labels
from mtlkit.app.config import (
    BUDGET_KEYS,
    TrainConfig,
    apply_overrides,
    config_keys,
    parse_value,
    read_config_file,
)
from mtlkit.app.runner import load_problem
from mtlkit.app.validation import check_plots
from mtlkit.errors import ConfigError
from mtlkit.methods import EW, METHODS
from mtlkit.registry import Registry, normalize_name
from mtlkit.training.strategies import STRATEGIES

GRID_KEYS = ("methods", "strategies", "seeds", "budgets", "stl", "launcher", "submitit", "search")
"""The keys a compare config adds to a train config (``launcher``, ``submitit``: where the runs
are trained, :mod:`mtlkit.app.compare.cluster`; ``search``: the settings of ``--search``,
:mod:`mtlkit.app.compare.search`)."""
STL_MODES = ("per_seed", "once")
ENTRY_KEYS = ("name", "args", "label", "preferences", "front")
BUDGET_ABBREVIATIONS = {"forward_backward": "fb"}
LABEL = re.compile(r"^[A-Za-z0-9_.]+$")
BUDGET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Entry:
    """A method or strategy of the grid: registered name, constructor arguments, label; for a
    method, the front it belongs to and, before expansion, its preference sweep
    (:mod:`mtlkit.app.compare.sweep`)."""

    name: str
    args: dict[str, Any]
    label: str
    front: str | None = None
    sweep: tuple[Any, ...] | int | None = None

    def to_config(self) -> dict[str, Any] | str:
        if not self.args and self.label == self.name and self.front is None:
            return self.name
        config = {"name": self.name, "args": dict(self.args), "label": self.label}
        return config if self.front is None else {**config, "front": self.front}


@dataclass(frozen=True)
class BudgetSpec:
    """One training budget of the grid: its name and its limits (the others are unset)."""

    name: str
    limits: dict[str, float | int]

    def config_values(self) -> dict[str, float | int | None]:
        return {key: self.limits.get(key) for key in BUDGET_KEYS}

    def describe(self) -> str:
        return ", ".join(f"{key}={format_number(v)}" for key, v in self.limits.items())


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
    launcher: str = "local"  # local (worker processes) or submitit (SLURM jobs)
    submitit: dict[str, Any] = dataclasses.field(default_factory=dict)  # its options
    search: dict[str, Any] | None = None  # --search's settings (mtlkit.app.compare.search)

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
        if self.launcher != "local" or self.submitit:
            data["launcher"], data["submitit"] = self.launcher, dict(self.submitit)
        if self.search is not None:
            data["search"] = dict(self.search)
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
    if isinstance(data.get("references"), list) and path is not None:  # relative to the file
        data["references"] = [
            str(Path(path).parent / r) if isinstance(r, str) and not Path(r).is_absolute() else r
            for r in data["references"]
        ]
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
    check_plots(base)  # plots: true without matplotlib, before any run
    methods = _entries(
        grid.get("methods", [{"name": base.method, "args": base.method_args}]), METHODS, "methods"
    )
    methods = expand_sweeps(methods, lambda: len(base.tasks or load_problem(base, None).tasks))
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
    launcher = grid.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")
    options = check_submitit_options(grid.get("submitit") or {})
    search = grid.get("search")
    if search is not None:
        SearchSpec.parse(search)  # checked before any run
        search = dict(search)
    result = Grid(base, methods, strategies, seeds, budgets, stl, source, launcher, options, search)
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
        front, sweep = item.get("front"), item.get("preferences")
        if registry is not METHODS and (front is not None or sweep is not None):
            raise ConfigError(f"{key}: preferences and front belong to method entries")
        if front is not None and (not isinstance(front, str) or not LABEL.match(front)):
            raise ConfigError(f"{key}: front {front!r} of {name!r} must be a name like a label")
        sweep = None if sweep is None else check_sweep(name, args, sweep)
        entries.append(Entry(name, args, label, front, sweep))
    repeated = repeated_labels([e.label for e in entries])
    if repeated:
        raise ConfigError(
            f"{key}: label(s) {repeated} used twice; give each entry its own label: "
            "{name: ..., args: {...}, label: ...}"
        )
    return entries


def _default_label(name: str, args: Mapping[str, Any]) -> str:
    parts = [name] + [
        f"{k}{format_number(v) if isinstance(v, float) else v}" for k, v in args.items()
    ]
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
            f"{BUDGET_ABBREVIATIONS.get(k, k)}{format_number(v)}" for k, v in limits.items()
        )
        if not isinstance(name, str) or not BUDGET_NAME.match(name):
            raise ConfigError(
                f"budget name {name!r} may hold only letters, digits, '_', '.' and '-'"
            )
        budgets.append(BudgetSpec(name, limits))
    repeated = repeated_labels([b.name for b in budgets])
    if repeated:
        raise ConfigError(f"budget name(s) {repeated} used twice")
    return budgets


def format_number(value: float | int) -> str:
    """``4`` for an int, ``0.001`` for a float (``%g``): for labels and budget names."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def stl_dir(out_dir: Path, seed: int) -> Path:
    """The folder of the single-task baselines of ``seed`` in the grid folder ``out_dir``."""
    return out_dir / "stl" / f"seed{seed}"
