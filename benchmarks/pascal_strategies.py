"""Pascal et al. (2021): averaged loss vs alternating independent task steps, and random grouping.

Trains, for several seeds:

* on MultiDigits (3 tasks of different nature): the averaged objective (Joint + EW, "SUS"),
  alternating steps with one shared optimizer ("IUS") and with one optimizer per task ("IO"),
  and the averaged objective given the same compute as the alternating runs (as many forward
  passes, i.e. G times the epochs);
* on the 40-attribute benchmark: alternating with one optimizer per group for random groups of
  size s in {1, 4, 10, 40} (G = ceil(40 / s) groups, s = 40 is the averaged objective), each
  against the averaged objective given the same number of forward passes.

Writes ``results.csv`` (one row per run), ``results.md`` (mean ± std over seeds: per-task
metrics, Δm% vs the averaged objective at equal epochs, final train loss, path length and
distance from the initialisation of the shared parameters, passes per batch, time per epoch) and
``quality_vs_cost.png`` to ``--out``.

    python benchmarks/pascal_strategies.py                 # the full experiment (~10 min)
    python benchmarks/pascal_strategies.py --quick         # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtlkit import Alternating, Budget, Joint, RandomGroups, Trainer, delta_m, methods, optimizer
from mtlkit.architectures import build
from mtlkit.data.benchmarks import DATASETS, Problem
from mtlkit.training.strategies import Strategy


@dataclass(frozen=True)
class Run:
    """One configuration: a data set, a strategy and a budget in epochs or in passes."""

    name: str
    data: str
    strategy: Callable[[], Strategy]
    epochs: int | None = None
    passes_per_batch: int | None = None  # budget = this x epochs x batches per epoch
    families: tuple[str, ...] = ()  # the plot lines this run is a point of
    cost_groups: int = 1  # G, for the plot's x axis


def runs(epochs: dict[str, int], sizes: list[int], num_tasks: int) -> list[Run]:
    """The runs of the experiment; the averaged objective at equal epochs is each data set's
    baseline for Δm%."""
    e = epochs["multidigits"]
    plan = [
        Run("averaged (SUS)", "multidigits", lambda: Joint(methods.EW()), epochs=e),
        Run("alternating shared (IUS)", "multidigits", lambda: Alternating(), epochs=e),
        Run(
            "alternating per task (IO)",
            "multidigits",
            lambda: Alternating(optimizers="per_group"),
            epochs=e,
        ),
        Run("averaged, equal passes", "multidigits", lambda: Joint(methods.EW()), e, 3),
    ]
    e = epochs["attributes"]
    for size in sizes:
        groups = math.ceil(num_tasks / size)
        if groups == 1:
            both = ("alternating", "averaged, equal passes")
            plan.insert(
                4,
                Run(
                    "averaged (s=40)",
                    "attributes",
                    lambda: Joint(methods.EW()),
                    e,
                    families=both,
                    cost_groups=1,
                ),
            )
            continue
        plan.append(
            Run(
                f"alternating IO, s={size} (G={groups})",
                "attributes",
                lambda size=size: Alternating(
                    groups=RandomGroups(size, seed=0), optimizers="per_group"
                ),
                epochs=e,
                families=("alternating",),
                cost_groups=groups,
            )
        )
        plan.append(
            Run(
                f"averaged, passes of G={groups}",
                "attributes",
                lambda: Joint(methods.EW()),
                e,
                groups,
                families=("averaged, equal passes",),
                cost_groups=groups,
            )
        )
    return plan


def loaders(problem: Problem, batch_size: int, seed: int) -> dict[str, DataLoader]:
    return {
        split: DataLoader(
            data,
            batch_size=batch_size,
            shuffle=split == "train",
            generator=torch.Generator().manual_seed(seed),
        )
        for split, data in problem.splits.items()
    }


def train(run: Run, seed: int, data_args: dict[str, dict[str, Any]], batch_size: int) -> dict:
    torch.manual_seed(seed)
    problem = DATASETS.get(run.data, seed=seed, **data_args.get(run.data, {}))
    model = build("hps", problem.input_shape, problem.task_outputs)
    data = loaders(problem, batch_size, seed)
    batches = len(data["train"])
    if run.passes_per_batch is None:
        budget = Budget(epochs=run.epochs)
    else:
        budget = Budget(epochs=None, passes=run.passes_per_batch * run.epochs * batches)
    trainer = Trainer(
        model,
        problem.tasks,
        run.strategy(),
        optimizer("adam", lr=1e-3),
        budget=budget,
        seed=seed,
        progress=False,
    )
    start = time.perf_counter()
    trainer.fit(data["train"], data["val"])
    wall = time.perf_counter() - start
    test = trainer.evaluate(data["test"], write=False)
    last = trainer.history[-1]
    cost = trainer.summary()["cost"]
    return {
        "run": run.name,
        "data": run.data,
        "seed": seed,
        "test": test,
        "higher": {t.name: t.higher_is_better() for t in problem.tasks},
        "train_loss": sum(v for k, v in last.items() if k.startswith("train/")),
        "epochs": cost["epochs"],
        "forwards_per_batch": cost["forwards_per_batch"],
        "seconds_per_epoch": cost["seconds_per_epoch"],
        "wall_seconds": wall,
        "path_length": cost["path_length"],
        "distance_from_init": cost["distance_from_init"],
    }


def mean_std(values: list[float], spec: str = ".4g") -> str:
    """``mean ± sample std`` (just the value for one seed)."""
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def summarise(results: list[dict], baselines: dict[str, str]) -> tuple[list[dict], str]:
    """Per-run rows (with Δm% against the data set's baseline, mean over its seeds) and the
    Markdown table of means ± std over seeds."""
    base: dict[str, dict[str, dict[str, float]]] = {}
    for data, name in baselines.items():
        rows = [r for r in results if r["run"] == name]
        tasks = rows[0]["test"]
        base[data] = {
            t: {m: statistics.mean(r["test"][t][m] for r in rows) for m in tasks[t] if m != "loss"}
            for t in tasks
        }
    for r in results:
        metrics = {t: {m: v for m, v in ms.items() if m != "loss"} for t, ms in r["test"].items()}
        r["delta_m"] = delta_m(metrics, base[r["data"]], r["higher"])
    lines: list[str] = []
    for data in baselines:
        rows = [r for r in results if r["data"] == data]
        names = list(dict.fromkeys(r["run"] for r in rows))
        tasks = list(rows[0]["test"])
        metric_names = [m for m in rows[0]["test"][tasks[0]] if m != "loss"]
        per_task = len(tasks) <= 5
        cols = (
            [f"{t} {m}" for t in tasks for m in rows[0]["test"][t] if m != "loss"]
            if per_task
            else [f"mean {m}" for m in metric_names]
        )
        header = [
            "run",
            *cols,
            "Δm% ↓",
            "train loss",
            "path length",
            "dist. from init",
            "fwd/batch",
            "s/epoch",
            "epochs",
        ]
        lines += [
            f"\n### {data} (baseline for Δm%: {baselines[data]})\n",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for name in names:
            group = [r for r in rows if r["run"] == name]
            if per_task:
                cells = [
                    mean_std([r["test"][t][m] for r in group])
                    for t in tasks
                    for m in rows[0]["test"][t]
                    if m != "loss"
                ]
            else:
                cells = [
                    mean_std([statistics.mean(r["test"][t][m] for t in tasks) for r in group])
                    for m in metric_names
                ]
            cells += [
                mean_std([r[k] for r in group])
                for k in (
                    "delta_m",
                    "train_loss",
                    "path_length",
                    "distance_from_init",
                    "forwards_per_batch",
                    "seconds_per_epoch",
                    "epochs",
                )
            ]
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return results, "\n".join(lines) + "\n"


def plot(results: list[dict], plan: list[Run], path: Path) -> None:
    """Δm% (mean ± std over seeds) against forward passes per batch x epochs, per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {run.name: run for run in plan}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = dict.fromkeys(f for run in plan for f in run.families)
    for family in families:
        points = []
        for name in [run.name for run in plan if family in run.families]:
            group = [r for r in results if r["run"] == name]
            if not group:
                continue
            cost = statistics.mean(r["forwards_per_batch"] * r["epochs"] for r in group)
            values = [r["delta_m"] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            points.append((cost, statistics.mean(values), spread, by_name[name].cost_groups))
        points.sort()
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=3,
            label=family,
        )
        for x, y, _, groups in points:
            ax.annotate(
                f"G={groups}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    ax.set_xscale("log")
    ax.set_xlabel("compute: forward passes per batch x epochs (log)")
    ax.set_ylabel("Δm% vs averaged at equal epochs (lower is better)")
    ax.set_title("40 attributes: random task groups, quality vs cost")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pascal_strategies"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="small data, 1 seed, 2 epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--data", nargs="+", default=["multidigits", "attributes"], help="which parts to run"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = {"multidigits": 10, "attributes": 5}
    data_args: dict[str, dict[str, Any]] = {}
    seeds = args.seeds
    if args.quick:
        epochs = {"multidigits": 2, "attributes": 1}
        data_args = {
            "multidigits": {"n_train": 512, "n_val": 256, "n_test": 256},
            "attributes": {"n_train": 512, "n_val": 256, "n_test": 256},
        }
        seeds = seeds[:1]
    num_tasks = 40
    if "attributes" in args.data:
        num_tasks = len(DATASETS.get("attributes", **data_args.get("attributes", {})).tasks)
    plan = [run for run in runs(epochs, [1, 4, 10, 40], num_tasks) if run.data in args.data]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for run in plan:
        for seed in seeds:
            result = train(run, seed, data_args, batch_size=64)
            results.append(result)
            print(f"{run.name:<36} seed {seed}: {result['wall_seconds']:.1f} s", file=sys.stderr)
    baselines = {"multidigits": "averaged (SUS)", "attributes": "averaged (s=40)"}
    results, table = summarise(results, {d: baselines[d] for d in args.data})
    (args.out / "results.md").write_text(table, encoding="utf-8")
    with open(args.out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        fields = [
            "run",
            "data",
            "seed",
            "delta_m",
            "train_loss",
            "path_length",
            "distance_from_init",
            "forwards_per_batch",
            "seconds_per_epoch",
            "epochs",
            "wall_seconds",
        ]
        writer = csv.DictWriter(handle, fieldnames=[*fields, "test"])
        writer.writeheader()
        for r in results:
            writer.writerow({**{k: r[k] for k in fields}, "test": r["test"]})
    if "attributes" in args.data:
        plot(results, plan, args.out / "quality_vs_cost.png")
    print(table)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
