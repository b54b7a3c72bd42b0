"""The jobs of a compare grid and the pool of worker processes that does them: a fresh
(spawned) process per job, at most ``jobs`` at a time, Ctrl-C turned into checkpoints."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal

import torch

from mtlkit.app.config import TrainConfig
from mtlkit.app.runner import draw_plots, run, run_stl
from mtlkit.errors import MtlkitError
from mtlkit.training.logs import write_atomic
from mtlkit.training.trainer import TrainingInterrupted


@dataclass(frozen=True)
class Job:
    """One unit of work for a worker: a run, or the single-task baselines of one seed."""

    kind: Literal["run", "stl"]
    name: str
    config: dict[str, Any]
    resume: bool = False


@dataclass
class Outcome:
    """How a job ended: done, failed (with the error) or interrupted, and its seconds."""

    name: str
    status: Literal["done", "failed", "interrupted"]
    seconds: float
    error: str | None = None


def execute(job: Job, threads: int | None = None) -> Outcome:
    """Do ``job`` (in this process or in a worker): :func:`mtlkit.app.runner.run` (and the run's
    plots when ``plots``) or :func:`mtlkit.app.runner.run_stl`. User-level failures (an
    :class:`MtlkitError`, e.g. a loss that became NaN) are returned, and written to the run
    folder's ``error.txt``; a bug propagates."""
    if threads is not None:
        torch.set_num_threads(threads)
    config = TrainConfig(**job.config)
    out_dir = Path(str(config.out))
    if config.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # each run's own peak (jobs=0)
    start = time.perf_counter()
    error_file = out_dir / "error.txt"
    try:
        if job.kind == "stl":
            run_stl(config, out_dir)
        else:
            run(config, out_dir, resume=job.resume)
            if config.plots:
                draw_plots(out_dir)
    except TrainingInterrupted as stop:
        return Outcome(job.name, "interrupted", time.perf_counter() - start, str(stop))
    except MtlkitError as error:
        write_atomic(error_file, f"{type(error).__name__}: {error}\n")
        return Outcome(job.name, "failed", time.perf_counter() - start, str(error))
    error_file.unlink(missing_ok=True)
    return Outcome(job.name, "done", time.perf_counter() - start)


def _worker(job: Job, threads: int, conn: Connection) -> None:
    """A worker process: :func:`execute` ``job`` and send back ``("outcome", Outcome)``, or
    ``("crash", traceback)`` for a bug. It starts with Ctrl-C ignored (inherited, so that a
    Ctrl-C while it imports is no traceback); during ``fit`` the Trainer's handler checkpoints
    and stops the run on SIGINT or SIGTERM."""
    try:
        conn.send(("outcome", execute(job, threads)))
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
    finally:
        conn.close()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while a worker is started: a process started with SIGINT ignored keeps it
    ignored (Python then installs no KeyboardInterrupt handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_in_workers(plan: list[Job], jobs: int, record: Callable[[Job, Outcome], None]) -> bool:
    """Run ``plan`` in at most ``jobs`` worker processes at a time, a fresh (spawned) one per
    job; return whether it was interrupted. On Ctrl-C no new job starts, and the running ones get
    SIGTERM: those training save a checkpoint and stop, the others end (and start over next
    time). A worker that dies (killed, out of memory) fails its run; a bug in a worker is raised
    here with the worker's traceback."""
    threads = max(1, available_cpus() // jobs)
    context = multiprocessing.get_context("spawn")
    waiting = list(plan)
    running: dict[Connection, tuple[Any, Job]] = {}  # result pipe -> process, job
    interrupted = False

    def finish(conn: Connection) -> None:
        """Collect a worker's result (waiting for it if need be) or notice its death."""
        nonlocal interrupted
        process, job = running.pop(conn)
        try:
            message = conn.recv()
        except EOFError:  # the worker ended without an answer
            message = None
        conn.close()
        process.join()
        if message is None:
            code = process.exitcode
            died = f"its worker process died (exit code {code}; killed? out of memory?)"
            outcome = Outcome(job.name, "failed", 0.0, died)
            if code == -signal.SIGTERM and interrupted:
                outcome = Outcome(job.name, "interrupted", 0.0, "stopped before training")
        elif message[0] == "crash":
            raise RuntimeError(f"{job.name} crashed in its worker process:\n{message[1]}")
        else:
            outcome = message[1]
        interrupted |= outcome.status == "interrupted"
        record(job, outcome)

    try:
        while (waiting and not interrupted) or running:
            while waiting and not interrupted and len(running) < jobs:
                job = waiting.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(job, threads, send))
                with _sigint_ignored():
                    process.start()
                send.close()  # so that the worker's end closing is an EOF here
                running[receive] = (process, job)
            for conn in wait(list(running)):
                finish(conn)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        interrupted = True
        for process, _ in running.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for conn in list(running):
            finish(conn)
    finally:
        for process, _ in running.values():  # only after an error: leave no orphans
            process.kill()
            process.join()
    return interrupted
