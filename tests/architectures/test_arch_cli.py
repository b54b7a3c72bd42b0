"""The architectures from the command line: ``--arch`` with ``arch_args``, hyphenated names,
and a clear error for the features route on a model without a shared representation."""

from __future__ import annotations

import json

import pytest

from mtlkit.app.cli import main

FAST = [
    "data_args.n_train=128",
    "data_args.n_val=64",
    "data_args.n_test=64",
    "steps=2",
    "epochs=null",
    "--no-progress",
]


@pytest.mark.parametrize(
    "arch, args",
    [
        ("mtan", ["arch_args.widths=[16]"]),
        ("max-roaming", ["arch_args.p=0.5", "arch_args.update_interval=1"]),
        ("ple", ["arch_args.backbone=cnn", "arch_args.widths=[4,4,4]"]),
    ],
)
def test_train_with_an_architecture(tmp_path, capsys, arch, args):
    out = tmp_path / "run"
    assert main(["train", "--arch", arch, "--out", str(out), *args, *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["arch"] == arch and summary["cost"]["steps"] == 2
    assert set(summary["results"]["test"]) == {"left", "right", "sum"}


def test_features_route_on_a_model_without_a_shared_representation_is_one_error(capsys):
    assert main(["train", "--arch", "mmoe", "--rep-grad", "--method", "mgda", *FAST]) == 2
    err = capsys.readouterr().err
    assert "rep_grad needs a model with one shared representation" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_bad_architecture_arguments_are_one_error(capsys):
    assert main(["train", "--arch", "dselect_k", "arch_args.k=9", *FAST]) == 2
    assert "k must be in [1, num_experts=4], got 9" in capsys.readouterr().err
