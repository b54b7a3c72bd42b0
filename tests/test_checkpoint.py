"""Checkpoints: atomic, loaded safely; a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtlkit import Alternating, Budget, Joint, RandomGroups, Trainer, methods
from mtlkit.architectures import HPS
from mtlkit.data.benchmarks import DATASETS
from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import MtlkitError
from mtlkit.training.checkpoint import load_checkpoint, save_checkpoint
from mtlkit.training.optim import optimizer
from mtlkit.training.trainer import TrainingInterrupted

SMALL = {"n_train": 320, "n_val": 128, "n_test": 128}


class Crash(Exception):
    pass


def make_trainer(
    out_dir, strategy_name: str, crash_at: int | None = None, epochs: int = 3, **kwargs
):
    torch.manual_seed(0)
    problem = DATASETS.get("multidigits", seed=0, **SMALL)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(96, 32), nn.ReLU(), nn.Dropout(0.2))
    model = HPS(encoder, {t: nn.Linear(32, k) for t, k in problem.task_outputs.items()})
    if crash_at is not None:

        def on_train_step(step: int) -> None:
            if step == crash_at:
                raise Crash

        model.on_train_step = on_train_step
    strategy = {
        "joint_pcgrad": lambda: Joint(methods.PCGrad(generator=3)),
        "alternating": lambda: Alternating(
            groups=RandomGroups(2, resample="epoch", seed=1), order="random"
        ),
    }[strategy_name]()
    trainer = Trainer(
        model,
        problem.tasks,
        strategy,
        optimizer("adam", lr=3e-3, scheduler="step", step_size=1, gamma=0.7),
        budget=Budget(epochs=epochs),
        out_dir=out_dir,
        progress=False,
        **kwargs,
    )
    loaders = {
        split: DataLoader(
            ds, batch_size=64, shuffle=split == "train", generator=torch.Generator().manual_seed(5)
        )
        for split, ds in problem.splits.items()
    }
    return trainer, loaders


@pytest.mark.parametrize("strategy", ["joint_pcgrad", "alternating"])
@pytest.mark.parametrize("crash_at", [3, 7])  # mid-epoch (5 batches per epoch), and later
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, strategy, crash_at):
    reference, data = make_trainer(tmp_path / "ref", strategy)
    reference.fit(data["train"], data["val"])
    crashing, data = make_trainer(tmp_path / "run", strategy, crash_at=crash_at, checkpoint_every=1)
    with pytest.raises(Crash):
        crashing.fit(data["train"], data["val"])
    resumed, data = make_trainer(tmp_path / "run", strategy, checkpoint_every=1)
    resumed.fit(data["train"], data["val"], resume=True)
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.progress.steps == reference.progress.steps
    assert resumed.progress.passes == reference.progress.passes
    assert resumed.best_epoch == reference.best_epoch
    assert resumed.exploration.path_length() == pytest.approx(reference.exploration.path_length())
    for name in ("steps.csv", "metrics.csv"):
        ref_rows = (tmp_path / "ref" / name).read_text().splitlines()
        run_rows = (tmp_path / "run" / name).read_text().splitlines()
        assert len(ref_rows) == len(run_rows)
        if name == "steps.csv":  # no timings in it: identical
            assert ref_rows == run_rows


@pytest.mark.parametrize("strategy", ["joint_pcgrad", "alternating"])
def test_a_finished_run_trained_on_continues_the_shuffling_order(tmp_path, strategy):
    """A finished run resumed with a larger budget (its last checkpoint: "the last weights, to
    train on later") takes the steps of a straight run: epoch 3 draws a new order from the
    loader's own generator, not the first epoch's again (a rebuilt loader's fresh generator)."""
    reference, data = make_trainer(tmp_path / "ref", strategy, select="last")
    reference.fit(data["train"], data["val"])
    first, data = make_trainer(
        tmp_path / "run", strategy, epochs=2, select="last", checkpoint_every=100
    )
    first.fit(data["train"], data["val"])
    more, data = make_trainer(tmp_path / "run", strategy, select="last", checkpoint_every=100)
    more.fit(data["train"], data["val"], resume=True)
    assert more.progress.epoch == 3 and more.progress.steps == reference.progress.steps
    for a, b in zip(reference.model.state_dict().values(), more.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_finished_run_trained_on_with_other_loaders_is_refused(tmp_path):
    """At an epoch boundary as mid-epoch: a checkpoint of one training loader does not continue
    on two (a multi-input loader), it names both counts."""
    from mtlkit.training.checkpoint import LoaderPosition

    first, data = make_trainer(tmp_path / "run", "joint_pcgrad", epochs=1, checkpoint_every=100)
    first.fit(data["train"], data["val"])
    position = LoaderPosition()
    position.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["position"])
    assert len(position.states_at_save) == 1
    with pytest.raises(MtlkitError, match="1 loader\\(s\\) then, 2 now"):
        position.continue_generators(MultiInputLoader({"a": data["train"], "b": data["train"]}))


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    trainer, data = make_trainer(tmp_path, "joint_pcgrad")
    trainer.model.on_train_step = lambda step: (
        os.kill(os.getpid(), signal.SIGTERM) if step == 4 else None
    )
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        trainer.fit(data["train"], data["val"])
    state = load_checkpoint(tmp_path)
    assert state["progress"]["steps"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_checkpoint_files_are_atomic_and_loaded_safely(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"x": torch.arange(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    assert torch.equal(load_checkpoint(tmp_path)["x"], torch.arange(3))
    # a file that needs arbitrary unpickling is refused (weights_only)
    torch.save({"format": 1, "obj": Crash()}, path)
    with pytest.raises(MtlkitError, match="cannot read checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"torn")
    with pytest.raises(MtlkitError, match="cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(MtlkitError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


TRAIN = [
    sys.executable, "-m", "mtlkit", "train", "--no-progress", "--epochs", "3", "--method", "pcgrad",
    "data_args.n_train=640", "data_args.n_val=128", "data_args.n_test=128", "checkpoint_every=1",
]  # fmt: skip


def final_weights(run_dir):
    return load_checkpoint(run_dir / "model.pt")["model"]


@pytest.mark.slow  # tests/test_kill_resume.py does this in the default run, 10x faster per kill
def test_cli_run_killed_at_random_moments_resumes_to_identical_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*TRAIN, "--out", str(tmp_path / "ref")], check=True, env=env)
    reference = json.loads((tmp_path / "ref" / "summary.json").read_text())
    rng = random.Random(0)
    run_dir = tmp_path / "run"
    kills = 0
    for _ in range(2):  # kill with SIGKILL at a random moment after the first checkpoint
        command = [*TRAIN, "--out", str(run_dir)]
        if (run_dir / "checkpoint.pt").exists():
            command = [*TRAIN[:5], "--resume", str(run_dir)]
        process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is None:
            process.kill()
            kills += 1
        process.wait()
        load_checkpoint(run_dir)  # never torn
    subprocess.run([*TRAIN[:5], "--resume", str(run_dir)], check=True, env=env)
    assert kills >= 1
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["results"]["test"] == reference["results"]["test"]
    assert resumed["cost"]["steps"] == reference["cost"]["steps"]
    for a, b in zip(final_weights(tmp_path / "ref").values(), final_weights(run_dir).values()):
        assert torch.equal(a, b)
    steps = [(d / "steps.csv").read_text() for d in (tmp_path / "ref", run_dir)]
    assert steps[0] == steps[1]
