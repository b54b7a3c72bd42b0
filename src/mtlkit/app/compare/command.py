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

from mtlkit.app.compare.cluster import (
    SUBMITIT_OPTIONS,
    check_submitit_options,
    require_submitit,
    run_in_submitit,
)
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
from mtlkit.app.compare.search import search_command
from mtlkit.app.compare.workers import Job, Outcome, execute, run_in_workers, wait_for_folder
from mtlkit.app.config import logger_override
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
    jobs: int | None = 1,
    echo: Callable[[str], None] = print,
) -> GridReport:
    """Train every run of ``grid`` not finished yet (and the baselines), then write the results
    and plots; see the module docstring. ``jobs``: runs at a time in worker processes (0: in
    this process; ``None``: 1), or with ``grid.launcher == "submitit"`` jobs in the queue at a
    time (``None``: all; :mod:`mtlkit.app.compare.cluster`)."""
    cluster = grid.launcher == "submitit"
    if cluster:
        require_submitit()
        if jobs is not None and jobs < 1:
            raise ConfigError(f"--jobs with --launcher submitit must be >= 1, got {jobs}")
    elif jobs is None:
        jobs = 1
    elif jobs < 0:
        raise ConfigError(f"jobs must be >= 0 (0: in this process), got {jobs}")
    quiet = cluster or (jobs or 0) > 1  # no interleaved progress bars
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
            config = dataclasses.replace(config, progress=False) if quiet else config
            plan.append(Job("stl", f"stl-seed{seed}", config.to_dict()))
    for spec in specs:
        folder = Path(str(spec.config.out))
        check_same_config(folder, spec.config, "run")
        if is_finished(folder, tasks):
            report.skipped.append(spec.name)
            continue
        config = spec.config
        if quiet:
            config = dataclasses.replace(config, progress=False)
        resume = (folder / "checkpoint.pt").is_file()
        plan.append(Job("run", spec.name, config.to_dict(), resume=resume))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "compare.yaml", grid.to_yaml())
    if not cluster and jobs > 1 and any(b.limits.get("seconds") for b in grid.budgets or []):
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

    submitit_dir = out_dir / "submitit"
    try:
        if cluster and plan:
            report.interrupted = run_in_submitit(
                plan, grid.submitit, submitit_dir, jobs, record, echo
            )
        elif jobs == 0:
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
            if cluster:  # finished by the holder, or resumed in a job of its own
                report.interrupted = run_in_submitit(
                    [job], grid.submitit, submitit_dir, 1, record, echo
                )
                continue
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
    overrides += logger_override(args.logger)
    grid = load_grid(args.config, overrides)
    if args.launcher is not None:
        grid.launcher = args.launcher
    flags = {k: getattr(args, f"submitit_{k}") for k in SUBMITIT_OPTIONS}
    flags = {k: v for k, v in flags.items() if v is not None}
    if flags and grid.launcher != "submitit":
        given = ", ".join(f"--{k.replace('_', '-')}" for k in flags)
        raise ConfigError(f"{given}: options of --launcher submitit (launcher is {grid.launcher})")
    grid.submitit = check_submitit_options({**grid.submitit, **flags})
    if args.print_config:
        print(grid.to_yaml(), end="")
        return 0
    if getattr(args, "search", None):  # a method search instead of the grid (.search)
        search_command(grid, args.search, echo=lambda line: print(line, flush=True))
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
