"""Published tables beside the results of ``mtlkit compare``.

A config's ``references`` key names YAML files, each one table of one paper, transcribed with
where it was read::

    source: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022
    url: https://arxiv.org/abs/2202.01017
    table: Table 6
    page: 17                      # the page of the PDF the numbers were read on
    protocol: 3 seeds, the epoch with the best validation Δm% ...
    read_from: the arXiv v2 PDF, converted to text (where the numbers were read)
    delta: delta_m                # the published Δ column: delta_m (Δm%) or delta_p (Δp); optional
    metrics:                      # published column -> the config's task metric
      mu: {metric: mu/mae, direction: lower}
      mIoU: {metric: segmentation/miou, direction: higher, scale: 0.01}   # mtlkit = paper x scale
    rows:                         # one per published method; method: a registered name or stl
      - {name: STL, method: stl, values: {mu: 0.067}}
      - {name: LS, method: ew, values: {mu: 0.106}, delta: 177.6, note: "LS = sum of losses"}

Every key is checked (:func:`load_reference`): an unknown key, a metric the config's tasks do not
have, a direction that contradicts the metric's, an unknown method or a value for a column not
in ``metrics`` is one :class:`~mtlkit.errors.ConfigError` naming it and the valid choices. A
number that could not be checked in the paper is left out of ``values``: a row need not have
every column.

:func:`comparisons` pairs each published row with the grid's groups (budget x method x strategy,
mean over seeds) of the same registered method, and the ``stl`` row with the single-task
baselines. It gives, per column, the published value, ours in the paper's units (mtlkit's value
divided by ``scale``) and ``ours - published``; the published Δ beside our Δm% (or Δp) against
our own baselines; and, where the table has a single-task row with every column, our Δm% against
the *published* single-task numbers (Nash-MTL's convention, over the table's columns).
:func:`write_references` writes them to ``references.csv``; :func:`reference_markdown` is the
section of ``results.md`` and what the command prints.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlkit.app.compare.grid import Grid
from mtlkit.app.config import read_config_file
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods import METHODS
from mtlkit.metrics import delta_m
from mtlkit.registry import normalize_name
from mtlkit.tasks import Task
from mtlkit.training.logs import atomic_file

TABLE_KEYS = ("source", "url", "table", "page", "protocol", "read_from", "delta", "metrics", "rows")
REQUIRED_KEYS = ("source", "table", "page", "protocol", "read_from", "metrics", "rows")
METRIC_KEYS = ("metric", "direction", "scale")
ROW_KEYS = ("name", "method", "values", "delta", "note")
DIRECTIONS = {"higher": True, "lower": False}
DELTAS = {"delta_m": ("Δm%", False), "delta_p": ("Δp", True)}  # label, higher is better
STL = "stl"
CSV_COLUMNS = (
    "reference",
    "source",
    "table",
    "page",
    "published_row",
    "method",
    "budget",
    "strategy",
    "seeds",
    "column",
    "mtlkit_column",
    "direction",
    "published",
    "ours",
    "difference",
)
VS_STL = "Δm% vs published STL"


@dataclass(frozen=True)
class Column:
    """A published column and the task metric it is: mtlkit's value = published x ``scale``."""

    name: str
    task: str
    metric: str
    higher_is_better: bool
    scale: float
    decimals: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"


@dataclass(frozen=True)
class Row:
    """A published row: the method's name in the paper, mtlkit's method (or ``stl``)."""

    name: str
    method: str
    values: dict[str, float]
    delta: float | None
    note: str


@dataclass(frozen=True)
class ReferenceTable:
    """One published table (see the module docstring)."""

    path: Path
    source: str
    url: str
    table: str
    page: str
    protocol: str
    read_from: str
    delta: str | None
    columns: list[Column]
    rows: list[Row]

    @property
    def name(self) -> str:
        return self.path.stem

    def citation(self) -> str:
        return f"{self.source}, {self.table}, p. {self.page}"

    def stl_row(self) -> Row | None:
        """The single-task row when it has every column (for Δm% against it), else None."""
        for row in self.rows:
            if row.method == STL and all(c.name in row.values for c in self.columns):
                return row
        return None


def load_references(paths: Sequence[str] | None, tasks: Sequence[Task]) -> list[ReferenceTable]:
    """Every table of ``paths`` (none for None), checked against ``tasks``."""
    return [load_reference(p, tasks) for p in paths or ()]


def load_reference(path: str | Path, tasks: Sequence[Task]) -> ReferenceTable:
    """One reference table from its YAML file, checked against the config's ``tasks``.

    Raises:
        ConfigError: naming the file, the bad key or value and the valid choices.
    """
    path = Path(path)
    where = f"reference table {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    data = read_config_file(path)
    _keys(data, TABLE_KEYS, where, REQUIRED_KEYS)
    text = {k: _text(data.get(k, ""), f"{where}: {k}") for k in TABLE_KEYS[:6]}
    delta = data.get("delta")
    if delta is not None and delta not in DELTAS:
        raise ConfigError(
            f"{where}: delta {delta!r} is not one of {', '.join(DELTAS)} (or omit it)"
        )
    metrics = data["metrics"]
    if not isinstance(metrics, Mapping) or not metrics:
        raise ConfigError(f"{where}: metrics must map published column names to task metrics")
    raw_rows = data["rows"]
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ConfigError(f"{where}: rows must be a non-empty list of published rows")
    rows = [_row(item, i, set(map(str, metrics)), delta, where) for i, item in enumerate(raw_rows)]
    names = [r.name for r in rows]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: row name(s) {', '.join(repeated)} appear more than once")
    columns = [_column(str(name), spec, tasks, rows, where) for name, spec in metrics.items()]
    keys = [c.key for c in columns]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"{where}: task metric(s) {', '.join(twice)} are mapped twice")
    return ReferenceTable(path, **text, delta=delta, columns=columns, rows=rows)


def _keys(data: Any, valid: Sequence[str], where: str, required: Sequence[str] = ()) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(valid)}, got {data!r}")
    unknown = sorted(set(map(str, data)) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")


def _text(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{where} must be text, got {value!r}")
    return str(value).strip()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _decimals(value: float) -> int:
    text = repr(float(value))
    if "e" in text:
        return 4
    return len(text.split(".")[1].rstrip("0")) if "." in text else 0


def _row(item: Any, index: int, columns: set[str], delta: str | None, where: str) -> Row:
    here = f"{where}: rows[{index}]"
    _keys(item, ROW_KEYS, here, ("name", "method"))
    name = _text(item["name"], f"{here}.name")
    method = normalize_name(_text(item["method"], f"{here}.method"))
    valid = METHODS.available()
    if method != STL and method not in valid:
        raise ConfigError(
            f"{here}: method {item['method']!r} is not a registered method; valid: {STL} (the "
            f"single-task baselines), {', '.join(valid)}"
        )
    values = item.get("values", {}) or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{here}.values must map column names to numbers, got {values!r}")
    extra = sorted(set(map(str, values)) - columns)
    if extra:
        raise ConfigError(
            f"{here}: value(s) for {', '.join(extra)}, not in metrics; "
            f"valid: {', '.join(sorted(columns))}"
        )
    numbers = {str(k): _number(v, f"{here}.values.{k}") for k, v in values.items()}
    published = item.get("delta")
    if published is not None:
        if delta is None:
            raise ConfigError(
                f"{here}: a delta value needs the table's delta key ({', '.join(DELTAS)})"
            )
        published = _number(published, f"{here}.delta")
    if method == STL and published is not None:
        raise ConfigError(f"{here}: the single-task row has no delta")
    return Row(name, method, numbers, published, _text(item.get("note", ""), f"{here}.note"))


def _column(name: str, spec: Any, tasks: Sequence[Task], rows: Sequence[Row], where: str) -> Column:
    here = f"{where}: metrics.{name}"
    _keys(spec, METRIC_KEYS, here, ("metric", "direction"))
    key = _text(spec["metric"], f"{here}.metric")
    valid = [f"{t.name}/{m}" for t in tasks for m in t.metrics]
    if key not in valid:
        raise ConfigError(
            f"{here}: {key!r} is not a task metric of this config; valid: {', '.join(valid)}"
        )
    task, metric = key.split("/", 1)
    direction = spec["direction"]
    if direction not in DIRECTIONS:
        raise ConfigError(f"{here}.direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    higher = next(t for t in tasks if t.name == task).higher_is_better()[metric]
    if DIRECTIONS[direction] != higher:
        actual = "higher" if higher else "lower"
        raise ConfigError(
            f"{here}: the table says {direction} is better, but for {key} {actual} is better: "
            "is the column mapped to the right metric?"
        )
    scale = _number(spec.get("scale", 1.0), f"{here}.scale")
    if scale <= 0:
        raise ConfigError(
            f"{here}.scale must be > 0 (mtlkit's value = published x scale), got {scale}"
        )
    values = [r.values[name] for r in rows if name in r.values]
    decimals = max((_decimals(v) for v in values), default=2)
    return Column(name, task, metric, higher, scale, decimals)


def _mean(values: Sequence[float]) -> float:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(kept) if kept else math.nan


def _ours_groups(
    grid: Grid, groups: Sequence[Mapping[str, Any]], method: str
) -> list[Mapping[str, Any]]:
    names = {m.label: m.name for m in grid.methods}
    return [g for g in groups if names.get(g["method"]) == method]


def _stl_group(
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]], table: ReferenceTable
) -> dict[str, Any] | None:
    """Our single-task baselines as a group: the mean over the distinct baselines of the seeds."""
    distinct: list[Mapping[str, Mapping[str, float]]] = []
    for baseline in baselines.values():
        if baseline not in distinct:
            distinct.append(baseline)
    if not distinct:
        return None
    values = {
        c.key: [float(b.get(c.task, {}).get(c.metric, math.nan)) for b in distinct]
        for c in table.columns
    }
    return {"budget": "", "method": STL, "strategy": "", "n": len(distinct), "values": values}


def comparisons(
    table: ReferenceTable,
    grid: Grid,
    groups: Sequence[Mapping[str, Any]],
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
) -> list[dict[str, Any]]:
    """One entry per published row and matching group of ours (``ours`` None where the grid has
    no run of that method): the row, the group, and per column ``(published, ours, difference)``
    in the paper's units, NaN where either is missing. ``groups``: :func:`~mtlkit.app.compare.
    report.aggregate` of the grid's rows."""
    stl = table.stl_row()
    out = []
    for row in table.rows:
        if row.method == STL:
            found = _stl_group(baselines, table)
            matches = [found] if found is not None else []
        else:
            matches = list(_ours_groups(grid, groups, row.method))
        for group in matches or [None]:
            cells: dict[str, tuple[float, float, float]] = {}
            for c in table.columns:
                published = row.values.get(c.name, math.nan)
                ours = _mean(group["values"][c.key]) / c.scale if group is not None else math.nan
                cells[c.name] = (published, ours, ours - published)
            entry: dict[str, Any] = {"row": row, "group": group, "cells": cells}
            if table.delta is not None and row.method != STL:
                published = row.delta if row.delta is not None else math.nan
                ours = _mean(group["values"][table.delta]) if group is not None else math.nan
                entry["delta"] = (published, ours, ours - published)
            if stl is not None and group is not None and row.method != STL:
                entry["vs_stl"] = _delta_vs(table, stl, cells)
            out.append(entry)
    return out


def _delta_vs(
    table: ReferenceTable, stl: Row, cells: Mapping[str, tuple[float, float, float]]
) -> float:
    ours = {c.name: cells[c.name][1] for c in table.columns}
    if not all(math.isfinite(v) for v in ours.values()):
        return math.nan
    try:
        return delta_m(
            {"table": ours},
            {"table": {c.name: stl.values[c.name] for c in table.columns}},
            {"table": {c.name: c.higher_is_better for c in table.columns}},
        )
    except MtlkitError:
        return math.nan


def _describe(group: Mapping[str, Any] | None) -> str:
    if group is None:
        return "—"
    if group["method"] == STL:
        return "our stl"
    parts = [group["method"], group["strategy"]] + ([group["budget"]] if group["budget"] else [])
    return " ".join(parts)


def _fmt(value: float, decimals: int, sign: bool = False) -> str:
    if not math.isfinite(value):
        return ""
    return format(value, f"{'+' if sign else ''}.{decimals}f")


def _cell(values: tuple[float, float, float], decimals: int) -> str:
    published, ours, diff = values
    if not math.isfinite(ours):
        return _fmt(published, decimals) or "—"
    shown = _fmt(published, decimals) or "—"
    text = f"{shown} / {_fmt(ours, decimals)}"
    return f"{text} ({_fmt(diff, decimals, sign=True)})" if math.isfinite(diff) else text


def reference_markdown(
    tables: Sequence[ReferenceTable],
    grid: Grid,
    groups: Sequence[Mapping[str, Any]],
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
) -> list[str]:
    """The ``results.md`` section: per table, its citation and protocol, then one line per
    published row and matching group: ``published / ours (ours - published)`` per column."""
    lines: list[str] = []
    for table in tables:
        lines += ["", f"## Published: {table.citation()}", ""]
        lines.append(
            f"`{table.path.name}`. Protocol: {table.protocol} Read from: {table.read_from}"
            + (f" ({table.url})" if table.url else "")
        )
        lines += [
            "",
            "Cells: published / ours (ours − published), in the paper's units; ours: the mean over "
            "seeds of the runs of that method (Δ: against our single-task baselines).",
            "",
        ]
        header = ["published", "ours", "seeds"]
        header += [f"{c.name} {'↑' if c.higher_is_better else '↓'}" for c in table.columns]
        if table.delta is not None:
            label, higher = DELTAS[table.delta]
            header.append(f"{label} {'↑' if higher else '↓'}")
        if table.stl_row() is not None:
            header.append(f"{VS_STL} ↓")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for entry in comparisons(table, grid, groups, baselines):
            row, group = entry["row"], entry["group"]
            name = row.name + (f" ({row.note})" if row.note else "")
            cells = [name, _describe(group), str(group["n"]) if group is not None else ""]
            cells += [_cell(entry["cells"][c.name], c.decimals) for c in table.columns]
            if table.delta is not None:
                cells.append(_cell(entry["delta"], 2) if "delta" in entry else "")
            if table.stl_row() is not None:
                cells.append(_fmt(entry.get("vs_stl", math.nan), 2, sign=True))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_references(
    tables: Sequence[ReferenceTable],
    grid: Grid,
    groups: Sequence[Mapping[str, Any]],
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
    out_dir: Path,
) -> Path:
    """``OUT/references.csv``: one line per table, published row, group of ours and column."""
    path = out_dir / "references.csv"
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for table in tables:
            for entry in comparisons(table, grid, groups, baselines):
                row, group = entry["row"], entry["group"]
                head = {
                    "reference": table.name,
                    "source": table.source,
                    "table": table.table,
                    "page": table.page,
                    "published_row": row.name,
                    "method": row.method,
                    "budget": group["budget"] if group else "",
                    "strategy": group["strategy"] if group else "",
                    "seeds": group["n"] if group else "",
                }
                for c in table.columns:
                    direction = "higher" if c.higher_is_better else "lower"
                    writer.writerow(
                        head | _values(c.name, c.key, direction, entry["cells"][c.name])
                    )
                if "delta" in entry:
                    label, higher = DELTAS[str(table.delta)]
                    direction = "higher" if higher else "lower"
                    writer.writerow(
                        head | _values(label, str(table.delta), direction, entry["delta"])
                    )
                if "vs_stl" in entry:
                    value = (math.nan, entry["vs_stl"], math.nan)
                    writer.writerow(head | _values(VS_STL, "", "lower", value))
    return path


def _values(
    column: str, key: str, direction: str, values: tuple[float, float, float]
) -> dict[str, Any]:
    published, ours, diff = (v if math.isfinite(v) else "" for v in values)
    return {
        "column": column,
        "mtlkit_column": key,
        "direction": direction,
        "published": published,
        "ours": ours,
        "difference": diff,
    }
