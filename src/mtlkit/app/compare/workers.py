"""The jobs of a compare grid and the pool of worker processes that does them: a fresh
(spawned) process per job, at most ``jobs`` at a time, Ctrl-C turned into checkpoints.

One writer per run folder: a job holds its run folder's lock
(:func:`mtlkit.training.run_dir.claim_run_dir`) and decides under it whether the run is finished
(by another process since the plan: nothing to do), interrupted (resume it) or new; a folder that
another process holds is not touched: the job comes back ``busy`` and is collected when that
process ends (:func:`wait_for_folder`), so two identical compares into one folder never train a
run twice.
"""

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
from mtlkit.app.runner import STL_BASELINE, claimed, run, run_stl
from mtlkit.errors import MtlkitError
from mtlkit.training.checkpoint import CHECKPOINT_NAME
from mtlkit.training.logs import WriteError, write_atomic
from mtlkit.training.run_dir import RunLock, RunLockedError, is_finished_run
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
    """How a job ended: done, failed (with the error), interrupted, or busy (another process
    holds its folder: ``error`` names it), and its seconds; ``note`` says how it was done."""

    name: str
    status: Literal["done", "failed", "interrupted", "busy"]
    seconds: float
    error: str | None = None
    note: str | None = None


def execute(job: Job, threads: int | None = None) -> Outcome:
    """Do ``job`` (in this process or in a worker): :func:`mtlkit.app.runner.run` (and the run's
    figures as ``plots`` says) or :func:`mtlkit.app.runner.run_stl`. User-level failures (an
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
        stl = job.kind == "stl"
        finished = (lambda f: (f / STL_BASELINE).is_file()) if stl else is_finished_run
        with claimed(out_dir, config, adopt=True):  # one writer; decided under the lock
            if finished(out_dir):
                seconds = time.perf_counter() - start
                return Outcome(job.name, "done", seconds, note="finished by another process")
            if stl:
                run_stl(config, out_dir)
            else:
                run(config, out_dir, resume=(out_dir / CHECKPOINT_NAME).is_file())  # + figures
    except RunLockedError as busy:  # not ours to touch (no error.txt either)
        holder = f"process {busy.pid}" if busy.pid is not None else "another process"
        return Outcome(job.name, "busy", time.perf_counter() - start, f"in use by {holder}")
    except TrainingInterrupted as stop:
        return Outcome(job.name, "interrupted", time.perf_counter() - start, str(stop))
    except MtlkitError as error:
        message = str(error)
        try:
            write_atomic(error_file, f"{type(error).__name__}: {error}\n")
        except WriteError as unwritten:  # a full disk: the outcome still says what failed
            message += f" ({error_file.name} not written: {unwritten})"
        return Outcome(job.name, "failed", time.perf_counter() - start, message)
    error_file.unlink(missing_ok=True)
    return Outcome(job.name, "done", time.perf_counter() - start)


def wait_for_folder(folder: Path) -> None:
    """Wait until no process holds the run folder ``folder`` (its lock; at once if none)."""
    if not folder.is_dir():
        return
    lock = RunLock(folder)
    lock.acquire(blocking=True)
    lock.release()


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
