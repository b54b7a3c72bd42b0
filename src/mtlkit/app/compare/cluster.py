"""``mtlkit compare --launcher submitit``: the jobs of a grid as SLURM jobs, through `submitit
<https://github.com/facebookincubator/submitit>`_ (the ``submitit`` extra).

The plan is the one ``--jobs N`` runs (:func:`mtlkit.app.compare.command.run_grid`: finished
runs skipped, interrupted ones resumed, baselines first), and each job does the same
:func:`~mtlkit.app.compare.workers.execute` on its node that a worker process does: it claims
its run folder (so a run is never trained twice, whichever machine holds it), trains or resumes,
and returns its :class:`~mtlkit.app.compare.workers.Outcome`, which this process collects as
the jobs end; then ``results.csv`` is written from the run folders as always. The grid folder
must be on a file system the nodes share.

Options (the grid key ``submitit``, or the ``compare`` flags): ``partition``, ``time``
(minutes), ``gpus`` (per job), ``cpus`` (per job, also its torch threads), ``mem_gb``,
``account``, ``qos``, ``constraint``, and ``cluster``: ``slurm``, ``local`` (subprocesses on this
machine, submitit's ``LocalExecutor``: what the tests use) or ``debug`` (in this process); by
default submitit picks SLURM when ``sbatch`` is found, else local. ``--jobs N`` caps the jobs in
the queue at a time (default: all). submitit's files (scripts, pickles, each job's
``stdout``/``stderr``) go to ``OUT/submitit``.

A job that ends without a result (time limit, preemption, node failure) fails its run; a job
that SLURM stops at its time limit is requeued by submitit (the callable is ``Checkpointable``)
and resumes from the run's last ``checkpoint.pt``, so set ``checkpoint_every`` for long runs.
Ctrl-C cancels the jobs (SLURM sends SIGTERM, the local executor SIGINT): those training save a
checkpoint and stop, and the next ``mtlkit compare`` resumes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mtlkit.app.compare.workers import Job, Outcome
from mtlkit.errors import ConfigError, MtlkitError

LAUNCHERS = ("local", "submitit")
"""``local``: worker processes on this machine (``--jobs N``); ``submitit``: SLURM jobs."""
SUBMITIT_OPTIONS: dict[str, tuple[type, ...]] = {
    "cluster": (str,),
    "partition": (str,),
    "time": (int,),
    "gpus": (int,),
    "cpus": (int,),
    "mem_gb": (int, float),
    "account": (str,),
    "qos": (str,),
    "constraint": (str,),
}
"""The options of the submitit launcher and their types."""
CLUSTERS = ("slurm", "local", "debug")
POLL_SECONDS = 0.5


def require_submitit() -> Any:
    """The ``submitit`` module, or an error naming the extra to install."""
    try:
        import submitit
    except ImportError as error:
        raise MtlkitError(
            'mtlkit compare --launcher submitit needs submitit: pip install "mtlkit[submitit]" '
            f"(or pip install submitit) ({error})"
        ) from error
    return submitit


def check_submitit_options(options: Any) -> dict[str, Any]:
    """The ``submitit`` grid key, validated: known options of the right types and ranges.

    Raises:
        ConfigError: naming the option and what is valid.
    """
    if not isinstance(options, Mapping):
        raise ConfigError(f"submitit must be a mapping of options, got {options!r}")
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in SUBMITIT_OPTIONS:
            raise ConfigError(
                f"submitit has no option {key!r}; valid: {', '.join(SUBMITIT_OPTIONS)}"
            )
        if value is None:
            continue
        types = SUBMITIT_OPTIONS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"submitit.{key} must be {names}, got {value!r}")
        if key == "cluster" and value not in CLUSTERS:
            raise ConfigError(
                f"submitit.cluster must be one of {', '.join(CLUSTERS)}; got {value!r}"
            )
        if key in ("time", "cpus", "mem_gb") and not value > 0:
            raise ConfigError(f"submitit.{key} must be > 0, got {value!r}")
        if key == "gpus" and value < 0:
            raise ConfigError(f"submitit.gpus must be >= 0, got {value!r}")
        checked[key] = value
    return checked


def executor_parameters(options: Mapping[str, Any]) -> dict[str, Any]:
    """submitit's ``update_parameters`` arguments for the launcher ``options``."""
    names = {
        "time": "timeout_min",
        "gpus": "gpus_per_node",
        "cpus": "cpus_per_task",
        "mem_gb": "mem_gb",
        "partition": "slurm_partition",
        "account": "slurm_account",
        "qos": "slurm_qos",
        "constraint": "slurm_constraint",
    }
    params: dict[str, Any] = {"nodes": 1, "tasks_per_node": 1}
    params.update({names[k]: v for k, v in options.items() if k in names})
    return params


def run_in_submitit(
    plan: list[Job],
    options: Mapping[str, Any],
    folder: Path,
    jobs: int | None,
    record: Callable[[Job, Outcome], None],
    echo: Callable[[str], None] = print,
) -> bool:
    """Submit the jobs of ``plan`` (at most ``jobs`` in the queue at a time; ``None``: all) and
    record each outcome as its job ends; return whether it was interrupted (Ctrl-C: the jobs
    are cancelled and their outcomes collected). A job that raised (a bug) is raised here with
    its traceback, after the other jobs are cancelled."""
    submitit = require_submitit()
    from mtlkit.app.compare.cluster_job import GridJob

    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs with --launcher submitit must be >= 1 (jobs queued), got {jobs}")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.get("cluster"))
    executor.update_parameters(name="mtlkit", **executor_parameters(options))
    threads = options.get("cpus")
    waiting = list(plan)
    running: list[tuple[Any, Job]] = []
    interrupted = False
    cancelled = False

    def collect(handle: Any, job: Job) -> None:
        nonlocal interrupted
        try:
            outcome = handle.result()
        except submitit.core.utils.FailedJobError as error:
            if "Traceback" in str(error) and not cancelled:
                message = f"{job.name} crashed in its job {handle.job_id}:\n{error}"
                raise RuntimeError(message) from error
            outcome = Outcome(job.name, "failed", 0.0, f"job {handle.job_id} failed: {error}")
        except submitit.core.utils.UncompletedJobError as error:
            outcome = Outcome(
                job.name,
                "failed",
                0.0,
                f"job {handle.job_id} ended without a result (time limit? preempted? out of "
                f"memory?); see {handle.paths.stderr} ({str(error).splitlines()[0]})",
            )
        if cancelled and outcome.status == "failed":
            outcome = Outcome(job.name, "interrupted", outcome.seconds, "cancelled")
        interrupted |= outcome.status == "interrupted"
        record(job, outcome)

    try:
        while (waiting and not interrupted) or running:
            while waiting and not interrupted and (jobs is None or len(running) < jobs):
                job = waiting.pop(0)
                handle = executor.submit(GridJob(), job, threads)
                echo(f"{job.name}: submitted as job {handle.job_id} (logs in {folder})")
                running.append((handle, job))
            done = [(h, j) for h, j in running if h.done()]
            for pair in done:
                running.remove(pair)
                collect(*pair)
            if not done:
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        interrupted = cancelled = True
        for handle, _ in running:
            handle.cancel(check=False)
        for handle, job in running:
            collect(handle, job)
        running = []
    finally:
        for handle, _ in running:  # only after an error: leave no jobs behind
            handle.cancel(check=False)
    return interrupted
