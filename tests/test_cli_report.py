"""What ``mtlkit train`` and ``mtlkit list`` tell a user: the selected model's validation and test
metrics, each architecture's and backbone's options with their defaults."""

from __future__ import annotations

import csv
import json

import pytest

from mtlkit.app.cli import main
from mtlkit.architectures import build
from mtlkit.errors import ConfigError

FAST = ["data_args.n_train=256", "data_args.n_val=64", "data_args.n_test=64", "--no-progress"]


def printed_tables(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{heading: {task: {metric: value}}}`` of the tables ``format_results`` printed, each
    under the line before its header."""
    lines = text.splitlines()
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for i, line in enumerate(lines):
        if line.startswith("task ") and i + 1 < len(lines) and set(lines[i + 1]) <= {"-", " "}:
            columns = line.split()
            rows: dict[str, dict[str, float]] = {}
            for row in lines[i + 2 :]:
                cells = row.split()
                if not cells or cells[0] not in ("left", "right", "sum"):
                    break
                # empty cells print as spaces: left/right have loss and acc, sum loss and mae
                names = [c for c in columns[1:] if c != ("acc" if cells[0] == "sum" else "mae")]
                rows[cells[0]] = dict(zip(names, map(float, cells[1:]), strict=True))
            tables[lines[i - 1]] = rows
    return tables


def test_train_prints_the_selected_models_validation_and_test_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "4", "--lr", "0.03", "--out", str(out), "plots=false"]
    assert main([*argv, "select=left/acc", *FAST]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best_epoch"]
    assert best == 3  # not the last epoch (seeded): the last one's numbers would not do
    heading = "validation (the selected model: epoch 3, select=left/acc):"
    tables = printed_tables(printed)
    assert list(tables) == [heading, "test:"]
    with open(out / "metrics.csv", newline="") as file:
        epochs = {int(row["epoch"]): row for row in csv.DictReader(file)}
    for task, metrics in tables[heading].items():
        assert set(metrics) == ({"loss", "mae"} if task == "sum" else {"loss", "acc"})
        for metric, value in metrics.items():  # the numbers model selection saw at epoch 3
            assert value == pytest.approx(float(epochs[best][f"val/{task}/{metric}"]), abs=5e-5)
            assert value == pytest.approx(summary["results"]["val"][task][metric], abs=5e-5)
    assert float(epochs[4]["val/left/acc"]) < float(epochs[3]["val/left/acc"])
    for task, metrics in tables["test:"].items():
        for metric, value in metrics.items():
            assert value == pytest.approx(summary["results"]["test"][task][metric], abs=5e-5)


def test_list_shows_every_architecture_and_backbone_option_with_its_default(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    assert "architectures: (arch=NAME, arch_args.ARG=VALUE)" in printed
    hps = (
        "  hps(backbone: str = 'mlp', widths: list[int] | None = None, weights: str | None = None)"
    )
    assert hps in printed.splitlines()
    assert "input_shape" not in printed.split("architectures:")[1].split("backbones:")[0]
    backbones = printed.split("backbones: ")[1].split("strategies:")[0].splitlines()
    assert backbones[0] == "(arch_args.backbone=NAME, arch_args.widths=[...])"
    assert "  mlp(widths: Sequence[int] = (256, 128))" in backbones
    assert "  cnn(widths: Sequence[int] = (32, 64))" in backbones
    assert all("dropout" not in line for line in backbones)  # not passed on by build_backbone
    assert "  mtan(backbone: str = 'mlp'" in printed and "batch_norm: bool = True" in printed


def test_a_wrong_architecture_option_names_the_valid_ones(capsys):
    with pytest.raises(
        ConfigError,
        match=r"architecture 'hps' has no argument\(s\) width; valid "
        r"arguments: .*backbone: str = 'mlp', widths: list\[int\] \| None = None",
    ):
        build("hps", (4,), {"a": 1}, width=[8])
    assert main(["train", "arch_args.width=[8]", *FAST]) == 2
    error = capsys.readouterr().err
    assert "has no argument(s) width" in error and "widths" in error
