"""A COSMOS run from the shell: the model is conditioned, and front.csv holds its front."""

from __future__ import annotations

import csv

import pytest
from conftest import TINY_COMPARE, one_line_error, summary

from mtlkit.app.cli import main
from mtlkit.app.config import TrainConfig
from mtlkit.app.runner import build_run
from mtlkit.architectures.conditioned import PreferenceConditioned
from mtlkit.errors import ConfigError
from mtlkit.methods import COSMOS


def test_train_writes_the_front_of_the_one_conditioned_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--method", "cosmos", "--out", str(out), "--no-progress", *TINY_COMPARE]
    assert main([*argv, "method_args.test_rays=5"]) == 0
    rows = list(csv.DictReader((out / "front.csv").open()))
    assert len(rows) == 5
    assert list(rows[0])[:2] == ["ray/left", "ray/sum"]
    rays = [float(r["ray/left"]) for r in rows]
    assert rays == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6], rel=1e-9)
    assert {"left/loss", "left/acc", "sum/loss", "sum/mae"} <= set(rows[0])
    losses = [float(r["left/loss"]) for r in rows]
    assert len(set(losses)) == 5  # the ray reaches the model: five different points
    # the run's own test results are the model at the centre ray (its selection ray too)
    test = summary(out)["results"]["test"]
    assert 0 < test["left"]["loss"] < 10
    capsys.readouterr()


def test_cosmos_builds_a_conditioned_model_and_refuses_what_it_cannot_condition(capsys):
    small = {"n_train": 64, "n_val": 32, "n_test": 32}
    trainer, _ = build_run(TrainConfig(method="cosmos", data_args=small, progress=False), None)
    assert isinstance(trainer.model, PreferenceConditioned)
    assert trainer.model.channel is trainer.strategy.methods()[0].channel
    plain, _ = build_run(TrainConfig(method="ls", data_args=small, progress=False), None)
    assert not isinstance(plain.model, PreferenceConditioned)
    with pytest.raises(ConfigError, match="needs strategy: joint, not 'alternating'"):
        build_run(TrainConfig(method="cosmos", strategy="alternating", data_args=small), None)
    code = main(["train", "--method", "cosmos", "--strategy", "alternating", "--check"])
    assert code == 2 and "strategy: joint" in one_line_error(capsys)


def test_a_resumed_cosmos_run_draws_the_same_rays_and_ends_at_the_same_front(tmp_path, capsys):
    """The rays come from the method's generator, saved in the checkpoint: 1 epoch + a resume
    to 2 gives the uninterrupted 2-epoch run's front.csv, byte for byte."""
    tiny = [*TINY_COMPARE, "method_args.test_rays=3", "checkpoint_every=1", "--no-progress"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    base = ["train", "--method", "cosmos"]
    assert main([*base, "--out", str(whole), *tiny, "epochs=2"]) == 0
    assert main([*base, "--out", str(split), *tiny, "epochs=1"]) == 0
    assert main(["train", "--resume", str(split), *tiny, "epochs=2"]) == 0
    assert (split / "front.csv").read_text() == (whole / "front.csv").read_text()
    capsys.readouterr()


def test_alternating_refuses_cosmos_in_a_users_own_trainer():
    """Each group would get its own copy of the method, drawing rays the model never reads."""
    from mtlkit import Alternating, Trainer, optimizer

    trainer, loaders = build_run(
        TrainConfig(method="cosmos", data_args={"n_train": 64, "n_val": 32, "n_test": 32}), None
    )
    own = Trainer(trainer.model, trainer.tasks, Alternating(COSMOS()), optimizer("sgd", lr=0.1))
    with pytest.raises(ConfigError, match="COSMOS needs the Joint strategy"):
        own.validate(loaders["train"])
