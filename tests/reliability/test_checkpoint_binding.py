"""Checkpoints bound to their run (issue 27, items 4, 5, 7 and 12): a checkpoint of another config
or another run folder is refused naming what differs; the checkpoint's schema is checked on load
(a missing or wrong-typed entry is one error naming it, not a ``KeyError``/``TypeError``
traceback); a crafted ``log_rows`` or a deleted ``steps.csv`` is an error, not a silent cut or
restart of the log; an unsafe pickle is one line "not a safe mtlkit checkpoint", with no terminal
escapes and no advice to load it unsafely. Each case was accepted, or a traceback, before."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from run_helpers import one_line_error, summary, train

from mtlkit import Budget, Joint, Trainer, methods
from mtlkit.architectures import HPS
from mtlkit.data.benchmarks import DATASETS
from mtlkit.errors import MtlkitError
from mtlkit.training.checkpoint import CHECKPOINT_NAME

RUN = ["--epochs", "1", "checkpoint_every=2"]  # a checkpoint every 2 of 4 batches, and at the end


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run with its last checkpoint (4 steps)."""
    out = tmp_path_factory.mktemp("binding") / "ew"
    assert train("--out", str(out), *RUN) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of :func:`finished` to change."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def resume(run: Path, *args: str) -> int:
    return train("--resume", str(run), "--epochs", "2", *args)


def test_the_checkpoint_records_its_run(finished):
    state = torch.load(finished / CHECKPOINT_NAME, weights_only=True)
    bound = state["run"]
    config = json.loads(json.dumps(bound["config"]))
    assert config["method"] == "ew" and config["out"] == str(finished)
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    assert bound["config_hash"] == hashlib.sha256(text.encode()).hexdigest()
    marker = json.loads((finished / ".mtlkit-run.json").read_text())
    assert bound["run_id"] == marker["run_id"]
    assert (bound["model"], bound["strategy"], bound["methods"]) == ("HPS", "Joint", ["EW"])
    assert (bound["tasks"], bound["seed"]) == (["left", "right", "sum"], 0)


def test_a_valid_resume_still_continues(run, capsys):
    assert resume(run) == 0
    assert summary(run)["cost"]["steps"] == 8


def test_a_checkpoint_of_another_method_is_refused(run, tmp_path, capsys):
    """Issue 27, case 4: an MGDA run's checkpoint copied into an EW run folder."""
    other = tmp_path / "mgda"
    assert train("--out", str(other), *RUN, "--method", "mgda") == 0
    shutil.copy(other / CHECKPOINT_NAME, run / CHECKPOINT_NAME)
    before = summary(run)
    capsys.readouterr()
    assert resume(run) == 2
    assert "--resume cannot change method (method: 'mgda' -> 'ew')" in one_line_error(capsys)
    assert summary(run) == before


def test_a_checkpoint_of_another_run_folder_is_refused(run, tmp_path, capsys):
    """The same config trained in another folder: its checkpoint is that run's, not this one's."""
    other = tmp_path / "twin"
    assert train("--out", str(other), *RUN) == 0
    state = torch.load(other / CHECKPOINT_NAME, weights_only=True)
    state["run"]["config"]["out"] = str(run)  # even with the out it would have had here
    torch.save(state, run / CHECKPOINT_NAME)
    capsys.readouterr()
    assert resume(run) == 2
    assert "belongs to another run" in one_line_error(capsys)


def make_trainer(out: Path, method):
    torch.manual_seed(0)
    problem = DATASETS.get("multidigits", seed=0, n_train=64, n_val=32, n_test=32)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(96, 16), nn.ReLU())
    model = HPS(encoder, {t: nn.Linear(16, k) for t, k in problem.task_outputs.items()})
    trainer = Trainer(
        model,
        problem.tasks,
        Joint(method),
        budget=Budget(epochs=1),
        out_dir=out,
        progress=False,
        checkpoint_every=1,
    )
    return trainer, DataLoader(problem.splits["train"], batch_size=32)


def test_the_trainer_refuses_a_checkpoint_of_another_method(tmp_path):
    trainer, data = make_trainer(tmp_path, methods.MGDA())
    trainer.fit(data)
    resumed, data = make_trainer(tmp_path, methods.EW())
    with pytest.raises(MtlkitError, match=r"methods: \['MGDA'\] -> \['EW'\]"):
        resumed.fit(data, resume=True)


def _delete(state: dict, key: str) -> None:
    del state[key]


def _set(path: str, value):
    def change(state: dict, _: str) -> None:
        *parents, last = path.split(".")
        target = state
        for name in parents:
            target = target[name]
        target[last] = value

    return change


CORRUPTIONS = [
    ("progress", _delete, "no entry 'progress'"),
    ("progress.steps", _set("progress.steps", "4"), "entry 'progress.steps' must be int, got str"),
    ("rng", _delete, "no entry 'rng'"),
    ("rng", _set("rng", [1, 2, 3]), "entry 'rng' must be Tensor, got list"),
    ("rng", _set("rng", torch.zeros(3)), "entry 'rng' must be a 1-D uint8 tensor"),
    ("counters", _delete, "no entry 'counters'"),
    ("counters", _set("counters.batches_seen", 2.5), "'counters.batches_seen' must be int"),
    ("counters", _set("counters.extra", 1), "entry 'counters' has unknown key(s) ['extra']"),
    ("counters", _set("counters.optimizer_steps", -3), "'counters.optimizer_steps' must be >= 0"),
    ("best", _set("best", None), "entry 'best' must be a mapping, got NoneType"),
    ("position", _set("position.consumed", -1), "'position.consumed' must be >= 0"),
    ("epoch", _set("epoch", {"bogus": 1}), "entry 'epoch' does not fit this run"),
    ("log_rows", _set("log_rows", {"steps": 1, "metrics": 1}), "entry 'log_rows' {'steps': 1"),
    ("log_rows", _set("log_rows", "4"), "entry 'log_rows' must be a mapping, got str"),
    ("run", _delete, "no entry 'run'"),
    ("format", _set("format", 1), "is of format 1"),
]


@pytest.mark.parametrize(
    "entry, corrupt, message", CORRUPTIONS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CORRUPTIONS)]
)
def test_a_damaged_checkpoint_is_one_error_naming_the_entry(run, capsys, entry, corrupt, message):
    path = run / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    corrupt(state, entry)
    torch.save(state, path)
    before = (run / "steps.csv").read_text()
    assert resume(run) == 2
    assert message in one_line_error(capsys)
    assert (run / "steps.csv").read_text() == before  # nothing was cut


def test_a_deleted_step_log_is_an_error_not_a_restart(run, capsys):
    (run / "steps.csv").unlink()
    assert resume(run) == 2
    error = one_line_error(capsys)
    assert "steps.csv" in error and "the file is missing" in error and "after 4 row(s)" in error
    assert not (run / "steps.csv").exists()


def test_a_shortened_step_log_is_an_error(run, capsys):
    lines = (run / "steps.csv").read_text().splitlines(keepends=True)
    (run / "steps.csv").write_text("".join(lines[:3]))  # header and 2 of 4 rows
    assert resume(run) == 2
    assert "it has 2 row(s), the checkpoint was taken after 4" in one_line_error(capsys)


class Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def test_an_unsafe_pickle_is_refused_in_one_line(run, capsys):
    pwned = run.parent / "PWNED"
    torch.save({"format": 2, "x": Evil(pwned)}, run / CHECKPOINT_NAME)
    assert resume(run) == 2
    error = one_line_error(capsys)
    assert "not a safe mtlkit checkpoint" in error and "`posix.system`" in error
    assert "weights_only=False" not in error and "\x1b" not in error
    assert not pwned.exists()


def test_terminal_escapes_in_a_crafted_file_never_reach_the_terminal(run, capsys):
    crafted = b"cos\x1b[2J\x1b]0;owned\x07\nsystem\n(S'true'\ntR."  # a protocol-0 pickle
    (run / CHECKPOINT_NAME).write_bytes(crafted)
    assert resume(run) == 2
    error = one_line_error(capsys)
    assert "cannot read checkpoint" in error
    assert not any(ord(c) < 32 for c in error[:-1]) and "\x1b" not in error
