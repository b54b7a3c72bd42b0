"""Clean errors (issue 27, items 11 and 12): ``mtlkit train --check`` validates a run (names,
arguments, run folder, data root, sizes, one dry forward pass) and trains and writes nothing,
where ``--print-config`` accepted ``method=bogus`` with exit 0; under ``torchrun`` only rank 0
creates the run folder (rank 1's probe of it failed with ``[Errno 17] File exists``), and the
surviving worker of a killed peer prints one mtlkit line naming the lost rank, the last
checkpoint and the resume command (exit 3) instead of a raw gloo ``RuntimeError``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from run_helpers import one_line_error, snapshot, train

from mtlkit.app import cli
from mtlkit.app.validation import check_out_dir

GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:6048: Connection reset by peer. This is typically caused by a remote worker "
    "hanging or bugs in the application. Check the logs of the remote worker before reporting "
    "an error. GLHF! \U0001f3d6\ufe0f"
)  # what a survivor's collective raised when torchrun's other worker was killed (torch 2.13)


def test_check_refuses_what_print_config_accepts(capsys):
    assert train("--print-config", "method=bogus") == 0  # prints, validates nothing
    capsys.readouterr()
    assert train("--check", "method=bogus") == 2
    assert "unknown method 'bogus'; valid methods: " in one_line_error(capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rep-grad", "--arch", "mmoe"], "rep_grad needs a model with one shared representation"),
        (["arch_args.widths=[100000,100000]"], "has 10,011,900,021 parameters"),
        (["method_args.c=foo", "--method", "cagrad"], "method_args.c must be float, got 'foo'"),
        (["tasks=[left,bogus]"], "unknown task(s) 'bogus'"),
    ],
)
def test_check_finds_what_a_run_would_fail_on(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert train("--check", *args) == 2
    assert message in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_check_names_a_missing_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--check", "--data", "nyuv2", "--data-root", str(tmp_path / "none")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtlkit: error: nyuv2: root '{tmp_path / 'none'}' does not exist")
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_check_passes_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train("--check", "--out", "new/run", "--method", "mgda") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("check passed: method mgda, strategy joint, arch hps")
    assert "nothing trained or written" in printed
    assert list(tmp_path.iterdir()) == []  # not even the folder


def test_check_says_the_run_folder_would_be_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--epochs", "1", "checkpoint_every=2") == 0
    before = snapshot(out)
    capsys.readouterr()
    assert train("--check", "--out", str(out), "--epochs", "1") == 2
    assert "holds a finished run" in one_line_error(capsys)
    assert train("--check", "--resume", str(out), "--epochs", "2") == 0
    assert "check passed" in capsys.readouterr().out
    assert snapshot(out) == before


def test_only_rank_zero_probes_the_run_folder(tmp_path, monkeypatch):
    def no_mkdir(self, *args, **kwargs):
        raise AssertionError(f"rank 1 created {self}: it races rank 0's folder")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(Path, "mkdir", no_mkdir)
    check_out_dir(tmp_path / "new" / "run")  # rank 0 creates it; rank 1 waits for it
    assert list(tmp_path.iterdir()) == []


def test_a_folder_made_by_another_process_during_the_probe_is_fine(tmp_path, monkeypatch):
    """The issue's ``[Errno 17] File exists``: another process creates the folder between the
    probe's look and its ``mkdir``."""
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *args, **kwargs):
        real_mkdir(self)  # the other process was first
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    check_out_dir(tmp_path / "run")
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    assert (tmp_path / "run").is_dir()  # the other process's folder stays


def test_a_gloo_failure_is_a_lost_peer(monkeypatch):
    from mtlkit.parallel import launch

    monkeypatch.setattr(launch, "is_distributed", lambda: True)
    monkeypatch.setattr(launch.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(launch.dist, "get_world_size", lambda: 2)
    peer = launch.lost_peer(RuntimeError(GLOO_RESET))
    assert str(peer) == (
        "lost DDP peer: rank 1 of 2 processes stopped, rank 0 cannot go on (Read error "
        "[127.0.0.1]:6048: Connection reset by peer)"
    )
    assert launch.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert launch.lost_peer(ValueError(GLOO_RESET)) is None
    monkeypatch.setattr(launch.dist, "get_world_size", lambda: 4)
    assert "one of ranks 1, 2, 3 of 4" in str(launch.lost_peer(RuntimeError(GLOO_RESET)))


def test_the_survivor_prints_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    """The CLI's report of a lost peer (the collective's failure, as in a torchrun worker)."""
    from mtlkit.parallel import launch

    out = tmp_path / "run"
    assert train("--out", str(out), "--epochs", "1", "checkpoint_every=2") == 0
    capsys.readouterr()

    def collective_fails(*args, **kwargs):  # as under torchrun, when rank 1 was killed
        monkeypatch.setattr(launch, "is_distributed", lambda: True)
        monkeypatch.setattr(launch.dist, "get_rank", lambda: 0)
        monkeypatch.setattr(launch.dist, "get_world_size", lambda: 2)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        raise RuntimeError(GLOO_RESET)

    monkeypatch.setattr(cli, "run", collective_fails)
    assert train("--resume", str(out), "--epochs", "2") == 3
    error = one_line_error(capsys)
    assert error == (
        "mtlkit: error: lost DDP peer: rank 1 of 2 processes stopped, rank 0 cannot go on (Read "
        f"error [127.0.0.1]:6048: Connection reset by peer); the last checkpoint "
        f"{out / 'checkpoint.pt'} is intact; resume with: torchrun --nproc-per-node 2 -m mtlkit "
        f"train --resume {out}\n"
    )


def test_another_runtime_error_is_not_taken_for_a_lost_peer(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cli, "run", bug)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):  # a bug: not hidden
        train("--out", str(tmp_path / "run"), "--epochs", "1")


def _worker_pid(out: Path, rank: int) -> int | None:
    """The PID of the torchrun worker of ``rank`` training into ``out``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parts = cmdline.split(b"\0")  # python -u -m mtlkit train ... (not torchrun's own)
        worker = len(parts) > 3 and parts[1:4] == [b"-u", b"-m", b"mtlkit"]
        worker = worker and str(out).encode() in parts
        if worker and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow  # torchrun with 2 gloo workers: about 10 s
def test_torchrun_start_and_a_killed_peer(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("no torchrun")
    out = tmp_path / "new" / "run"
    argv = [torchrun, "--nproc-per-node", "2", "-m", "mtlkit", "train", "--out", str(out)]
    argv += ["--no-progress", "plots=false", "data_args.n_train=20000", "batch_size=32"]
    argv += ["--epochs", "3", "checkpoint_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "checkpoint.pt").exists(), "the run did not start"  # rank 0 made the folder
    pid = _worker_pid(out, 1)
    if pid is None:
        process.kill()
        pytest.fail(f"no rank 1 worker: {process.communicate()[1]}")
    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("mtlkit: error:")]
    assert len(lines) == 1, stderr
    assert "lost DDP peer: rank 1 of 2 processes stopped, rank 0 cannot go on" in lines[0]
    assert f"the last checkpoint {out / 'checkpoint.pt'} is intact" in lines[0]
    assert lines[0].endswith(
        f"resume with: torchrun --nproc-per-node 2 -m mtlkit train --resume {out}"
    )
    assert "pair.cc" not in stderr and "File exists" not in stderr
