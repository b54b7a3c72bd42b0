"""The two-objective toy problem of CAGrad / Nash-MTL / FAMO, and a runner for every method.

The problem (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
2021, ``toy.py`` of the official code; Navon et al., "Multi-Task Learning as a Bargaining Game",
ICML 2022, ``experiments/toy/problem.py``, which adds the imbalance): two losses of ``x ∈ R²``::

    h_1 = log(max(|½(-x_1 - 7) - tanh(-x_2)|, 5e-6)) + 6
    h_2 = log(max(|½(-x_1 + 3) + tanh(-x_2) + 2|, 5e-6)) + 6
    q_1 = ((-x_1 + 7)² + 0.1 (-x_2 - 8)²) / 10 - 20
    q_2 = ((-x_1 - 7)² + 0.1 (-x_2 - 8)²) / 10 - 20
    c_1 = max(tanh(x_2 / 2), 0),   c_2 = max(tanh(-x_2 / 2), 0)
    L_1 = s (h_1 c_1 + q_1 c_2),   L_2 = h_2 c_1 + q_2 c_2

with ``s = 0.1`` in the imbalanced variant of Nash-MTL and FAMO (``s = 1``: CAGrad's original).
The runs start from ``(-8.5, 7.5), (0, 0), (9, 9), (-7.5, -0.5), (9, -1)`` and take Adam steps of
learning rate 1e-3 (35,000 in Nash-MTL, 100,000 in CAGrad) on the update each method makes from
the 2 x 2 Jacobian of ``(L_1, L_2)`` w.r.t. ``x`` (the method's own parameters, UW's say, get
their own Adam group, learning rate 0.025 as in Nash-MTL's script).

The Pareto set lies in ``x_2 < 0``, where ``c_1 = 0`` and both losses are ``c_2(x_2) q_i``: it is
the arc of points with ``-7 ≤ x_1 ≤ 7`` where the two gradients are anti-parallel, computed here
(:func:`front_x2`) by bisection on the cross product of the gradients. It is not quite the line
``x_2 = -8.3552`` drawn by the papers: ``x_2`` goes from ``-8.3551`` at ``x_1 = 0`` to
``-8.4345`` at ``x_1 = ±7``. The scale ``s`` does not move it.

The problem is deterministic, so a method that asks for extra independent batches
(``extra_batches > 0``: MoDo, SDMGrad) gets the same Jacobian again as each extra one, and a
bilevel method (``needs_probe``) gets the same losses for its auxiliary batches.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import io
import itertools
import math
import multiprocessing
import os
import platform
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods import METHODS, Method
from mtlkit.training.diagnostics import status_label
from mtlkit.training.logs import write_atomic
from mtlkit.training.step import Step

STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
IMBALANCED_SCALE = 0.1
LOWER = 5e-6
FRONT_TOLERANCE = 0.05
DEFAULT_STEPS = 35_000
METHOD_LR = 0.025


def toy_losses(x: Tensor, scale: float = IMBALANCED_SCALE) -> tuple[Tensor, Tensor]:
    """``(L_1, L_2)`` at ``x`` (``[..., 2]``; any leading batch shape), ``L_1`` scaled by
    ``scale`` (see the module docstring).

    Shared subexpressions are computed once (``tanh(-x_2)``, ``tanh(x_2/2)`` whose negation is
    ``tanh(-x_2/2)``, ``0.1 (x_2 + 8)²``): the values and gradients are bitwise those of the
    reference code (tested), including at ``x_2 = 0``, where ``clamp`` lets the gradient through
    (so that the run from ``(0, 0)`` moves), with fewer operations per step.
    """
    x1, x2 = x.unbind(-1)
    tanh_x2 = torch.tanh(-x2)
    half = torch.tanh(x2 * 0.5)
    c1, c2 = half.clamp_min(0), (-half).clamp_min(0)
    h1 = (0.5 * (-x1 - 7) - tanh_x2).abs().clamp_min(LOWER).log() + 6
    h2 = (0.5 * (-x1 + 3) + tanh_x2 + 2).abs().clamp_min(LOWER).log() + 6
    common = 0.1 * (-x2 - 8).pow(2)
    q1 = ((-x1 + 7).pow(2) + common) / 10 - 20
    q2 = ((-x1 - 7).pow(2) + common) / 10 - 20
    return (h1 * c1 + q1 * c2) * scale, h2 * c1 + q2 * c2


def _front_cross(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """``∂_1 L_1 ∂_2 L_2 - ∂_2 L_1 ∂_1 L_2`` (up to the positive factor ``s``) for ``x_2 < 0``."""
    c2 = np.tanh(-x2 / 2)
    dc2 = -0.5 * (1 - c2**2)
    q1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    q2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    d1_l1, d1_l2 = c2 * (x1 - 7) / 5, c2 * (x1 + 7) / 5
    d2_l1 = dc2 * q1 + c2 * 0.02 * (x2 + 8)
    d2_l2 = dc2 * q2 + c2 * 0.02 * (x2 + 8)
    return d1_l1 * d2_l2 - d2_l1 * d1_l2


def front_x2(x1: np.ndarray | float) -> np.ndarray:
    """The ``x_2`` of the Pareto set above each ``x_1 ∈ [-7, 7]`` (float64, to ~1e-12)."""
    x1 = np.asarray(x1, dtype=np.float64)
    if np.any(np.abs(x1) > 7):
        raise ValueError("the Pareto set of the toy spans x1 in [-7, 7] only")
    low, high = np.full_like(x1, -9.0), np.full_like(x1, -8.0)
    low_sign = np.sign(_front_cross(x1, low))
    for _ in range(60):
        middle = (low + high) / 2
        same = np.sign(_front_cross(x1, middle)) == low_sign
        low, high = np.where(same, middle, low), np.where(same, high, middle)
    return (low + high) / 2


def front_curve(points: int = 1401) -> np.ndarray:
    """``[points, 2]`` samples of the Pareto set, ``x_1`` from -7 to 7."""
    x1 = np.linspace(-7.0, 7.0, points)
    return np.stack([x1, front_x2(x1)], axis=1)


_CURVE = front_curve()


def front_distance(point: Sequence[float]) -> float:
    """Euclidean distance from ``point`` to the Pareto set (sampled every 0.01 in ``x_1``)."""
    diff = _CURVE - np.asarray(point, dtype=np.float64)[None, :]
    return float(np.sqrt((diff**2).sum(axis=1)).min())


@dataclass
class ToyRun:
    """One method from one start.

    Attributes:
        method: the registered name.
        start: the initial ``x``.
        steps: the steps taken (fewer than asked if the run failed).
        trajectory: ``[k, 2]`` positions every ``record_every`` steps, start and end included.
        losses: ``(L_1, L_2)`` at the end (``L_1`` scaled).
        distance: Euclidean distance of the end point to the Pareto set.
        seconds: wall time of the steps.
        warnings: warning message -> how many times it was issued.
        solver: how the method's solver ended -> in how many steps (``"newton: converged"``,
            ``"newton: Pareto-stationary: no solution, zero weights"``; empty for a method
            without solver status).
        error: ``"Type: message"`` if the method could not be built or failed.
    """

    method: str
    start: tuple[float, float]
    steps: int = 0
    trajectory: np.ndarray | None = None
    losses: tuple[float, float] | None = None
    distance: float | None = None
    seconds: float = 0.0
    warnings: dict[str, int] = field(default_factory=dict)
    solver: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def final(self) -> tuple[float, float] | None:
        if self.trajectory is None or len(self.trajectory) == 0:
            return None
        return float(self.trajectory[-1, 0]), float(self.trajectory[-1, 1])

    @property
    def on_front(self) -> bool:
        return self.error is None and self.distance is not None and self.distance <= FRONT_TOLERANCE

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else math.nan


def loss_lower_bounds(scale: float = IMBALANCED_SCALE) -> list[float]:
    """Lower bounds of the toy's two losses, for methods that need one (FAMO's ``min_loss``):
    only one of ``c_1``, ``c_2`` is non-zero, ``h_i ≥ log(5e-6) + 6 > -7`` and ``q_i ≥ -20``,
    so ``L_1 ≥ -20 s`` and ``L_2 ≥ -20``; 1 is subtracted so that the bound is strict."""
    return [-20.0 * scale - 1.0, -21.0]


def build_method(name: str, scale: float = IMBALANCED_SCALE, **kwargs: Any) -> Method:
    """The registered method ``name``, set up for two tasks. A method that takes ``min_loss``
    gets the toy's loss lower bounds (the toy's losses go below 0), unless one is given."""
    if "min_loss" not in kwargs and any(a.name == "min_loss" for a in METHODS.arguments(name)):
        kwargs["min_loss"] = loss_lower_bounds(scale)
    method = METHODS.get(name, **kwargs)
    method.setup(2)
    return method


def run_method(
    name: str | Method,
    start: Sequence[float],
    steps: int = DEFAULT_STEPS,
    *,
    scale: float = IMBALANCED_SCALE,
    lr: float = 1e-3,
    method_lr: float = METHOD_LR,
    dtype: torch.dtype = torch.float32,
    record_every: int | None = None,
    method_args: dict[str, Any] | None = None,
) -> ToyRun:
    """Run method ``name`` from ``start`` for ``steps`` Adam steps; never raises for a failing
    method (the error is in the result). An instance instead of a name is used as it is (set up
    for two tasks, not reset).

    Each step is one call of the step driver (:class:`mtlkit.Step`, the protocol every loop
    runs): ``before_step``; ``prepare`` (bilevel methods); ``zero_grad``; the losses; the extra
    Jacobians (the toy has no batches: an extra batch gives this step's losses again); the
    backward on ``x``; ``Adam.step``; ``after_step`` (with the losses after the step if the
    method asks).

    Args:
        name: a registered method name, or a method instance.
        start: the initial ``(x_1, x_2)``.
        steps: number of optimizer steps.
        scale: the factor of ``L_1`` (0.1: imbalanced, 1: CAGrad's original).
        lr: Adam's learning rate for ``x``.
        method_lr: Adam's learning rate for the method's own parameters (if any).
        dtype: of ``x`` (float32 like the reference scripts).
        record_every: keep one position every that many steps (default: about 2,000 per run).
        method_args: keyword arguments for the method.
    """
    label = name if isinstance(name, str) else type(name).__name__
    run = ToyRun(method=label, start=(float(start[0]), float(start[1])))
    every = record_every or max(1, steps // 2000)
    counts: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    x = torch.tensor(run.start, dtype=dtype, requires_grad=True)
    record = torch.empty(steps // every + 2, 2, dtype=torch.float64)
    record[0] = x.detach()
    recorded = 1
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: counts.update([str(message)])
        began = time.perf_counter()
        try:
            if isinstance(name, str):
                method = build_method(name, scale, **(method_args or {}))
            else:
                method = name
                method.setup(2)
            own = list(method.parameters())
            groups: list[dict[str, Any]] = [{"params": [x], "lr": lr}]
            if own:
                groups.append({"params": own, "lr": method_lr})
            optimizer = torch.optim.Adam(groups)
            extra = itertools.repeat(None) if method.extra_batches else None
            driver = Step(
                method, optimizer, lambda _: toy_losses(x, scale), shared=[x], extra_batches=extra
            )
            began = time.perf_counter()
            for step in range(steps):
                status = driver(None).status
                if status is not None:
                    statuses[status_label(status)] += 1
                run.steps = step + 1
                if run.steps % every == 0:
                    record[recorded] = x.detach()
                    recorded += 1
        except Exception as error:  # reported in the table, the other runs go on
            run.error = f"{type(error).__name__}: {error}".splitlines()[0]
            if run.steps:
                run.error += f" (at step {run.steps})"
        run.seconds = time.perf_counter() - began
    if run.steps % every != 0 or recorded == 1:
        record[recorded] = x.detach()
        recorded += 1
    run.trajectory = record[:recorded].numpy()
    run.warnings = dict(counts)
    run.solver = dict(statuses)
    if run.error is None:
        with torch.no_grad():
            f1, f2 = toy_losses(x.detach().double(), scale)
        run.losses = (float(f1), float(f2))
        run.distance = front_distance(run.final or run.start)
    return run


def run_toy(
    methods: Sequence[str] | None = None,
    starts: Sequence[Sequence[float]] = STARTS,
    steps: int = DEFAULT_STEPS,
    *,
    progress: bool = False,
    jobs: int = 1,
    **kwargs: Any,
) -> list[ToyRun]:
    """Every method (default: all registered now, ``mtlkit.methods.available()``) from every
    start; keyword arguments go to :func:`run_method`. ``jobs > 1`` runs that many worker
    processes (one torch thread each; the methods are rebuilt there by name, so only methods
    registered on import of mtlkit); the runs come back in the same order."""
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    names = list(METHODS.available() if methods is None else methods)
    for name in names:  # an unknown name is a user error, not an error row
        METHODS.factory(name)
    work = [(name, tuple(start)) for name in names for start in starts]
    if jobs == 1:
        results = (run_method(name, start, steps, **kwargs) for name, start in work)
        return [_reported(run, progress) for run in results]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(_run_in_worker, n, s, steps, kwargs) for n, s in work]
        return [_reported(future.result(), progress) for future in futures]


def _run_in_worker(name: str, start: tuple[float, ...], steps: int, kwargs: dict) -> ToyRun:
    torch.set_num_threads(1)
    return run_method(name, start, steps, **kwargs)


def _reported(run: ToyRun, progress: bool) -> ToyRun:
    if progress:
        state = run.error or (
            f"ends at ({run.final[0]:.3f}, {run.final[1]:.3f}), "  # type: ignore[index]
            f"{'on' if run.on_front else 'off'} the front"
        )
        print(f"  {run.method} from {run.start}: {state} [{run.steps_per_second:.0f} steps/s]")
    return run


COLUMNS = (
    "method",
    "start",
    "steps",
    "x1",
    "x2",
    "L1",
    "L2",
    "front_distance",
    "on_front",
    "steps_per_s",
    "warnings",
    "solver",
    "error",
)


def table_rows(runs: Sequence[ToyRun]) -> list[dict[str, str]]:
    """One row per run, the values formatted for the CSV and Markdown tables."""
    rows = []
    for run in runs:
        final = run.final if run.error is None else None
        rows.append(
            {
                "method": run.method,
                "start": f"({run.start[0]:g}, {run.start[1]:g})",
                "steps": str(run.steps),
                "x1": "" if final is None else f"{final[0]:.4f}",
                "x2": "" if final is None else f"{final[1]:.4f}",
                "L1": "" if run.losses is None else f"{run.losses[0]:.4f}",
                "L2": "" if run.losses is None else f"{run.losses[1]:.4f}",
                "front_distance": "" if run.distance is None else f"{run.distance:.4f}",
                "on_front": "error" if run.error else ("yes" if run.on_front else "no"),
                "steps_per_s": f"{run.steps_per_second:.0f}" if run.steps else "",
                "warnings": "; ".join(f"{n} x {m}" for m, n in run.warnings.items()),
                "solver": "; ".join(f"{n} x {m}" for m, n in sorted(run.solver.items())),
                "error": run.error or "",
            }
        )
    return rows


def summary_rows(runs: Sequence[ToyRun]) -> list[dict[str, str]]:
    """One row per method: starts from which it reached the front, speed, errors."""
    by_method: dict[str, list[ToyRun]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    rows = []
    for name, group in by_method.items():
        reached = [r for r in group if r.on_front]
        ran = [r for r in group if r.steps]
        speed = sum(r.steps for r in ran) / sum(r.seconds for r in ran) if ran else math.nan
        errors = sorted({r.error for r in group if r.error})
        rows.append(
            {
                "method": name,
                "on_front": f"{len(reached)}/{len(group)}",
                "missed": ", ".join(
                    f"({r.start[0]:g}, {r.start[1]:g})" for r in group if not r.on_front
                ),
                "steps_per_s": "" if math.isnan(speed) else f"{speed:.0f}",
                "warnings": str(sum(sum(r.warnings.values()) for r in group)),
                "error": "; ".join(errors),
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row[k].replace("|", "\\|") for k in header]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(
    runs: Sequence[ToyRun],
    out_dir: Path,
    *,
    steps: int,
    scale: float,
    lr: float = 1e-3,
    provenance: str = "",
) -> None:
    """``toy.csv`` (one row per run) and ``toy.md`` (per-method summary, then every run), each
    written atomically; ``provenance``: a line for ``toy.md`` (the command, date, machine)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "toy.csv", table.getvalue())
    text = [
        "# The two-objective toy",
        "",
        *([provenance, ""] if provenance else []),
        f"{steps} Adam steps (lr {lr:g}) per run, L1 scaled by {scale:g}. On the front: the end "
        f"point is within {FRONT_TOLERANCE} of the Pareto set (x1 in [-7, 7], x2 from -8.3551 "
        "to -8.4345).",
        "",
        "## Per method",
        "",
        markdown_table(summary_rows(runs)),
        "## Every run",
        "",
        markdown_table(rows),
    ]
    write_atomic(out_dir / "toy.md", "\n".join(text))


def provenance_line(argv: Sequence[str], jobs: int) -> str:
    """``command: ..., date: ..., machine: ...`` for a results file."""
    machine = (
        f"{platform.node()}, {os.cpu_count()} CPU(s), {jobs} process(es) of "
        f"{1 if jobs > 1 else torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    )
    when = datetime.datetime.now().isoformat(timespec="seconds")
    return f"command: `mtlkit toy {' '.join(argv)}`; date: {when}; machine: {machine}"


def plot_runs(
    runs: Sequence[ToyRun], path: Path, *, scale: float = IMBALANCED_SCALE, grid: int = 300
) -> None:
    """A PNG with one panel per method: its trajectories from every start over the contours of
    ``L_1 + L_2``, the Pareto set in grey, starts as black dots, ends as stars.

    Raises:
        MtlkitError: if matplotlib is not installed (the ``plot`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MtlkitError(
            "plotting the toy needs matplotlib: pip install 'mtlkit[plot]'"
        ) from error
    by_method: dict[str, list[ToyRun]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    names = list(by_method)
    columns = min(5, max(1, len(names)))
    rows = math.ceil(len(names) / columns) if names else 1
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows))
    FigureCanvasAgg(figure)
    axis = np.linspace(-10, 10, grid)
    mesh = torch.from_numpy(np.stack(np.meshgrid(axis, axis), axis=-1))
    with torch.no_grad():
        f1, f2 = toy_losses(mesh, scale)
    total = (f1 + f2).numpy()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for index, name in enumerate(names):
        ax = figure.add_subplot(rows, columns, index + 1)
        ax.contour(axis, axis, total, levels=15, linewidths=0.6, cmap="viridis")
        ax.plot(_CURVE[:, 0], _CURVE[:, 1], color="0.55", linewidth=4, zorder=1)
        group = by_method[name]
        for k, run in enumerate(group):
            color = colors[k % len(colors)]
            ax.plot(*run.start, "o", color="k", markersize=4, zorder=4)
            if run.trajectory is not None and len(run.trajectory) > 1:
                ax.plot(run.trajectory[:, 0], run.trajectory[:, 1], color=color, lw=1.2, zorder=3)
            if run.error is None and run.trajectory is not None:
                ax.plot(*run.trajectory[-1], "*", color=color, markersize=9, zorder=5)
        reached = sum(r.on_front for r in group)
        failed = [r for r in group if r.error]
        title = f"{name} ({reached}/{len(group)})"
        if failed:
            title += " error"
            ax.text(
                0,
                0,
                "\n".join(_wrap(failed[0].error or "", 32)[:6]),
                ha="center",
                va="center",
                fontsize=6,
                color="tab:red",
                zorder=6,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def parse_starts(text: str) -> list[tuple[float, float]]:
    """``"(-8.5, 7.5); (0, 0)"`` or ``"-8.5,7.5 0,0"`` -> ``[(-8.5, 7.5), (0.0, 0.0)]``."""
    cleaned = re.sub(r"\s*,\s*", ",", text.replace("(", " ").replace(")", " ").replace(";", " "))
    points = []
    for item in cleaned.split():
        parts = [p for p in item.split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 2 or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"a start is two numbers 'x1,x2', got {item!r} in {text!r}")
        points.append((values[0], values[1]))
    if not points:
        raise ConfigError(f"no start point in {text!r}")
    return points


def add_toy_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mtlkit toy``."""
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="methods to run (names, or comma-separated); default: every registered method",
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"Adam steps per run ({DEFAULT_STEPS})"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/toy"), help="output folder")
    parser.add_argument(
        "--starts",
        metavar="POINTS",
        help='start points, e.g. "(-8.5,7.5);(9,9)" or --starts=-8.5,7.5;9,9 '
        "(default: the five of Nash-MTL and FAMO)",
    )
    parser.add_argument(
        "--scale", type=float, default=IMBALANCED_SCALE, help="factor of L1 (1: CAGrad's toy)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--no-plot", action="store_true", help="write the tables only")
    parser.add_argument("--no-progress", action="store_true", help="do not print each run")
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes, one torch thread each (1)"
    )


def toy_command(args: argparse.Namespace) -> int:
    """``mtlkit toy``: run, write ``toy.csv``, ``toy.md`` and ``toy.png`` under ``--out``."""
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    methods = None
    if args.methods:
        methods = [n for item in args.methods for n in item.split(",") if n]
    starts = STARTS if args.starts is None else parse_starts(args.starts)
    runs = run_toy(
        methods,
        starts,
        args.steps,
        progress=not args.no_progress,
        jobs=args.jobs,
        scale=args.scale,
        lr=args.lr,
    )
    options = [f"--steps {args.steps}", f"--scale {args.scale:g}", f"--lr {args.lr:g}"]
    options += [f"--methods {','.join(methods)}"] if methods else []
    options += [f'--starts "{args.starts}"'] if args.starts else []
    provenance = provenance_line([*options, f"--jobs {args.jobs}", f"--out {args.out}"], args.jobs)
    write_tables(
        runs, args.out, steps=args.steps, scale=args.scale, lr=args.lr, provenance=provenance
    )
    print(markdown_table(summary_rows(runs)), end="")
    if not args.no_plot:
        plot_runs(runs, args.out / "toy.png", scale=args.scale)
    print(f"toy results written to {args.out}")
    return 0
