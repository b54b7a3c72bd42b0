"""The published protocols: ``select: last_<k>`` (the mean over the last k epochs of Nash-MTL
and FAMO) and the two Δ conventions (Nash-MTL/FAMO's Δm%, LibMTL's Δp), on hand-computed
numbers."""

from __future__ import annotations

import csv
import json

import pytest

from mtlkit.app.cli import main
from mtlkit.errors import MtlkitError
from mtlkit.metrics import delta_m, delta_p
from mtlkit.tasks import Task
from mtlkit.training.evaluation import Selection, last_k_epochs, mean_of_last_epochs


class Higher:
    higher_is_better = True


class Lower:
    higher_is_better = False


A = Task("a", loss=None, metrics={"acc": Higher})
B = Task("b", loss=None, metrics={"mae": Lower})


# --------------------------------------------------------------------------- select: last_<k>
def test_last_k_is_parsed_and_bad_k_is_named():
    assert last_k_epochs("last_10") == 10 and last_k_epochs("last_1") == 1
    assert last_k_epochs("last") is None and last_k_epochs("loss") is None
    for bad in ("last_0", "last_x", "last_", "last_-2"):
        with pytest.raises(MtlkitError, match="last_<k> takes a whole number k >= 1"):
            last_k_epochs(bad)
    with pytest.raises(MtlkitError, match="valid: loss, last, last_<k>, a/acc, b/mae"):
        Selection("best", [A, B])


def test_last_k_selects_the_last_epoch():
    selection = Selection("last_3", [A, B])
    results = {"a": {"loss": 1.0, "acc": 0.5}, "b": {"loss": 1.0, "mae": 2.0}}
    scores = [selection.score(results, epoch) for epoch in (1, 2, 3, 4)]
    assert scores == [-1.0, -2.0, -3.0, -4.0]  # every later epoch is better: the last is kept


def row(epoch, a_loss, acc, b_loss, mae, **extra):
    return {
        "epoch": epoch,
        "val/a/loss": a_loss,
        "val/a/acc": acc,
        "val/b/loss": b_loss,
        "val/b/mae": mae,
        **extra,
    }


def test_the_mean_of_the_last_k_epochs_by_hand():
    history = [
        row(1, 2.0, 0.10, 5.0, 9.0),
        row(2, 1.0, 0.50, 4.0, 3.0),
        row(3, 0.8, 0.60, 3.0, 2.0),
        row(4, 0.6, 0.80, 1.0, 1.0),
    ]
    last2 = mean_of_last_epochs(history, [A, B], 2)
    assert last2 == {
        "a": {"loss": pytest.approx(0.7), "acc": pytest.approx(0.7)},
        "b": {"loss": pytest.approx(2.0), "mae": pytest.approx(1.5)},
    }
    last3 = mean_of_last_epochs(history, [A, B], 3)
    assert last3["a"]["acc"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
    assert last3["b"]["mae"] == pytest.approx(2.0)
    # rows without validation results (an epoch cut short by a step budget) do not count
    assert mean_of_last_epochs([*history, {"epoch": 5}], [A, B], 1)["b"]["mae"] == 1.0
    with pytest.raises(MtlkitError, match="needs 5 epochs evaluated on the val split; the run has"):
        mean_of_last_epochs(history, [A, B], 5)


def test_mtlkit_train_select_last_k_writes_and_prints_the_mean(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "data_args.n_train=64", "data_args.n_val=32", "data_args.n_test=32"]
    args += ["epochs=3", "batch_size=32", "progress=false", "select=last_2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selection"] == "last_2" and summary["best_epoch"] == 3
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    mean = summary["results"]["val_mean_last_2"]
    for task in ("left", "right", "sum"):
        for metric, value in mean[task].items():
            column = f"val/{task}/{metric}"
            by_hand = (float(rows[1][column]) + float(rows[2][column])) / 2
            assert value == pytest.approx(by_hand, rel=1e-5), (task, metric)  # csv: 6 digits
    assert "mean of the last 2 epochs on the validation split (last_2):" in printed


def test_too_few_epochs_or_a_bad_k_stop_before_training(tmp_path, capsys):
    for select, message in (
        ("last_5", "select='last_5' averages the last 5 epochs, but epochs=3 trains fewer"),
        ("last_x", "last_<k> takes a whole number k >= 1"),
    ):
        out = tmp_path / select
        assert main(["train", "epochs=3", f"select={select}", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not out.exists()  # nothing trained, nothing written


# ------------------------------------------------------------------------ Δm% and Δp
def test_libmtls_own_example_of_delta_p():
    """LibMTL's count_improvement docstring: base A [96, 98], B [0.2]; new A [93, 99], B [0.5];
    weight A [1, 0], B [1] (1: higher is better)."""
    base = {"A": {"m1": 96.0, "m2": 98.0}, "B": {"m1": 0.2}}
    new = {"A": {"m1": 93.0, "m2": 99.0}, "B": {"m1": 0.5}}
    higher = {"A": {"m1": True, "m2": False}, "B": {"m1": True}}
    # A: (-(96 - 93) / 96 + (98 - 99) / 98) / 2; B: -(0.2 - 0.5) / 0.2 = 1.5
    a = (-(96 - 93) / 96 + (98 - 99) / 98) / 2
    assert delta_p(new, base, higher) == pytest.approx(100 * (a + 1.5) / 2)  # +73.96
    assert delta_p(new, base, higher) == pytest.approx(73.963647, abs=1e-6)
    # Nash-MTL's Δm% over the same numbers: the mean over the 3 metrics, lower is better
    drops = [(93 - 96) / 96 * -1, (99 - 98) / 98, (0.5 - 0.2) / 0.2 * -1]
    assert delta_m(new, base, higher) == pytest.approx(100 * sum(drops) / 3)
    assert delta_m(new, base, higher) == pytest.approx(-48.6182, abs=1e-4)


def test_delta_p_weighs_tasks_and_is_minus_the_task_mean():
    base = {"a": {"x": 1.0, "y": 1.0}, "b": {"z": 1.0}}
    new = {"a": {"x": 1.1, "y": 2.0}, "b": {"z": 0.5}}
    higher = {"a": {"x": True, "y": False}, "b": {"z": True}}
    # a: (+0.1 - 1.0) / 2 = -0.45; b: -0.5; equal weights: -47.5; b twice as heavy: -48.33
    assert delta_p(new, base, higher) == pytest.approx(-47.5)
    assert delta_p(new, base, higher, {"a": 1.0, "b": 2.0}) == pytest.approx(
        100 * (-0.45 - 2 * 0.5) / 3
    )
    assert delta_p(new, base, higher) == -delta_m(new, base, higher, mode="task_mean")
    assert delta_m(new, base, higher) == pytest.approx(100 * (-0.1 + 1.0 + 0.5) / 3)
