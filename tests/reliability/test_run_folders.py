"""Run folders that mtlkit owns (issue 27, items 1, 3 and 5): ``out=.`` in a folder of the user's
files, ``out=""`` and ``out=~`` leave every file untouched; a finished or interrupted run is not
overwritten without ``--overwrite`` (or ``--resume``); a new run removes the old checkpoint
first, so a stale one is never resumed; mtlkit deletes only its own temporary files, by exact
name. Each case exited 0 and lost files before the fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from run_helpers import one_line_error, snapshot, summary, train

from mtlkit.training.checkpoint import CHECKPOINT_NAME, MODEL_NAME, remove_partial_files
from mtlkit.training.logs import atomic_file

MARKER_NAME = ".mtlkit-run.json"


def read_marker(folder: Path):
    from mtlkit.training.run_dir import read_marker  # (here: the module is new in issue 27)

    return read_marker(folder)


USER_FILES = {
    "config.yaml": b"my experiment\n",
    "metrics.csv": b"a,b\n1,2\n",
    "summary.json": b'{"mine": true}\n',
    ".draft.tmp": b"unsaved notes",
    ".config.yaml.abcd1234.tmp": b"an editor's swap file",
    "notes/todo.txt": b"buy milk",
}


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    for name, content in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("out", [".", ""])
def test_out_dot_in_a_folder_of_user_files_touches_nothing(user_folder, monkeypatch, capsys, out):
    monkeypatch.chdir(user_folder)
    assert train(f"out={out}", "steps=1", "epochs=null") == 2
    error = one_line_error(capsys)
    assert "not an mtlkit run folder" in error and "--overwrite" in error
    assert snapshot(user_folder) == USER_FILES


@pytest.mark.parametrize("home", ["home", "~"])
def test_out_home_touches_nothing(user_folder, monkeypatch, capsys, home):
    """``--out ~`` (the shell gives mtlkit the home folder's path), or ``out='~'`` unexpanded
    inside a longer path (alone, ``~`` is YAML's null: a new folder under runs/)."""
    monkeypatch.setenv("HOME", str(user_folder.parent))
    out = str(user_folder) if home == "home" else f"~/{user_folder.name}"
    assert train("--out", out, "steps=1", "epochs=null") == 2
    assert "not an mtlkit run folder" in one_line_error(capsys)
    assert snapshot(user_folder) == USER_FILES


def test_overwrite_writes_into_a_foreign_folder_and_touches_no_other_file(user_folder, capsys):
    assert train("--out", str(user_folder), "steps=2", "epochs=null", "--overwrite") == 0
    files = snapshot(user_folder)
    for name in (".draft.tmp", ".config.yaml.abcd1234.tmp", "notes/todo.txt"):
        assert files[name] == USER_FILES[name]  # the user's names mtlkit does not write
    assert files["config.yaml"] != USER_FILES["config.yaml"]  # replaced, as asked
    assert summary(user_folder)["cost"]["steps"] == 2
    assert read_marker(user_folder) is not None


def test_an_empty_existing_folder_becomes_a_run_folder(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert train("--out", str(folder), "steps=1", "epochs=null") == 0
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert set(marker) == {"run_id", "created", "config_hash", "mtlkit_version"}
    assert len(marker["run_id"]) == 32 and len(marker["config_hash"]) == 64


def test_a_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--epochs", "1") == 0
    before = snapshot(out)
    assert train("--out", str(out), "--epochs", "1", "--method", "mgda", "--seed", "1") == 2
    error = one_line_error(capsys)
    assert "holds a finished run" in error and "--overwrite" in error and "--resume" in error
    assert snapshot(out) == before
    run_id = read_marker(out).run_id
    assert train("--out", str(out), "--epochs", "1", "--method", "mgda", "--overwrite") == 0
    assert summary(out)["config"]["method"] == "mgda"
    assert read_marker(out).run_id != run_id  # a new run, a new id


def test_an_interrupted_run_is_not_started_over_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--epochs", "1", "checkpoint_every=1") == 0
    (out / "summary.json").unlink()  # as if killed after a checkpoint
    before = snapshot(out)
    assert train("--out", str(out), "--epochs", "1") == 2
    assert "holds an interrupted run" in one_line_error(capsys)
    assert snapshot(out) == before


def test_a_stale_checkpoint_is_never_resumed(tmp_path, capsys):
    """Issue 27, case 3: run 1 leaves a checkpoint; run 2 (no checkpoints) replaces it; resuming
    must not continue run 1's checkpoint under run 2's config (which replaced its results)."""
    out = tmp_path / "run"
    assert train("--out", str(out), "checkpoint_every=2", "--epochs", "1") == 0
    second = ["--out", str(out), "--seed", "7", "lr=0.01", "--epochs", "3"]
    assert train(*second) == 2  # refused: it would lose run 1
    assert "holds a finished run" in one_line_error(capsys)
    assert train(*second, "--overwrite") == 0
    assert not (out / CHECKPOINT_NAME).exists()  # run 1's checkpoint went first
    results = summary(out)["results"]
    capsys.readouterr()
    assert train("--resume", str(out)) == 2
    assert "finished and has no checkpoint.pt" in one_line_error(capsys)
    assert summary(out)["results"] == results  # run 2's results stay


def test_resume_needs_a_run_folder(user_folder, capsys):
    (user_folder / "config.yaml").write_text("epochs: 1\n")
    assert train("--resume", str(user_folder)) == 2
    assert "not an mtlkit run folder" in one_line_error(capsys)


def test_only_mtlkits_own_temporary_files_are_removed(tmp_path):
    kept = [".notes.tmp", ".summary.json.abcd1234.tmp", ".x.mtlkit-abcd1234.tmp", "a.tmp"]
    for name in kept:
        (tmp_path / name).write_text("the user's")
    ours = [".checkpoint.pt.mtlkit-abcd1234.tmp", ".summary.json.mtlkit-0_9zzzzz.tmp"]
    for name in ours:
        (tmp_path / name).write_bytes(b"torn")
    removed = remove_partial_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_atomic_files_are_named_for_their_target(tmp_path):
    from mtlkit.training.logs import partial_target

    target = tmp_path / "summary.json"
    with atomic_file(target) as handle:
        (temporary,) = [p for p in tmp_path.iterdir()]
        assert partial_target(temporary.name) == "summary.json"
        assert temporary.name.startswith(".summary.json.mtlkit-")
        handle.write("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert partial_target(".summary.json.tmp") is None
    assert partial_target("summary.json") is None


def test_a_new_run_removes_the_old_runs_results_first(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--epochs", "1", "checkpoint_every=1") == 0
    (out / "summary.json").unlink()  # an interrupted run, started over
    stale = torch.load(out / CHECKPOINT_NAME, weights_only=True)["run"]["run_id"]
    assert train("--out", str(out), "steps=1", "epochs=null", "--overwrite") == 0
    assert not (out / CHECKPOINT_NAME).exists() and (out / MODEL_NAME).exists()
    assert read_marker(out).run_id != stale


def test_stl_reuses_finished_task_runs_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "stl"
    args = ["--stl", "--out", str(out), "steps=2", "epochs=null", "tasks=[left,sum]"]
    assert train(*args) == 0
    first = snapshot(out / "stl" / "left")
    assert train(*args) == 2  # finished: its baseline file is there
    assert "holds a finished run" in one_line_error(capsys)
    (out / "stl_baseline.json").unlink()  # stopped after its tasks, before the baseline file
    assert train(*args) == 0
    assert "stl: task 'left' finished before" in capsys.readouterr().out
    assert snapshot(out / "stl" / "left") == first  # not trained again
