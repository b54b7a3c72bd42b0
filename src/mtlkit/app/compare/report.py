"""The results of a compare grid: one row per finished run (metrics, Δm%, cost), written to
``results.csv``, ``compare.json`` and ``results.md`` (mean ± std over seeds, 95% CI of Δm%)."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtlkit.app.compare.folders import is_finished, read_json
from mtlkit.app.compare.front import (
    FRONT_COLUMNS,
    front_markdown,
    front_report,
    has_fronts,
    plot_fronts,
)
from mtlkit.app.compare.grid import Grid, RunSpec, format_number, stl_dir
from mtlkit.app.conditioned_front import FRONT_NAME, front_points
from mtlkit.app.config import BUDGET_KEYS, TrainConfig
from mtlkit.app.runner import STL_BASELINE, load_baseline, make_loaders
from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import MtlkitError
from mtlkit.tasks import Task, baseline_deltas
from mtlkit.training.logs import atomic_file, write_atomic, write_json_atomic


def batches_per_epoch(problem: Any, config: TrainConfig) -> int:
    """Training batches in one epoch (for the time per epoch of runs that stop mid-epoch)."""
    train = make_loaders(problem, config)["train"]
    return len(MultiInputLoader(train)) if isinstance(train, Mapping) else len(train)


def result_columns(tasks: Sequence[Task]) -> list[str]:
    """The columns of ``results.csv``."""
    metrics = [f"{t.name}/{m}" for t in tasks for m in t.metrics]
    losses = [f"{t.name}/loss" for t in tasks]
    cost = ["epochs", "steps", "batches", "passes", "backwards", "forward_backward"]
    cost += ["seconds", "seconds_per_epoch", "peak_memory_mb", "best_epoch"]
    head = ["run", "method", "strategy", "seed", "budget"]
    return [*head, *metrics, *losses, "delta_m", "delta_p", *cost]


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
    """``(Δm%, Δp)`` of one run's test metrics against ``baseline`` (NaN without one):
    Nash-MTL's and FAMO's Δm% (lower is better) and LibMTL's Δp (higher is better); see
    :func:`mtlkit.tasks.baseline_deltas`."""
    if baseline is None:
        return math.nan, math.nan
    return baseline_deltas(test, tasks, baseline)


def delta_m_note(run_dir: Path, tasks: Sequence[Task], baseline: Path) -> str:
    """``", Δm +1.23%"`` for a progress line, when the run's baseline exists already."""
    if not baseline.is_file():
        return ""
    summary = read_json(run_dir / "summary.json") or {}
    try:
        flat, _ = run_delta_m(summary["results"]["test"], tasks, load_baseline(baseline))
    except (KeyError, TypeError, MtlkitError):
        return ""
    return f", Δm {flat:+.2f}%"


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
        summary = read_json(folder / "summary.json") or {}
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
        row["delta_m"], row["delta_p"] = run_delta_m(test, tasks, baselines.get(spec.seed))
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
        if (folder / FRONT_NAME).is_file():  # one conditioned model's front (COSMOS)
            row["front_points"] = front_points(folder / FRONT_NAME, tasks)
        rows.append(row)
    return rows


def write_results(
    grid: Grid,
    rows: Sequence[Mapping[str, Any]],
    tasks: Sequence[Task],
    out_dir: Path,
    baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
    echo: Callable[[str], None] = print,
    appendix: Sequence[str] = (),
) -> list[Path]:
    """Write ``results.csv``, ``compare.json``, ``results.md`` (atomically; ``appendix``: lines
    added at its end, e.g. the published tables) and, when ``plots``, the figures; return the
    paths written."""
    columns = result_columns(tasks)
    fronts = front_report(grid, rows, tasks) if has_fronts(grid, rows) else None
    if fronts is not None:  # preference sweeps: hypervolume per front (app/compare/front.py)
        rows, columns = fronts.rows, [*columns, *FRONT_COLUMNS]
        appendix = [*front_markdown(grid, fronts), *appendix]
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
    write_atomic(out_dir / "results.md", results_markdown(grid, rows, tasks, out_dir, appendix))
    written = [out_dir / "results.csv", out_dir / "results.md", out_dir / "compare.json"]
    if grid.base.plots is not False and rows:  # null: where matplotlib is (a note if not)
        from mtlkit.app.plots import plot_compare

        try:
            written += plot_compare(out_dir)
            if fronts is not None:
                written.append(plot_fronts(fronts, out_dir / "front.png"))
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
        f"{k}={format_number(getattr(grid.base, k))}"
        for k in BUDGET_KEYS
        if getattr(grid.base, k) is not None
    )
    which = "one per seed" if grid.stl == "per_seed" else f"seed {grid.seeds[0]}, for all seeds"
    return f"single-task baselines ({which}, trained with {budget})"


def results_markdown(
    grid: Grid,
    rows: Sequence[Mapping[str, Any]],
    tasks: Sequence[Task],
    out_dir: Path,
    appendix: Sequence[str] = (),
) -> str:
    """``results.md``: the setup in words, then one table row per budget x method x strategy
    with the mean ± std over seeds, then the ``appendix`` lines."""
    lines = [f"# mtlkit compare: {out_dir.name}", ""]
    names = ", ".join(t.name for t in tasks)
    lines.append(
        f"`{grid.base.arch}` on `{grid.base.data}` (tasks: {names}); seeds "
        f"{', '.join(map(str, grid.seeds))}. Test metrics of the model selected on the "
        f"validation split (select={grid.base.select}), mean ± std over seeds. Δm% (Nash-MTL, "
        f"FAMO): the mean relative change of all the tasks' metrics against "
        f"{baseline_description(grid)}, signed so that lower is better (0: single-task "
        "level); LibMTL's Δp (the mean over tasks, higher is better) is in results.csv; 95% "
        "CI: Student t interval of the mean over seeds."
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
        *appendix,
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
        dm = _mean_std_cell(v["delta_m"], "+.2f")
        if math.isfinite(_mean(v["delta_m"])) and _mean(v["delta_m"]) == best.get(g["budget"]):
            dm = f"**{dm}**"
        cells = [g["budget"]] if grid.budgets else []
        cells += [g["method"], g["strategy"], str(g["n"])]
        cells += [_mean_std_cell(v[f"{t}/{m}"], ".4f") for t, m in metric_cols]
        cells += [dm, _confidence(v["delta_m"])]
        cells += [
            _mean_std_cell(v["seconds_per_epoch"], ".2f", std=False),
            _mean_std_cell(v["steps"], ".0f", std=False),
            _mean_std_cell(v["forward_backward"], ".0f", std=False),
            _mean_std_cell(v["peak_memory_mb"], ".0f", std=False),
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


def _mean_std_cell(values: Sequence[float], spec: str, std: bool = True) -> str:
    """A table cell: the mean of the finite ``values`` in ``spec`` format, ``± std`` (sample
    standard deviation) after it when ``std`` and there are two or more; ``n/a`` for none."""
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
