"""Runs of ``mtlkit train`` killed with SIGKILL at random moments, then resumed, end exactly
where an uninterrupted run ends, and no kill leaves a file that breaks ``--resume`` or the skip
logic of ``mtlkit compare`` (issue 11).

Each cycle starts ``mtlkit train`` (``--resume RUN`` once the run folder holds its config) in a
child process and kills it with SIGKILL after a random time drawn from the length of a whole
run, so that kills land everywhere: at start-up, before the first checkpoint, while training
and writing checkpoints and logs, while evaluating and writing the results. After every kill the
files left are checked (checkpoint loadable, summary readable, ``compare`` counts the run as
finished only with the reference's results, and would not refuse the folder). After its kills a
run is resumed until it exits by itself; its final weights, results and step log must equal an
uninterrupted run's exactly, and no temporary file of an interrupted write may remain. The
default run has 10 kills; ``pytest -m slow`` has 500.

The kill cycles run in children forked from a server that has imported torch and mtlkit already
(``multiprocessing`` "forkserver"), so that a cycle costs the run, not torch's import; one
test resumes through ``python -m mtlkit`` in a fresh interpreter.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from mtlkit.app.compare import check_same_config, is_finished
from mtlkit.app.config import load_config
from mtlkit.data.benchmarks import DATASETS
from mtlkit.training.checkpoint import CHECKPOINT_NAME, MODEL_NAME, load_checkpoint

SMALL = {"n_train": 320, "n_val": 64, "n_test": 64}  # 5 batches of 64 per epoch
# route=loop: route=auto picks the loop or the Gramian route by timing the first steps, which
# may differ between the reference process and the killed ones (the routes round differently).
TRAIN = [
    "train", "--no-progress", "--epochs", "3", "--method", "pcgrad", "plots=false",
    "checkpoint_every=1", "route=loop", *(f"data_args.{k}={v}" for k, v in SMALL.items()),
]  # fmt: skip


def _train(argv: list[str]) -> None:
    """A child process: ``mtlkit train`` with ``argv``, output discarded; exits with its code."""
    output = os.open(os.devnull, os.O_WRONLY)
    os.dup2(output, 1)
    os.dup2(output, 2)
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the subprocess: same arithmetic
    tqdm.set_lock(threading.RLock())  # not its multiprocessing lock, which a kill would leak
    from mtlkit.app.cli import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def context():
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo: the first optimizer imports it (~2 s), in every run otherwise
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "mtlkit.app.cli"])
    return ctx


@dataclass
class Reference:
    """An uninterrupted run: its folder, and the seconds it took in a forked child from the start
    (``total``) and from writing ``config.yaml``, when training begins (``training``)."""

    folder: Path
    total: float
    training: float


@pytest.fixture(scope="module")
def reference(context, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "run"
    warm_up = context.Process(target=_train, args=(["list"],))  # starts the server
    warm_up.start()
    warm_up.join()
    start = time.monotonic()
    process = context.Process(target=_train, args=([*TRAIN, "--out", str(folder)],))
    process.start()
    begun = wait_for_config(process, folder, None)
    process.join()
    assert process.exitcode == 0
    end = time.monotonic()
    return Reference(folder, end - start, end - begun)


def config_version(folder: Path) -> tuple[int, int] | None:
    try:
        stat = (folder / "config.yaml").stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns  # a new file each write (atomic rename)


def wait_for_config(process, folder: Path, previous: tuple[int, int] | None) -> float:
    """Wait until the run writes its ``config.yaml`` (it then starts training) or ends."""
    while config_version(folder) == previous and process.exitcode is None:
        time.sleep(0.002)
    return time.monotonic()


def read_summary(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None  # never torn: must parse


def check_left_files(folder: Path, ref: Path, tasks, steps: int) -> str:
    """Check what a kill left in ``folder``; return the phase the run was in."""
    if not (folder / "config.yaml").exists():
        return "start-up"
    config = load_config(folder / "config.yaml", [])
    expected = load_config(ref / "config.yaml", [f"out={folder}"])
    assert config == expected
    check_same_config(folder, expected, "run")  # compare would not refuse the folder
    summary = read_summary(folder)
    if is_finished(folder, tasks):  # compare would skip it: it must hold the final results
        assert summary["results"] == read_summary(ref)["results"]
        return "finished"
    assert summary is None or "test" not in summary["results"]
    if not (folder / CHECKPOINT_NAME).exists():
        return "before the first checkpoint"
    state = load_checkpoint(folder)  # never torn
    return "training" if state["progress"]["steps"] < steps else "evaluating"


def command(folder: Path) -> list[str]:
    """Resume the run in ``folder``, or start it when the run had not yet written its config."""
    if (folder / "config.yaml").exists():
        return [*TRAIN[:2], "--resume", str(folder)]
    return [*TRAIN, "--out", str(folder)]


def kill_and_resume(context, reference, folder: Path, rng: random.Random, max_kills: int):
    """Kill/resume cycles in ``folder`` until ``max_kills`` kills or a run that ends by itself;
    then one more resume that finishes the run. Returns the phases the kills hit."""
    ref = reference.folder
    tasks = DATASETS.get("multidigits", seed=0, **SMALL).tasks
    steps = read_summary(ref)["cost"]["steps"]
    phases: Counter[str] = Counter()
    for last in [False] * max_kills + [True]:
        argv = command(folder)
        process = context.Process(target=_train, args=(argv,))
        previous = config_version(folder)
        process.start()
        if last:
            process.join()
        elif rng.random() < 0.25:  # any moment, start-up included
            process.join(rng.uniform(0.0, reference.total))
        else:  # a moment of training, evaluation or writing the results
            wait_for_config(process, folder, previous)
            process.join(rng.uniform(0.0, reference.training))
        if process.exitcode is None:
            process.kill()
            process.join()
        if process.exitcode == -9:
            phases[check_left_files(folder, ref, tasks, steps)] += 1
            continue
        assert process.exitcode == 0, f"mtlkit train {argv} failed after kills {dict(phases)}"
        break
    assert is_finished(folder, tasks)
    assert_same_run(ref, folder)
    return phases


def kill_cycles(context, reference, root: Path, seed: int, kills: int, max_runs: int):
    """Runs in ``root/run<k>``, each killed and resumed, until ``kills`` kills in all (a run
    may end by itself before it is killed: the next run starts)."""
    rng = random.Random(seed)
    phases: Counter[str] = Counter()
    runs = 0
    while sum(phases.values()) < kills and runs < max_runs:
        left = kills - sum(phases.values())
        phases += kill_and_resume(context, reference, root / f"run{runs}", rng, left)
        shutil.rmtree(root / f"run{runs}")  # checked; 500 runs would hold about 1 GB
        runs += 1
    print(
        f"\nkill/resume: reference run {reference.total:.2f} s ({reference.training:.2f} s "
        f"from its config.yaml); {runs} run(s), "
        f"{sum(phases.values())} SIGKILLs survived, by phase: {dict(phases)}"
    )
    return phases


def assert_same_run(ref: Path, run: Path) -> None:
    a, b = load_checkpoint(ref / MODEL_NAME)["model"], load_checkpoint(run / MODEL_NAME)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    final = load_checkpoint(ref)["model"], load_checkpoint(run)["model"]  # the last weights
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key
    summaries = read_summary(ref), read_summary(run)
    assert summaries[0]["results"] == summaries[1]["results"]
    assert summaries[0]["best_epoch"] == summaries[1]["best_epoch"]
    for key in ("epochs", "steps", "passes", "batches", "backwards", "path_length"):
        assert summaries[0]["cost"][key] == summaries[1]["cost"][key], key
    assert (ref / "steps.csv").read_text() == (run / "steps.csv").read_text()
    metrics = [(f / "metrics.csv").read_text().splitlines() for f in (ref, run)]
    assert len(metrics[0]) == len(metrics[1])  # (its seconds columns differ)
    assert not list(run.glob(".*.tmp"))  # the partial files of killed writes are cleaned up


def test_killed_runs_resume_to_the_uninterrupted_result(context, reference, tmp_path):
    phases = kill_cycles(context, reference, tmp_path, seed=0, kills=10, max_runs=20)
    assert sum(phases.values()) == 10


@pytest.mark.slow
def test_many_kill_resume_cycles(context, reference, tmp_path):
    phases = kill_cycles(context, reference, tmp_path, seed=1, kills=500, max_runs=500)
    assert sum(phases.values()) == 500
    assert {"start-up", "training", "evaluating"} <= set(phases)


def test_resume_before_the_first_checkpoint_starts_over(reference, tmp_path):
    ref = reference.folder
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("config.yaml", ".mtlkit-run.json"):  # a run folder killed before a checkpoint
        (folder / name).write_text((ref / name).read_text())
    (folder / ".checkpoint.pt.mtlkit-abcd1234.tmp").write_bytes(b"torn")  # a killed write's
    (folder / ".notes.tmp").write_text("the user's")  # not mtlkit's: left alone
    done = subprocess.run(  # the real entry point, in a fresh interpreter
        [sys.executable, "-m", "mtlkit", *TRAIN[:2], "--resume", str(folder)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "no checkpoint.pt in" in done.stderr
    assert "training it from the start" in done.stderr
    assert "Traceback" not in done.stderr
    (folder / ".notes.tmp").unlink()
    assert_same_run(ref, folder)
