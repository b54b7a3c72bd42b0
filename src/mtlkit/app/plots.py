"""Figures of a run folder, drawn from its CSV logs (so they can be redrawn at any time).

``plot_run(run_dir)`` writes, beside ``steps.csv`` and ``metrics.csv``:

* ``losses.png``: each task's training loss per step (a moving average over about 2% of the run,
  the raw values faint behind it);
* ``weights.png``: each task's effective weight per step, as the method reported it (the weight
  ``w_i`` such that the update is that of ``Σ w_i L_i``; absent for aggregators without weights);
* ``validation.png``: each validation metric per epoch, one panel per task.

For a compare folder (``mtlkit compare``), :func:`plot_compare` draws ``delta_m.png``,
``pareto.png``, ``quality_vs_cost.png``, ``curves.png`` and ``weights.png`` from its
``results.csv`` and ``compare.json`` (and the runs' logs); :func:`plot_folder` (``mtlkit plot
DIR``) tells the two kinds apart.

matplotlib is an optional dependency (``pip install "mtlkit[plot]"``); it is imported only here,
with the non-interactive Agg backend.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtlkit.app.plot_option import missing_matplotlib
from mtlkit.errors import MtlkitError
from mtlkit.training.logs import atomic_file


def _pyplot() -> Any:
    why = missing_matplotlib()
    if why is not None:
        raise MtlkitError(why)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LOG_TEXT_COLUMNS = ("solver/message",)
"""Columns of ``steps.csv`` that hold text (why a solver stopped), left out by read_columns."""


def read_columns(path: Path) -> dict[str, list[float]]:
    """A CSV log as ``{column: values}`` (empty cells become NaN; the text columns left out)."""
    if not path.is_file():
        raise MtlkitError(f"{str(path)!r} does not exist: is this a run folder?")
    columns: dict[str, list[float]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key in LOG_TEXT_COLUMNS:
                    continue
                columns[key].append(float(value) if value not in ("", None) else math.nan)
    return dict(columns)


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    out, total, kept = [], 0.0, []
    for value in values:
        kept.append(value)
        total += value
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def _by_prefix(columns: dict[str, list[float]], prefix: str) -> dict[str, list[float]]:
    return {
        key[len(prefix) :]: values
        for key, values in columns.items()
        if key.startswith(prefix) and not all(math.isnan(v) for v in values)
    }


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw ``losses.png``, ``weights.png`` (when the method reported weights) and
    ``validation.png`` (when there are validation metrics) into ``run_dir``; return their paths."""
    run_dir = Path(run_dir)
    plt = _pyplot()
    steps = read_columns(run_dir / "steps.csv")
    written = []
    x = steps.get("step", [])
    for name, prefix, ylabel in (
        ("losses.png", "loss/", "training loss"),
        ("weights.png", "weight/", "effective task weight"),
    ):
        series = _by_prefix(steps, prefix)
        if not series or not x:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        window = max(1, len(x) // 50)
        for task, values in series.items():
            (line,) = ax.plot(x, moving_average(values, window), label=task, linewidth=1.5)
            ax.plot(x, values, color=line.get_color(), alpha=0.15, linewidth=0.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if prefix == "loss/" and all(v > 0 for vs in series.values() for v in vs):
            ax.set_yscale("log")
        ax.set_title(f"{run_dir.name}: {ylabel} per task")
        ax.legend(fontsize="small")
        written.append(_save(plt, fig, run_dir / name))
    metrics_path = run_dir / "metrics.csv"
    if metrics_path.is_file():
        metrics = read_columns(metrics_path)
        val = _by_prefix(metrics, "val/")
        per_task: dict[str, dict[str, list[float]]] = defaultdict(dict)
        for key, values in val.items():
            task, _, metric = key.partition("/")
            per_task[task][metric] = values
        if per_task:
            fig, axes = plt.subplots(1, len(per_task), figsize=(4 * len(per_task), 3.5))
            axes = [axes] if len(per_task) == 1 else list(axes)
            for ax, (task, series) in zip(axes, per_task.items()):
                for metric, values in series.items():
                    ax.plot(metrics["epoch"], values, marker="o", markersize=3, label=metric)
                ax.set_title(f"validation: {task}")
                ax.set_xlabel("epoch")
                ax.legend(fontsize="small")
            written.append(_save(plt, fig, run_dir / "validation.png"))
    return written


def plot_folder(folder: str | Path) -> list[Path]:
    """Redraw the figures of ``folder``: a compare folder (it holds ``results.csv`` and
    ``compare.json``, see :func:`plot_compare`) or a run folder (:func:`plot_run`)."""
    folder = Path(folder)
    if (folder / "results.csv").is_file() and (folder / "compare.json").is_file():
        return plot_compare(folder)
    return plot_run(folder)


# --- compare folders (mtlkit compare) -------------------------------------------------------------

TEXT_COLUMNS = ("run", "method", "strategy", "budget", "front", "preference", "non_dominated")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a compare folder's ``results.csv``: text columns as strings, the others as
    floats (NaN for empty cells)."""
    path = Path(path)
    if not path.is_file():
        raise MtlkitError(f"{str(path)!r} does not exist: is this a compare folder?")
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            {
                k: v if k in TEXT_COLUMNS else (float(v) if v not in ("", None) else math.nan)
                for k, v in row.items()
            }
            for row in csv.DictReader(handle)
        ]


def pareto_front(points: Sequence[tuple[float, float]], higher: tuple[bool, bool]) -> list[int]:
    """Indices of the non-dominated points (NaN points never are): no other point is at least
    as good on both coordinates and better on one; ``higher[i]``: higher is better on axis i."""
    signs = [1.0 if h else -1.0 for h in higher]
    scored = [
        (i, (signs[0] * x, signs[1] * y))
        for i, (x, y) in enumerate(points)
        if math.isfinite(x) and math.isfinite(y)
    ]
    front = []
    for i, p in scored:
        dominated = any(
            q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for _, q in scored
        )
        if not dominated:
            front.append(i)
    return front


def plot_compare(out_dir: str | Path) -> list[Path]:
    """Draw a compare folder's figures from its ``results.csv`` and ``compare.json`` (and the
    runs' ``metrics.csv`` for the curves); return their paths:

    * ``delta_m.png``: Δm% per method (bars: mean over seeds, error bars: std, dots: seeds),
      one bar per strategy, one panel per budget;
    * ``pareto.png``: the first metric of the first two tasks for every run, the
      non-dominated runs circled and joined, the single-task baseline as a star; one panel per
      budget (problems with two or more tasks);
    * ``quality_vs_cost.png``: Δm% (mean ± std over seeds) against the training time and
      against the forward + backward passes, one line per method and strategy through its
      budgets;
    * ``curves.png``: each task's first validation metric per epoch (mean over seeds), one
      line per method and strategy, one row of panels per budget;
    * ``weights.png``: each task's weight per optimizer step (moving average, mean over seeds)
      in the runs of the first budget, one panel per method and strategy whose weights change
      (constant ones, such as EW's, are named in the title instead).
    """
    out_dir = Path(out_dir)
    rows = read_results(out_dir / "results.csv")
    meta_path = out_dir / "compare.json"
    if not meta_path.is_file():
        raise MtlkitError(f"{str(meta_path)!r} does not exist: is this a compare folder?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    plt = _pyplot()
    written = []
    if any(math.isfinite(r.get("delta_m", math.nan)) for r in rows):
        written.append(plot_delta_m(plt, rows, meta, out_dir / "delta_m.png"))
        written.append(plot_quality_vs_cost(plt, rows, meta, out_dir / "quality_vs_cost.png"))
    if len(meta["tasks"]) >= 2 and rows:
        written.append(plot_pareto(plt, rows, meta, out_dir / "pareto.png"))
    for draw, name in ((plot_compare_curves, "curves.png"), (plot_compare_weights, "weights.png")):
        drawn = draw(plt, out_dir, rows, meta, out_dir / name)
        if drawn is not None:
            written.append(drawn)
    return written


def _budgets(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """``(name, description)`` of each budget (one unnamed budget without ``budgets``)."""
    budgets = meta.get("budgets") or []
    if not budgets:
        return [("", "")]
    out = []
    for b in budgets:
        limits = ", ".join(f"{k}={v:g}" for k, v in b.items() if k != "name")
        out.append((b["name"], limits))
    return out


def _series(meta: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m, s) for m in meta["methods"] for s in meta["strategies"]]


def _style(plt: Any, meta: dict[str, Any], method: str, strategy: str) -> dict[str, Any]:
    """Line style of a method x strategy series: the method's colour, the strategy's dashes."""
    i, j = meta["methods"].index(method), meta["strategies"].index(strategy)
    return {
        "color": plt.get_cmap("tab10")(i % 10),
        "linestyle": LINESTYLES[j % len(LINESTYLES)],
    }


def _series_name(meta: dict[str, Any], method: str, strategy: str) -> str:
    return f"{method} / {strategy}" if len(meta["strategies"]) > 1 else method


def _panel_title(name: str, description: str) -> str:
    return f"budget {name} ({description})" if name else ""


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _finite_mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation of the finite ``values`` (NaN, NaN for none;
    std 0 for one), as numbers for error bars."""
    kept = _finite(values)
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))


def _select(rows: Sequence[dict[str, Any]], **where: str) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _panels(plt: Any, count: int, width: float = 5.5, height: float = 4.2) -> tuple[Any, list]:
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, list(axes[0])


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, 120 dpi; atomically, so that a full disk
    leaves the previous image or none, never a torn or empty one) and close it.

    Raises:
        WriteError: if the image cannot be written (a full disk).
    """
    fig.tight_layout()
    try:
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def _seed_note(meta: dict[str, Any]) -> str:
    n = len(meta["seeds"])
    return f"{n} seed{'s' if n > 1 else ''}"


def plot_delta_m(
    plt: Any, rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path
) -> Path:
    """Δm% with error bars per method (and strategy), one panel per budget."""
    budgets = _budgets(meta)
    methods, strategies = meta["methods"], meta["strategies"]
    fig, axes = _panels(plt, len(budgets), width=max(5.0, 1.1 * len(methods) * len(strategies)))
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(strategies)
    for ax, (budget, description) in zip(axes, budgets):
        for j, strategy in enumerate(strategies):
            for i, method in enumerate(methods):
                values = [
                    r["delta_m"]
                    for r in _select(rows, budget=budget, method=method, strategy=strategy)
                ]
                mean, std = _finite_mean_std(values)
                if math.isnan(mean):
                    continue
                x = i + (j - (len(strategies) - 1) / 2) * width
                ax.bar(
                    x,
                    mean,
                    width * 0.9,
                    yerr=std,
                    capsize=3,
                    color=cmap(j % 10),
                    alpha=0.75,
                    label=strategy if i == 0 else None,
                )
                ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.axhline(0.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30 if len(methods) > 5 else 0)
        ax.set_ylabel("Δm% vs single-task (lower is better)")
        ax.set_title(_panel_title(budget, description) or "Δm% per method")
        if len(strategies) > 1:
            ax.legend(title="strategy", fontsize="small")
    fig.suptitle(
        f"Multi-task performance drop Δm% (bars: mean over {_seed_note(meta)}, "
        "error bars: std, dots: seeds; 0 = single-task level)",
        fontsize="medium",
    )
    return _save(plt, fig, path)


def _first_metric(meta: dict[str, Any], task: str) -> tuple[str, bool]:
    metrics = meta["tasks"][task]["metrics"]
    name = next(iter(metrics))
    return name, bool(metrics[name])


def _axis_label(task: str, metric: str, higher: bool) -> str:
    return f"{task} {metric} ({'higher' if higher else 'lower'} is better)"


def plot_pareto(plt: Any, rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """The two-task Pareto scatter (the first metric of the first two tasks), per budget."""
    tasks = list(meta["tasks"])[:2]
    (m1, h1), (m2, h2) = (_first_metric(meta, t) for t in tasks)
    c1, c2 = f"{tasks[0]}/{m1}", f"{tasks[1]}/{m2}"
    budgets = _budgets(meta)
    fig, axes = _panels(plt, len(budgets), width=6.0, height=5.0)
    cmap = plt.get_cmap("tab10")
    baselines = list((meta.get("baselines") or {}).values())
    for ax, (budget, description) in zip(axes, budgets):
        panel = _select(rows, budget=budget) if budget else list(rows)
        for i, method in enumerate(meta["methods"]):
            for j, strategy in enumerate(meta["strategies"]):
                points = _select(panel, method=method, strategy=strategy)
                if not points:
                    continue
                ax.scatter(
                    [r[c1] for r in points],
                    [r[c2] for r in points],
                    color=cmap(i % 10),
                    marker=MARKERS[j % len(MARKERS)],
                    s=36,
                    alpha=0.85,
                    label=_series_name(meta, method, strategy),
                )
        front = pareto_front([(r[c1], r[c2]) for r in panel], (h1, h2))
        if front:
            chosen = sorted((panel[k][c1], panel[k][c2]) for k in front)
            xs, ys = zip(*chosen)
            ax.plot(xs, ys, color="black", linewidth=1, linestyle="--", zorder=1)
            ax.scatter(
                xs,
                ys,
                s=140,
                facecolors="none",
                edgecolors="black",
                linewidths=1.2,
                label=f"Pareto front ({len(front)} run{'s' if len(front) > 1 else ''})",
            )
        stl = [(b[tasks[0]][m1], b[tasks[1]][m2]) for b in baselines if tasks[0] in b]
        if stl:
            ax.scatter(
                [sum(p[0] for p in stl) / len(stl)],
                [sum(p[1] for p in stl) / len(stl)],
                marker="*",
                s=220,
                color="gold",
                edgecolors="black",
                label="single-task (mean)",
                zorder=3,
            )
        ax.set_xlabel(_axis_label(tasks[0], m1, h1))
        ax.set_ylabel(_axis_label(tasks[1], m2, h2))
        ax.set_title(_panel_title(budget, description) or "every run")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="best")
    more = len(meta["tasks"]) - 2
    note = f" (first two of {more + 2} tasks)" if more else ""
    fig.suptitle(
        f"Two-task trade-off{note}: one point per run; best corner: "
        f"{'right' if h1 else 'left'}-{'top' if h2 else 'bottom'}",
        fontsize="medium",
    )
    return _save(plt, fig, path)


def plot_quality_vs_cost(
    plt: Any, rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path
) -> Path:
    """Δm% against training time and against forward + backward passes, per method and
    strategy (one point per budget: mean ± std over seeds)."""
    budgets = _budgets(meta)
    fig, axes = _panels(plt, 2, width=6.0, height=4.5)
    costs = (("seconds", "training time (s)"), ("forward_backward", "forward + backward passes"))
    for ax, (column, label) in zip(axes, costs):
        for method, strategy in _series(meta):
            points = []
            for b, (budget, _) in enumerate(budgets):
                group = _select(rows, budget=budget, method=method, strategy=strategy)
                x, _ = _finite_mean_std([r[column] for r in group])
                y, dy = _finite_mean_std([r["delta_m"] for r in group])
                if math.isfinite(x) and math.isfinite(y):
                    points.append((x, y, dy, b))
            if not points:
                continue
            points.sort()
            style = _style(plt, meta, method, strategy)
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2, **style)
            for x, y, dy, b in points:
                ax.errorbar(
                    x,
                    y,
                    yerr=dy,
                    color=style["color"],
                    marker=MARKERS[b % len(MARKERS)],
                    capsize=3,
                )
            ax.plot([], [], label=_series_name(meta, method, strategy), **style)
        ax.axhline(0.0, color="gray", linewidth=0.8, linestyle="--")
        xs = _finite([r[column] for r in rows])
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("Δm% (lower is better)")
        ax.grid(alpha=0.3)
    if len(budgets) > 1:
        for b, (budget, _) in enumerate(budgets):
            axes[1].plot([], [], "k", linestyle="none", marker=MARKERS[b], label=budget)
    axes[1].legend(fontsize="x-small", loc="best")
    axes[0].set_title("quality vs time")
    axes[1].set_title("quality vs compute")
    fig.suptitle(
        f"Quality vs cost (mean ± std over {_seed_note(meta)}; lower-left is better)",
        fontsize="medium",
    )
    return _save(plt, fig, path)


def plot_compare_curves(
    plt: Any, out_dir: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path
) -> Path | None:
    """Each task's first validation metric per epoch, mean over seeds, per method and strategy;
    one row of panels per budget (``None`` when no run folder has a ``metrics.csv``)."""
    from matplotlib.ticker import MaxNLocator

    tasks = list(meta["tasks"])
    budgets = _budgets(meta)
    curves: dict[tuple[str, str, str], dict[str, list[list[float]]]] = {}
    epochs: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        metrics_path = out_dir / "runs" / row["run"] / "metrics.csv"
        if not metrics_path.is_file():
            continue
        columns = read_columns(metrics_path)
        key = (row["budget"], row["method"], row["strategy"])
        for task in tasks:
            metric, _ = _first_metric(meta, task)
            values = columns.get(f"val/{task}/{metric}")
            if values:
                curves.setdefault(key, {}).setdefault(task, []).append(values)
        if len(columns.get("epoch", [])) > len(epochs.get(key, [])):
            epochs[key] = columns["epoch"]
    if not curves:
        return None
    fig, grid = plt.subplots(
        len(budgets), len(tasks), figsize=(4.2 * len(tasks), 3.4 * len(budgets)), squeeze=False
    )
    for r, (budget, description) in enumerate(budgets):
        for c, task in enumerate(tasks):
            ax = grid[r][c]
            metric, higher = _first_metric(meta, task)
            for method, strategy in _series(meta):
                runs = curves.get((budget, method, strategy), {}).get(task)
                if not runs:
                    continue
                length = min(len(v) for v in runs)
                mean = [sum(v[i] for v in runs) / len(runs) for i in range(length)]
                x = epochs[(budget, method, strategy)][:length]
                ax.plot(
                    x,
                    mean,
                    marker="o",
                    markersize=3,
                    label=_series_name(meta, method, strategy),
                    **_style(plt, meta, method, strategy),
                )
            title = f"{task}: validation {metric} ({'↑' if higher else '↓'} better)"
            ax.set_title(f"{title}\n{_panel_title(budget, description)}" if budget else title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    grid[0][-1].legend(fontsize="x-small", loc="best")
    fig.suptitle(f"Validation curves (mean over {_seed_note(meta)})", fontsize="medium")
    return _save(plt, fig, path)


def plot_compare_weights(
    plt: Any, out_dir: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path
) -> Path | None:
    """Each task's weight per optimizer step in the runs of the first budget (moving average
    over about 2% of the run, mean over seeds), one panel per method and strategy whose weights
    change; ``None`` when no run logged changing weights."""
    budget, description = _budgets(meta)[0]
    tasks = list(meta["tasks"])
    panels: list[tuple[str, list[float], dict[str, list[float]]]] = []
    constant = []
    for method, strategy in _series(meta):
        runs = []
        for row in _select(rows, budget=budget, method=method, strategy=strategy):
            steps_path = out_dir / "runs" / row["run"] / "steps.csv"
            if steps_path.is_file():
                columns = read_columns(steps_path)
                weights = {t: columns[f"weight/{t}"] for t in tasks if f"weight/{t}" in columns}
                if weights and columns.get("step"):
                    runs.append((columns["step"], weights))
        if not runs:
            continue
        length = min(len(x) for x, _ in runs)
        mean = {
            t: [sum(w[t][i] for _, w in runs) / len(runs) for i in range(length)]
            for t in runs[0][1]
            if all(t in w for _, w in runs)
        }
        finite = [v for values in mean.values() for v in values if math.isfinite(v)]
        if not finite:
            continue
        if max(finite) - min(finite) <= 1e-9 * max(1.0, abs(max(finite))):
            constant.append(f"{_series_name(meta, method, strategy)} ({finite[0]:g})")
            continue
        panels.append((_series_name(meta, method, strategy), runs[0][0][:length], mean))
    if not panels:
        return None
    columns = min(4, len(panels))
    rows_count = math.ceil(len(panels) / columns)
    fig, grid = plt.subplots(
        rows_count,
        columns,
        figsize=(4.2 * columns, 3.4 * rows_count),
        squeeze=False,
        sharey=True,
    )
    cmap = plt.get_cmap("tab10")
    for k, (name, x, mean) in enumerate(panels):
        ax = grid[k // columns][k % columns]
        window = max(1, len(x) // 50)
        for t, task in enumerate(mean):
            ax.plot(x, moving_average(mean[task], window), color=cmap(t % 10), label=task)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if k % columns == 0:
            ax.set_ylabel("task weight")
    for k in range(len(panels), rows_count * columns):
        grid[k // columns][k % columns].axis("off")
    grid[0][0].legend(title="task", fontsize="small")
    title = f"Task weights per step (mean over {_seed_note(meta)}"
    title += f"; budget {budget}: {description})" if budget else ")"
    if constant:
        title += "\nconstant: " + ", ".join(constant)
    fig.suptitle(title, fontsize="medium")
    return _save(plt, fig, path)
