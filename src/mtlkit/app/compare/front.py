"""The fronts of a compare grid: hypervolume, spread and the non-dominated runs, in
``results.csv``/``results.md``, and the front plot ``front.png``.

A front is the set of runs of one method entry's preference sweep (or of the entries that name
the same ``front``, :mod:`mtlkit.app.compare.sweep`) with one strategy, budget and seed. Its
points are the runs' test losses, one objective per task, all minimised. The hypervolume
(:func:`mtlkit.app.pareto.hypervolume`, exact for 2-3 tasks) is taken up to one reference
point for the whole grid, so that the fronts compare: the worst test loss of each task over
every finished run of the grid plus 10% of its range (written in ``results.md``; it moves when
runs are added, so compare hypervolumes within one report).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtlkit.app.compare.grid import Grid
from mtlkit.app.pareto import hypervolume, non_dominated, reference_point, spread
from mtlkit.errors import MtlkitError
from mtlkit.tasks import Task

FRONT_COLUMNS = ["front", "preference", "front_hypervolume", "front_spread", "non_dominated"]
"""The columns ``results.csv`` gains when the grid has fronts."""


def has_fronts(grid: Grid, rows: Sequence[Mapping[str, Any]] = ()) -> bool:
    """Whether any method entry of ``grid`` belongs to a front, or any finished run is one
    preference-conditioned model with a front of its own (``front_points``: COSMOS)."""
    return any(m.front is not None for m in grid.methods) or any(
        r.get("front_points") for r in rows
    )


def objectives(tasks: Sequence[Task]) -> list[str]:
    """The columns that are a front's objectives: each task's test loss."""
    return [f"{t.name}/loss" for t in tasks]


@dataclass
class FrontReport:
    """The fronts of a grid's finished runs."""

    objectives: list[str]
    reference: np.ndarray | None
    rows: list[dict[str, Any]]
    groups: list[dict[str, Any]] = field(default_factory=list)
    pooled: dict[str, list[str]] = field(default_factory=dict)  # budget -> non-dominated runs


def front_report(
    grid: Grid, rows: Sequence[Mapping[str, Any]], tasks: Sequence[Task]
) -> FrontReport:
    """The rows with the front columns filled, the groups (one per front, strategy, budget and
    seed) with their hypervolume and spread, and per budget the runs that no other run of the
    grid dominates."""
    columns = objectives(tasks)
    entries = {m.label: m for m in grid.methods}
    out = [dict(row) for row in rows]
    points = {}
    for row in out:
        entry = entries[row["method"]]
        row["front"] = entry.front or entry.label
        value = entry.args.get("preference", entry.args.get("weights")) if entry.front else None
        row["preference"] = "" if value is None else " ".join(f"{float(v):g}" for v in value)
        vectors = row.pop("front_points", None) or [[_float(row.get(c)) for c in columns]]
        finite = [v for v in vectors if all(math.isfinite(x) for x in v)]
        if finite:
            points[row["run"]] = finite  # one point, or the test rays of a conditioned model
    every = [v for vectors in points.values() for v in vectors]
    reference = reference_point(np.array(every)) if every else None
    report = FrontReport(columns, reference, out)
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for row in out:
        groups.setdefault((row["budget"], row["front"], row["strategy"], row["seed"]), []).append(
            row
        )
    for (budget, front, strategy, seed), members in groups.items():
        kept = [r for r in members if r["run"] in points]
        owners = [r for r in kept for _ in points[r["run"]]]
        array = np.array([v for r in kept for v in points[r["run"]]]).reshape(-1, len(columns))
        mask = non_dominated(array) if len(array) else np.zeros(0, dtype=bool)
        volume = hypervolume(array, reference) if len(array) and reference is not None else math.nan
        spreading = spread(array) if len(array) else math.nan
        for row in members:
            row["front_hypervolume"], row["front_spread"] = volume, spreading
            row["non_dominated"] = ""
        for row in kept:  # a conditioned model's run: whether any of its points is, in its front
            flags = [bool(f) for o, f in zip(owners, mask, strict=True) if o is row]
            row["non_dominated"] = "yes" if any(flags) else "no"
        report.groups.append(
            {"budget": budget, "front": front, "strategy": strategy, "seed": seed,
             "runs": len(members), "non_dominated": sum(r["non_dominated"] == "yes" for r in kept),
             "hypervolume": volume,
             "spread": spreading, "points": array, "mask": mask}
        )  # fmt: skip
    for budget in dict.fromkeys(r["budget"] for r in out):
        kept = [r for r in out if r["budget"] == budget and r["run"] in points]
        if kept:
            owners = [r["run"] for r in kept for _ in points[r["run"]]]
            mask = non_dominated(np.array([v for r in kept for v in points[r["run"]]]))
            report.pooled[budget] = list(
                dict.fromkeys(o for o, flag in zip(owners, mask, strict=True) if flag)
            )
    return report


def front_markdown(grid: Grid, report: FrontReport) -> list[str]:
    """The ``## Pareto fronts`` section of ``results.md``."""
    lines = ["", "## Pareto fronts", ""]
    if report.reference is None:
        return [*lines, "(no finished run with every test loss yet)"]
    names = ", ".join(f"`{c}`" for c in report.objectives)
    reference = ", ".join(f"{v:.4g}" for v in report.reference)
    lines += [
        f"Objectives (minimised): {names}. Hypervolume up to the reference point ({reference}): "
        "the worst value of each objective over the grid's finished runs plus 10% of its range "
        "(exact, mtlkit.app.pareto). Spread: the generalised Δ (0: evenly spaced). Mean ± std "
        "over seeds; the non-dominated count is of the front's runs of one seed (summed over "
        "seeds).",
        "",
    ]
    header = (["budget"] if grid.budgets else []) + ["front", "strategy", "seeds", "runs"]
    header += ["non-dominated", "hypervolume ↑", "spread ↓"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    merged: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for group in report.groups:
        merged.setdefault((group["budget"], group["front"], group["strategy"]), []).append(group)
    for (budget, front, strategy), members in merged.items():
        cells = [budget] if grid.budgets else []
        cells += [front, strategy, str(len(members)), str(sum(g["runs"] for g in members))]
        cells += [str(sum(g["non_dominated"] for g in members))]
        cells += [_mean_std([g["hypervolume"] for g in members], ".4g")]
        cells += [_mean_std([g["spread"] for g in members], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    for budget, runs in report.pooled.items():
        where = f" (budget `{budget}`)" if grid.budgets else ""
        lines += ["", f"Runs no other run of the grid dominates{where}: " + ", ".join(runs) + "."]
    return lines


def plot_fronts(report: FrontReport, path: Path) -> Path:
    """``front.png``: the fronts' points (one colour per front, pooled over seeds and
    strategies), each front's non-dominated points joined; two objectives in one panel, more
    in one panel per pair. One row of panels per budget.

    Raises:
        MtlkitError: without matplotlib (the ``plot`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MtlkitError("plotting fronts needs matplotlib: pip install 'mtlkit[plot]'") from error
    pairs = list(itertools.combinations(range(len(report.objectives)), 2))
    budgets = list(dict.fromkeys(g["budget"] for g in report.groups))
    figure = Figure(figsize=(4.2 * len(pairs), 3.8 * len(budgets)))
    FigureCanvasAgg(figure)
    fronts = list(dict.fromkeys(g["front"] for g in report.groups))
    colours = {f: f"C{k % 10}" for k, f in enumerate(fronts)}
    for row, budget in enumerate(budgets):
        for column, (i, j) in enumerate(pairs):
            ax = figure.add_subplot(len(budgets), len(pairs), row * len(pairs) + column + 1)
            for front in fronts:
                chosen = [g for g in report.groups if g["budget"] == budget and g["front"] == front]
                array = (
                    np.concatenate([g["points"] for g in chosen]) if chosen else np.zeros((0, 2))
                )
                if len(array) == 0:
                    continue
                ax.scatter(array[:, i], array[:, j], s=14, color=colours[front], label=front)
                pair = array[:, [i, j]]
                best = pair[non_dominated(pair)]
                best = best[np.argsort(best[:, 0])]
                if len(best) > 1:
                    ax.step(best[:, 0], best[:, 1], where="post", color=colours[front], lw=1)
            ax.set_xlabel(report.objectives[i], fontsize=8)
            ax.set_ylabel(report.objectives[j], fontsize=8)
            ax.tick_params(labelsize=7)
            if budget:
                ax.set_title(budget, fontsize=9)
            if row == 0 and column == 0:
                ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _mean_std(values: Sequence[float], spec: str) -> str:
    kept = [v for v in values if math.isfinite(v)]
    if not kept:
        return "n/a"
    text = format(statistics.fmean(kept), spec)
    return text + (f" ± {format(statistics.stdev(kept), spec)}" if len(kept) > 1 else "")
