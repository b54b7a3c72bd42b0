"""One writer per run folder (issue 27, item 2): a second ``mtlkit train`` into a folder another
process writes into is refused with exit 2 naming that process; two started together never both
exit 0; the lock goes with its holder, even on ``SIGKILL``; ``mtlkit compare`` leaves a run that
another process holds alone and collects it when that process ends, so two identical compares
into one folder never train a run twice. Before the fix both writers exited 0 ("results written
to X") and one run's results were gone."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from run_helpers import TINY, one_line_error, snapshot, summary, train

from mtlkit.app.compare import load_grid, run_grid

FORK = multiprocessing.get_context("fork")  # torch is imported already: a cheap child


def _hold(folder: str, conn) -> None:
    """A child that claims ``folder`` as a run would, says so, and holds it until told."""
    from mtlkit.training.run_dir import claim_run_dir

    with claim_run_dir(Path(folder), config_hash="another run"):
        conn.send("held")
        conn.recv()


class Holder:
    """Another process holding a run folder (:func:`_hold`)."""

    def __init__(self, folder: Path) -> None:
        self.conn, child = FORK.Pipe()
        self.process = FORK.Process(target=_hold, args=(str(folder), child))
        self.process.start()
        assert self.conn.poll(30) and self.conn.recv() == "held"

    @property
    def pid(self) -> int:
        return self.process.pid

    def release(self) -> None:
        if self.process.is_alive():
            self.conn.send("go")
        self.process.join(30)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = Holder(out)
    try:
        before = snapshot(out)
        assert train("--out", str(out), "steps=1", "epochs=null") == 2
        error = one_line_error(capsys)
        assert f"is in use: process {holder.pid} is writing into it" in error
        assert snapshot(out) == before
        assert train("--out", str(out), "steps=1", "epochs=null", "--check") == 2
        assert f"process {holder.pid}" in one_line_error(capsys)
    finally:
        holder.release()
    assert train("--out", str(out), "steps=1", "epochs=null") == 0  # free again


def test_the_lock_goes_with_a_killed_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = Holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.process.join(30)
    assert train("--out", str(out), "steps=1", "epochs=null") == 0


def _train_when_told(argv: list[str], stderr: str, event, conn) -> None:
    torch.set_num_threads(1)
    from mtlkit.app.cli import main

    with open(stderr, "w") as err:
        os.dup2(err.fileno(), 2)
        sys.stderr = err
        event.wait(30)
        conn.send(main(argv))


def test_two_writers_started_together_never_both_succeed(tmp_path):
    """The issue's case: ``--method ew`` and ``--method mgda --seed 1`` into one folder."""
    out = tmp_path / "run"
    out.mkdir()
    go = FORK.Event()
    runs = []
    for extra in (["--method", "ew"], ["--method", "mgda", "--seed", "1"]):
        argv = ["train", *TINY, "--out", str(out), "--epochs", "2", *extra]
        receive, send = FORK.Pipe(duplex=False)
        stderr = tmp_path / f"{extra[1]}.err"
        process = FORK.Process(target=_train_when_told, args=(argv, str(stderr), go, send))
        process.start()
        runs.append((process, receive, extra[1]))
    go.set()
    codes = {}
    for process, receive, method in runs:
        assert receive.poll(60)
        codes[method] = receive.recv()
        process.join(30)
    assert sorted(codes.values()) == [0, 2], codes
    winner, loser = sorted(codes, key=codes.get)
    assert summary(out)["config"]["method"] == winner  # the results are the winner's
    error = (tmp_path / f"{loser}.err").read_text()
    assert error.count("\n") == 1 and ("is in use: process" in error or "finished run" in error)


def test_claims_nest_in_one_process_and_are_checked_without_writing(tmp_path):
    from mtlkit.training.run_dir import RunLockedError, check_claim, claim_run_dir, holds

    out = tmp_path / "run"
    with claim_run_dir(out, config_hash="h") as marker:
        with claim_run_dir(out, config_hash="h") as inner:  # the CLI, then the run builder
            assert inner == marker and holds(out)
        assert holds(out)
    assert not holds(out)
    holder = Holder(out)
    try:
        with pytest.raises(RunLockedError, match=f"process {holder.pid}"):
            check_claim(out, resume=True)
    finally:
        holder.release()
    check_claim(out, resume=True)  # free, and a run folder


GRID = [
    *TINY,
    "epochs=1",
    "tasks=[left,sum]",
    "methods=[ew,mgda]",
    "strategies=[joint]",
    "seeds=[0]",
    "stl=once",
]


def test_compare_collects_a_run_another_process_holds(tmp_path):
    out = tmp_path / "grid"
    overrides = [a for a in GRID if not a.startswith("--")]
    grid = load_grid(None, [f"out={out}", "progress=false", *overrides])
    held = out / "runs" / "ew-joint-seed0"
    holder = Holder(held)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if "in use by" in line:
            holder.release()  # it ends without training: compare must do the run itself

    try:
        report = run_grid(grid, jobs=0, echo=echo)
    finally:
        holder.release()
    busy = f"ew-joint-seed0: in use by process {holder.pid}; collected when it ends"
    assert any(line.endswith(busy) for line in lines), lines
    assert any(re.match(r"\[\d/3\] ew-joint-seed0: done in", line) for line in lines)
    assert not report.failed and len(report.rows) == 2
    assert summary(held)["results"]["test"]["left"]["acc"] >= 0


@pytest.mark.slow  # two fresh interpreters training a small grid: about 15 s
def test_two_identical_compares_train_each_run_once(tmp_path):
    args = [a for a in GRID if a != "epochs=1"] + ["epochs=2", "data_args.n_train=1024"]
    command = [sys.executable, "-m", "mtlkit", "compare", "--jobs", "0", "--out", "grid", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    for job in ("stl-seed0", "ew-joint-seed0", "mgda-joint-seed0"):
        trained = [
            line
            for output in outputs
            for line in output.splitlines()
            if f"] {job}: done in" in line and "finished by another process" not in line
        ]
        assert len(trained) == 1, (job, outputs)


def test_a_failed_claim_removes_the_folders_it_made_and_nothing_else(tmp_path):
    from mtlkit.errors import ConfigError
    from mtlkit.training.run_dir import claim_run_dir

    deep = tmp_path / "a" / "b" / "run"
    with (
        pytest.raises(ConfigError, match="found with the data"),
        claim_run_dir(deep, config_hash="h"),
    ):
        assert (deep / ".mtlkit-run.json").is_file()
        raise ConfigError("found with the data")
    assert not (tmp_path / "a").exists()  # the claim made a/b/run: all three gone
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ConfigError), claim_run_dir(existing, config_hash="h"):
        raise ConfigError("found with the data")
    assert existing.is_dir()  # the user's folder stays
    kept = tmp_path / "kept"
    with pytest.raises(ConfigError), claim_run_dir(kept, config_hash="h"):
        (kept / "steps.csv").write_text("step\n")
        raise ConfigError("after the first write")
    assert (kept / "steps.csv").is_file() and (kept / ".mtlkit-run.json").is_file()
    fine = tmp_path / "fine"
    with claim_run_dir(fine, config_hash="h"):
        pass
    assert (fine / ".mtlkit-run.json").is_file()  # no error: the run folder stays


def test_a_lock_file_removed_by_its_holder_is_not_locked_by_a_waiter(tmp_path):
    from mtlkit.training.run_dir import RunLock, _same_file

    lock = RunLock(tmp_path)
    lock.acquire()
    fd = os.open(lock.path, os.O_RDWR)  # a waiter that opened the file before it went
    try:
        assert _same_file(fd, lock.path)
        lock.release(remove=True)
        assert not _same_file(fd, lock.path)  # gone: the waiter must not count it as the lock
        again = RunLock(tmp_path)
        again.acquire()  # opens (creates) the new lock file
        assert not _same_file(fd, lock.path) and again.held
        again.release()
    finally:
        os.close(fd)
