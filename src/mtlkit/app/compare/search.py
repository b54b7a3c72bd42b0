"""Method search at a fixed total budget: ``mtlkit compare --search halving|grid|ls``.

The compare config's ``search`` key (a mapping) sets the budget and the search; the arms are its
``methods`` x ``strategies`` (each method entry with its arguments: list one entry per value of
its main hyperparameter, or expand one with ``sweep: {cagrad: {c: [0.2, 0.5]}}``), trained for
every seed of ``seeds``. Every budget is in epochs summed over every run the search trains (arms
x seeds, and the trials of ``ls``), so methods and searches are compared at equal epochs; each
result also reports the forward and backward passes spent (``forward_backward``), since methods
differ in cost per epoch.

* ``halving``: successive halving (Jamieson & Talwalkar, AISTATS 2016; Karnin et al., ICML 2013):
  ``R = ceil(log_eta(n))`` rounds for ``n`` arms; in round ``r`` each of the ``n_r`` surviving arms
  trains ``floor(epochs / (R n_r S))`` more epochs on each of the ``S`` seeds (continuing from its
  checkpoint), is scored on the validation split (the config's ``select`` criterion of its
  selected model, mean over seeds; lower is better), and the best ``ceil(n_r / eta)`` go on.
  The ranking: by the round an arm reached, then by its score there. A survivor trained on from
  its end-of-run checkpoint is not the same run as one trained straight to those epochs (the
  first epoch after the resume repeats the shuffle order of the first epoch:
  ``benchmarks/results/search_multidigits.md``).
* ``grid``: every arm trained ``full_epochs`` on every seed (the full grid the halving ranking
  is checked against), ranked by score.
* ``ls``: a tuned fixed-weight baseline: linear scalarisation ``Σ_i w_i L_i`` (``ls``) with
  ``trials`` weight vectors (``mode: random``: Dirichlet(1) draws scaled to sum to ``m``, seeded by
  ``search_seed``; ``grid``: the simplex lattice of step ``1/resolution``, scaled to sum to ``m``),
  each trained ``trial_epochs`` on every seed; the best by mean validation score is trained on to
  ``epochs - (trials - 1) * trial_epochs`` epochs, so the search and the final run together spend
  exactly ``epochs`` per seed (``equal compute`` with a method trained ``epochs``).

Written to ``OUT/search-<kind>/``: the runs, ``search.json`` (every arm's scores per round, its
test metrics, its cost; the ranking, the budget spent) and ``search.md`` (the ranking with 95%
confidence intervals of the score over seeds).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtlkit.app.compare.grid import Entry, Grid, format_number
from mtlkit.app.compare.report import confidence_interval
from mtlkit.app.compare.search_spec import SEARCH_KINDS, SearchSpec
from mtlkit.app.config import BUDGET_KEYS, TrainConfig
from mtlkit.app.runner import load_problem, run
from mtlkit.errors import ConfigError
from mtlkit.methods import METHODS
from mtlkit.tasks import Task
from mtlkit.training.evaluation import Selection
from mtlkit.training.logs import write_atomic, write_json_atomic

_KEEP_LAST = 10**9  # checkpoint_every: only the end-of-fit checkpoint, to train on later


@dataclass
class Arm:
    """One candidate: a method entry and a strategy entry, its rounds' scores and its runs."""

    label: str
    method: Entry
    strategy: Entry
    epochs: int = 0  # per seed, so far
    scores: list[list[float]] = field(default_factory=list)  # per round, per seed
    round: int = 0  # rounds survived
    summaries: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> summary.json

    def mean(self) -> float:
        return statistics.fmean(self.scores[-1])

    def row(self, tasks: Sequence[Task], best: Arm | None = None) -> dict[str, Any]:
        """The arm's entry of ``search.json``; with ``best``, the paired gap to it (per seed,
        at the last round this arm reached)."""
        low, high = confidence_interval(self.scores[-1])
        gaps = [a - b for a, b in zip(self.scores[-1], (best or self).scores[len(self.scores) - 1])]
        gap_low, gap_high = confidence_interval(gaps)
        test = [s["results"].get("test", {}) for s in self.summaries.values()]
        cost = [s["cost"] for s in self.summaries.values()]
        metrics = {
            f"{t.name}/{m}": statistics.fmean(r[t.name][m] for r in test)
            for t in tasks
            for m in t.metrics
            if all(t.name in r for r in test)
        }
        return {
            "arm": self.label,
            "method": self.method.name,
            "method_args": self.method.args,
            "strategy": self.strategy.label,
            "rounds": self.round,
            "epochs_per_seed": self.epochs,
            "score": self.mean(),
            "score_ci95": [low, high],
            "gap_to_best": statistics.fmean(gaps),
            "gap_ci95": [gap_low, gap_high],
            "scores": self.scores,
            "test": metrics,
            "epochs": sum(c["epochs"] for c in cost),
            "forward_backward": sum(c["passes"] + c["backwards"] for c in cost),
        }


class Runner:
    """Trains an arm's run of one seed on to a number of epochs (continuing its checkpoint) and
    scores its selected model on the validation split."""

    def __init__(self, grid: Grid, out_dir: Path, echo: Callable[[str], None]) -> None:
        self.grid = grid
        self.out_dir = out_dir
        self.echo = echo
        self.problem = load_problem(dataclasses.replace(grid.base, seed=grid.seeds[0]), None)
        self.tasks = list(self.problem.tasks)
        self.selection = Selection(grid.base.select, self.tasks)

    def config(self, arm: Arm, seed: int, epochs: int) -> TrainConfig:
        budget = dict.fromkeys(BUDGET_KEYS)
        budget["epochs"] = epochs
        return dataclasses.replace(
            self.grid.base,
            method=arm.method.name,
            method_args=dict(arm.method.args),
            strategy=arm.strategy.name,
            strategy_args=dict(arm.strategy.args),
            seed=seed,
            out=str(self.folder(arm, seed)),
            baseline=None,
            checkpoint_every=_KEEP_LAST,
            plots=False,
            **budget,
        )

    def folder(self, arm: Arm, seed: int) -> Path:
        return self.out_dir / "runs" / f"{arm.label}-seed{seed}"

    def train(self, arm: Arm, epochs: int) -> list[float]:
        """Every seed of ``arm`` on to ``epochs`` epochs; the validation scores."""
        scores = []
        for seed in self.grid.seeds:
            folder = self.folder(arm, seed)
            summary = _read(folder / "summary.json")
            done = summary is not None and summary["cost"]["epochs"] >= epochs
            if not done:
                resume = (folder / "checkpoint.pt").is_file()
                run(self.config(arm, seed, epochs), folder, resume=resume, problem=None)
                summary = _read(folder / "summary.json")
            assert summary is not None
            arm.summaries[seed] = summary
            scores.append(self.selection.score(summary["results"]["val"], summary["best_epoch"]))
        arm.epochs = epochs
        arm.scores.append(scores)
        self.echo(
            f"  {arm.label}: {epochs} epoch(s)/seed, val score {statistics.fmean(scores):.4f}"
        )
        return scores


def arms_of(grid: Grid, spec: SearchSpec) -> list[Arm]:
    """The methods (expanded by ``sweep``) x strategies of the grid."""
    methods: list[Entry] = []
    for entry in grid.methods:
        sweep = spec.sweep.get(entry.name)
        if not sweep:
            methods.append(entry)
            continue
        keys = list(sweep)
        for values in itertools.product(*(sweep[k] for k in keys)):
            args = {**entry.args, **dict(zip(keys, values))}
            METHODS.get(entry.name, **args)  # checked before anything trains
            label = "_".join(
                [entry.label]
                + [
                    f"{k}{format_number(v) if isinstance(v, float) else v}"
                    for k, v in zip(keys, values)
                ]
            )
            methods.append(Entry(entry.name, args, label))
    unknown = sorted(set(spec.sweep) - {m.name for m in grid.methods})
    if unknown:
        raise ConfigError(f"search.sweep names method(s) {unknown} that methods does not list")
    arms = []
    for method, strategy in itertools.product(methods, grid.strategies):
        label = method.label if len(grid.strategies) == 1 else f"{method.label}-{strategy.label}"
        arms.append(Arm(label, method, strategy))
    return arms


# ------------------------------------------------------------------------- searches
def successive_halving(arms: list[Arm], runner: Runner, spec: SearchSpec) -> list[Arm]:
    """Train and halve ``arms`` (module docstring); the arms, best first."""
    budget = spec.need("epochs", "halving")
    seeds = len(runner.grid.seeds)
    rounds = max(1, math.ceil(math.log(len(arms)) / math.log(spec.eta) - 1e-9))
    survivors = list(arms)
    for r in range(rounds):
        more = budget // (rounds * len(survivors) * seeds)
        if more < 1:
            need = rounds * len(survivors) * seeds
            raise ConfigError(
                f"search.epochs={budget} gives round {r + 1} of {rounds} less than one epoch per "
                f"run ({len(survivors)} arms x {seeds} seeds); give at least {need}"
            )
        runner.echo(f"round {r + 1}/{rounds}: {len(survivors)} arm(s), +{more} epoch(s) each")
        for arm in survivors:
            runner.train(arm, arm.epochs + more)
            arm.round = r + 1
        survivors.sort(key=Arm.mean)
        survivors = survivors[: math.ceil(len(survivors) / spec.eta)]
    return sorted(arms, key=lambda a: (-a.round, a.mean()))


def full_grid(arms: list[Arm], runner: Runner, spec: SearchSpec) -> list[Arm]:
    """Every arm trained ``full_epochs``; the arms, best first."""
    epochs = spec.need("full_epochs", "grid")
    for arm in arms:
        runner.train(arm, epochs)
        arm.round = 1
    return sorted(arms, key=Arm.mean)


def ls_weights(spec: SearchSpec, m: int) -> list[list[float]]:
    """The weight vectors of ``ls`` (each sums to ``m``, as EW's ones do)."""
    if spec.mode == "grid":
        r = spec.resolution
        points = [
            [b - a - 1 for a, b in zip((-1, *cuts), (*cuts, r + m - 1))]
            for cuts in itertools.combinations(range(r + m - 1), m - 1)
        ]
        return [[m * p / r for p in point] for point in points]
    generator = torch.Generator().manual_seed(spec.search_seed)
    draws = -torch.rand(spec.trials, m, generator=generator, dtype=torch.float64).log()
    return (m * draws / draws.sum(1, keepdim=True)).tolist()  # Dirichlet(1): normalised Exp(1)


def ls_search(runner: Runner, spec: SearchSpec) -> tuple[list[Arm], Arm]:
    """The trials of ``ls`` and the final run (the best trial trained on); see the docstring."""
    total = spec.need("epochs", "ls")
    m = len(runner.tasks)
    weights = ls_weights(spec, m)
    final = total - (len(weights) - 1) * spec.trial_epochs
    if final < spec.trial_epochs:
        raise ConfigError(
            f"search.epochs={total} cannot hold {len(weights)} trials of "
            f"{spec.trial_epochs} epoch(s) and a final run; give at least "
            f"{len(weights) * spec.trial_epochs}"
        )
    strategy = runner.grid.strategies[0]
    arms = []
    for n, w in enumerate(weights):
        entry = Entry("ls", {"weights": [round(v, 4) for v in w]}, f"ls_trial{n}")
        arm = Arm(entry.label, entry, strategy)
        runner.train(arm, spec.trial_epochs)
        arm.round = 1
        arms.append(arm)
    arms.sort(key=Arm.mean)
    best = arms[0]
    runner.echo(f"best weights {best.method.args['weights']}: trained on to {final} epochs")
    runner.train(best, final)
    best.round = 2
    return arms, best


# ------------------------------------------------------------------------- reports
def search_command(
    grid: Grid,
    kind: str,
    settings: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run the ``kind`` search of ``grid`` with ``settings`` (the ``search`` mapping; the
    grid's own by default); write and return ``OUT/search-<kind>/search.json`` (and
    ``search.md``)."""
    if kind not in SEARCH_KINDS:
        raise ConfigError(f"--search must be one of {', '.join(SEARCH_KINDS)}; got {kind!r}")
    spec = SearchSpec.parse(settings if settings is not None else getattr(grid, "search", None))
    out_dir = grid.out_dir() / f"search-{kind}"
    runner = Runner(grid, out_dir, echo)
    extra: dict[str, Any] = {}
    if kind == "ls":
        ranked, best = ls_search(runner, spec)
        extra["final"] = best.row(runner.tasks)
        extra["weights"] = best.method.args["weights"]
    else:
        arms = arms_of(grid, spec)
        search = successive_halving if kind == "halving" else full_grid
        ranked = search(arms, runner, spec)
    rows = [arm.row(runner.tasks, ranked[0]) for arm in ranked]
    report = {
        "kind": kind,
        "search": dataclasses.asdict(spec),
        "seeds": list(grid.seeds),
        "select": grid.base.select,
        "ranking": [r["arm"] for r in rows],
        "arms": rows,
        # epochs in all: ls's budget is per seed, the grid's is what it spent
        "budget": {"halving": spec.epochs, "ls": (spec.epochs or 0) * len(grid.seeds)}.get(
            kind, sum(r["epochs"] for r in rows)
        ),
        "epochs": sum(r["epochs"] for r in rows),
        "forward_backward": sum(r["forward_backward"] for r in rows),
        **extra,
    }
    write_json_atomic(out_dir / "search.json", report)
    write_atomic(out_dir / "search.md", search_markdown(report))
    echo(search_markdown(report))
    return out_dir / "search.json"


def search_markdown(report: Mapping[str, Any]) -> str:
    """The ranking of a ``search.json`` as a Markdown table."""
    lines = [
        f"# {report['kind']} search ({len(report['seeds'])} seed(s), select {report['select']})",
        "",
        f"Budget: {report['budget']} epochs; spent {report['epochs']} epochs, "
        f"{report['forward_backward']} forward+backward passes (every run, every seed).",
        "",
        "Score: the validation score of the selected model (lower is better), mean over seeds; "
        "gap: the paired difference to the first arm at the last round the arm reached.",
        "",
        "| rank | arm | rounds | epochs/seed | val score | 95% CI | gap | gap 95% CI | test |",
        "|---:|---|---:|---:|---:|---|---:|---|---|",
    ]
    for n, row in enumerate(report["arms"], 1):
        test = ", ".join(f"{k} {v:.4f}" for k, v in row["test"].items())
        lines.append(
            f"| {n} | {row['arm']} | {row['rounds']} | {row['epochs_per_seed']} | "
            f"{row['score']:.4f} | {_interval(row['score_ci95'])} | {row['gap_to_best']:+.4f} | "
            f"{_interval(row['gap_ci95'])} | {test} |"
        )
    if "weights" in report:
        lines += ["", f"Selected weights: {report['weights']}"]
    return "\n".join(lines) + "\n"


def _interval(bounds: Sequence[float]) -> str:
    low, high = bounds
    return "n/a" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"


def kendall_tau(a: Sequence[str], b: Sequence[str]) -> float:
    """Kendall's rank correlation of two rankings of the same arms (1: same order)."""
    if sorted(a) != sorted(b):
        raise ConfigError(f"the rankings hold different arms: {sorted(a)} vs {sorted(b)}")
    pos = {x: i for i, x in enumerate(b)}
    pairs = list(itertools.combinations(a, 2))
    if not pairs:
        return 1.0
    concordant = sum(1 if pos[x] < pos[y] else -1 for x, y in pairs)
    return concordant / len(pairs)


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return summary if "val" in summary.get("results", {}) else None
