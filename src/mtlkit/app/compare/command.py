"""``mtlkit compare``: :func:`run_grid` trains what is not finished and writes the results;
:func:`compare_command` is the subcommand around it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlkit.app.compare.folders import check_same_config, is_finished
from mtlkit.app.compare.grid import Grid, load_grid, stl_dir
from mtlkit.app.compare.references import load_references, reference_markdown, write_references
from mtlkit.app.compare.report import (
    aggregate,
    batches_per_epoch,
    collect_rows,
    delta_m_note,
    format_table,
    load_baselines,
    write_results,
)
from mtlkit.app.compare.workers import Job, Outcome, execute, run_in_workers, wait_for_folder
from mtlkit.app.runner import STL_BASELINE, check_baseline, load_baseline, load_problem
from mtlkit.errors import ConfigError
from mtlkit.tasks import Task
from mtlkit.training.logs import write_atomic

EXIT_FAILED_RUNS = 1
EXIT_INTERRUPTED = 130


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
    references: list[str] = field(default_factory=list)  # the published tables beside ours

    @property
    def executed(self) -> list[str]:
        return [o.name for o in self.outcomes]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


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
    tables = load_references(grid.base.references, tasks)  # checked before any run
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

    busy: list[Job] = []  # held by another process: collected when it ends

    def record(job: Job, outcome: Outcome) -> None:
        nonlocal done
        if outcome.status == "busy":
            busy.append(job)
            echo(f"[{done}/{total}] {job.name}: {outcome.error}; collected when it ends")
            return
        done += 1
        report.outcomes.append(outcome)
        verb = {"done": "done", "failed": "FAILED", "interrupted": "interrupted"}[outcome.status]
        how = " (resumed)" if job.resume else ""
        line = f"[{done}/{total}] {job.name}{how}: {verb} in {outcome.seconds:.1f} s"
        if outcome.status == "done" and job.kind == "run":
            seed = grid.baseline_seed(job.config["seed"])
            baseline = grid.base.baseline or stl_dir(out_dir, seed) / STL_BASELINE
            line += delta_m_note(Path(job.config["out"]), tasks, Path(baseline))
        if outcome.error:
            line += f": {outcome.error}"
        if outcome.note:
            line += f" ({outcome.note})"
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
            report.interrupted = run_in_workers(plan, jobs, record)
        while busy and not report.interrupted:  # in this process, once its holder has ended
            job = busy.pop(0)
            wait_for_folder(Path(job.config["out"]))
            outcome = execute(job)  # finished by the holder, or resumed here
            record(job, outcome)
            report.interrupted = outcome.status == "interrupted"
    except KeyboardInterrupt:
        report.interrupted = True
    baselines = load_baselines(grid, out_dir, external)
    epoch_batches = batches_per_epoch(problem, grid.base)
    report.rows = collect_rows(grid, specs, tasks, baselines, epoch_batches)
    groups = aggregate(grid, report.rows, tasks)
    report.references = reference_markdown(tables, grid, groups, baselines)
    report.written = write_results(
        grid, report.rows, tasks, out_dir, baselines, echo, appendix=report.references
    )
    if tables:
        report.written.append(write_references(tables, grid, groups, baselines, out_dir))
    return report


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
    print("\n".join(format_table(grid, report.rows, report.tasks) + report.references))
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
