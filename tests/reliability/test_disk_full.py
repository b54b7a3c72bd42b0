"""A full disk (issue 27, item 6): ``ENOSPC`` while writing the checkpoint, ``model.pt``,
``summary.json``, ``config.yaml``, the logs, the run folder's marker or a plot is one mtlkit
line (exit code 3) saying what failed, what is intact and the command that goes on; the files
already written stay intact, and the run goes on to the same result once there is space. Images
are written atomically: ``mtlkit plot`` on a full disk leaves no 0-byte png. Before the fix each
scenario ended in an ``OSError: [Errno 28]`` traceback.

The full disk is injected into the writes of one file (:func:`run_helpers.disk_full`: the file
objects of ``open`` and ``os.fdopen`` raise ``ENOSPC``), or into ``torch.save``."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from run_helpers import disk_full, one_line_error, summary, train

from mtlkit.app.cli import main
from mtlkit.training.checkpoint import CHECKPOINT_NAME, MODEL_NAME

RUN = ["--epochs", "1", "checkpoint_every=1"]  # 4 batches: checkpoints after each, and at the end
FULL = "No space left on device [Errno 28]"
EXIT_ENVIRONMENT = 3  # the documented exit code of a failure of the environment


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "reference"
    assert train("--out", str(out), *RUN) == 0
    return out


def assert_same_model(a: Path, b: Path) -> None:
    first = torch.load(a / MODEL_NAME, weights_only=True)["model"]
    second = torch.load(b / MODEL_NAME, weights_only=True)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "name, after", [(CHECKPOINT_NAME, 2), (MODEL_NAME, 0), ("summary.json", 0)]
)
def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_to_resume(
    reference, tmp_path, monkeypatch, capsys, name, after
):
    out = tmp_path / "run"
    with disk_full(monkeypatch, name, after) as failed:
        assert train("--out", str(out), *RUN) == EXIT_ENVIRONMENT
    assert failed
    error = one_line_error(capsys)
    assert f"cannot write '{out / name}': {FULL} (its previous version is intact)" in error
    assert f"the last checkpoint {out / CHECKPOINT_NAME} is intact" in error
    assert error.rstrip().endswith(
        f"free some space, then resume with: mtlkit train --resume {out}"
    )
    state = torch.load(out / CHECKPOINT_NAME, weights_only=True)  # intact, the last one written
    assert state["progress"]["steps"] == (2 if name == CHECKPOINT_NAME else 4)
    assert no_temporary_files(out)
    assert train("--resume", str(out)) == 0  # space again: the run ends as if nothing happened
    assert_same_model(reference, out)
    assert summary(out)["results"] == summary(reference)["results"]


def test_torch_save_failing_for_want_of_space(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert train("--out", str(out), *RUN) == EXIT_ENVIRONMENT
    monkeypatch.setattr(torch, "save", real_save)
    error = one_line_error(capsys)
    assert f"cannot write '{out / CHECKPOINT_NAME}'" in error and "resume with" in error
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["progress"]["steps"] == 2
    assert train("--resume", str(out)) == 0
    assert_same_model(reference, out)


@pytest.mark.parametrize("name", ["config.yaml", ".mtlkit-run.json"])
def test_a_full_disk_before_training_says_to_run_again(tmp_path, monkeypatch, capsys, name):
    out = tmp_path / "run"
    with disk_full(monkeypatch, name):
        assert train("--out", str(out), *RUN) == EXIT_ENVIRONMENT
    error = one_line_error(capsys)
    assert f"cannot write '{out / name}': {FULL}" in error
    assert error.rstrip().endswith(
        "nothing was trained; free some space, then run the same command again"
    )
    assert train("--out", str(out), *RUN) == 0  # the same command, with space


def test_a_full_disk_in_the_step_log(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with disk_full(monkeypatch, "steps.csv"):
        assert train("--out", str(out), *RUN) == EXIT_ENVIRONMENT
    error = one_line_error(capsys)
    assert f"cannot write '{out / 'steps.csv'}': {FULL} (it may end in a partial row)" in error
    assert f"start it over with: mtlkit train --resume {out}" in error
    assert train("--resume", str(out)) == 0
    assert summary(out)["cost"]["steps"] == 4


def test_a_full_disk_while_drawing_the_plots(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    with disk_full(monkeypatch, "losses.png"):
        assert train("--out", str(out), *RUN, "plots=true") == EXIT_ENVIRONMENT
    error = one_line_error(capsys)
    assert f"cannot write '{out / 'losses.png'}': {FULL}" in error
    assert error.rstrip().endswith(
        f"the results are written; free some space, then draw the figures with: mtlkit plot {out}"
    )
    assert "test" in summary(out)["results"] and not (out / "losses.png").exists()
    assert no_temporary_files(out)


def test_mtlkit_plot_on_a_full_disk_leaves_no_empty_image(reference, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    assert main(["plot", str(reference)]) == 0
    image = (reference / "losses.png").read_bytes()
    assert image.startswith(b"\x89PNG")
    capsys.readouterr()
    with disk_full(monkeypatch, "losses.png"):
        assert main(["plot", str(reference)]) == EXIT_ENVIRONMENT
    assert f"cannot write '{reference / 'losses.png'}': {FULL}" in one_line_error(capsys)
    assert (reference / "losses.png").read_bytes() == image  # the previous image, whole
    assert no_temporary_files(reference)
