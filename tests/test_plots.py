"""Run plots (drawn from the CSV logs of a real, tiny run) and compare plots (drawn from a
compare folder's results.csv and compare.json)."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from mtlkit.app.cli import main
from mtlkit.app.plots import (
    moving_average,
    pareto_front,
    plot_compare,
    plot_compare_weights,
    plot_folder,
    plot_run,
    read_columns,
    read_results,
)
from mtlkit.errors import MtlkitError


def test_moving_average_values():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0], 5) == [2.0]


def test_plot_run_draws_losses_weights_and_validation(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--no-progress", "--epochs", "2", "--method", "uw", "--out", str(out)]
    argv += ["data_args.n_train=256", "data_args.n_val=64", "data_args.n_test=64"]
    assert main(argv) == 0
    written = plot_run(out)
    assert [p.name for p in written] == ["losses.png", "weights.png", "validation.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size[0] > 400 and image.size[1] > 300
    weights = read_columns(out / "steps.csv")
    assert len(weights["weight/left"]) == 2 * 4  # 256 samples / batch 64, 2 epochs
    assert weights["weight/left"][0] == pytest.approx(0.5)  # UW (regression form): exp(-0) / 2


def test_weightless_aggregators_get_no_weight_plot(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--no-progress", "--epochs", "1", "--method", "graddrop", "--out", str(out)]
    argv += ["data_args.n_train=128", "data_args.n_val=64", "data_args.n_test=64"]
    assert main(argv) == 0
    assert [p.name for p in plot_run(out)] == ["losses.png", "validation.png"]


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MtlkitError, match="is this a run folder"):
        plot_run(tmp_path)


def test_train_draws_the_plots_and_plot_redraws_them(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--no-progress", "--epochs", "1", "--out", str(out)]
    argv += ["data_args.n_train=128", "data_args.n_val=64", "data_args.n_test=64"]
    assert main(argv) == 0
    assert (out / "weights.png").is_file() and (out / "losses.png").is_file()
    (out / "weights.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert "weights.png" in capsys.readouterr().out and (out / "weights.png").is_file()
    assert main(["plot", str(tmp_path / "nothing")]) == 2


# --- compare folders ------------------------------------------------------------------------------


def write_compare_folder(folder, with_runs: bool = False):
    """A compare folder as ``mtlkit compare`` leaves it: results.csv and compare.json (two
    methods x two strategies x two seeds x two budgets, two tasks), no training needed."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "tasks": {"left": {"metrics": {"acc": True}, "weight": 1.0},
                  "sum": {"metrics": {"mae": False}, "weight": 1.0}},
        "methods": ["ew", "mgda"],
        "strategies": ["joint", "alternating"],
        "seeds": [0, 1],
        "budgets": [{"name": "epochs2", "epochs": 2}, {"name": "fb40", "forward_backward": 40}],
        "baseline": "single-task baselines",
        "baselines": {"0": {"left": {"acc": 0.8}, "sum": {"mae": 2.0}},
                      "1": {"left": {"acc": 0.82}, "sum": {"mae": 1.9}}},
    }  # fmt: skip
    (folder / "compare.json").write_text(json.dumps(meta))
    header = "run,method,strategy,seed,budget,left/acc,sum/mae,delta_m,seconds,forward_backward"
    lines = [header]
    for b, budget in enumerate(["epochs2", "fb40"]):
        for m, method in enumerate(["ew", "mgda"]):
            for s, strategy in enumerate(["joint", "alternating"]):
                for seed in (0, 1):
                    acc, mae = 0.7 + 0.05 * m + 0.01 * seed + 0.02 * b, 2.2 - 0.1 * s
                    run = f"{method}-{strategy}-seed{seed}-{budget}"
                    lines.append(
                        f"{run},{method},{strategy},{seed},{budget},{acc},{mae},"
                        f"{5.0 - 2 * m + seed},{1.0 + m + 2 * s},{40 * (b + 1)}"
                    )
                    if with_runs:
                        metrics = folder / "runs" / run / "metrics.csv"
                        metrics.parent.mkdir(parents=True)
                        metrics.write_text("epoch,val/left/acc,val/sum/mae\n1,0.5,2.5\n2,0.6,2.4\n")
                        # ew: constant weights; mgda: weights that change
                        steps = ["step,epoch,weight/left,weight/sum"]
                        steps += [f"{k},1,{1 - m * k / 10},{1 + m * k / 10}" for k in (1, 2, 3)]
                        (metrics.parent / "steps.csv").write_text("\n".join(steps) + "\n")
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_pareto_front_of_known_points():
    points = [(0.9, 2.0), (0.8, 1.5), (0.7, 1.6), (0.9, 2.1), (0.95, 2.5), (math.nan, 0.0)]
    # acc: higher is better, mae: lower is better
    assert pareto_front(points, (True, False)) == [0, 1, 4]
    # both higher is better: (0.95, 2.5) dominates every other point
    assert pareto_front(points, (True, True)) == [4]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], (True, True)) == [0, 1]  # ties: both kept
    assert pareto_front([], (True, True)) == []


def test_read_results_parses_numbers_and_keeps_text(tmp_path):
    rows = read_results(write_compare_folder(tmp_path / "cmp") / "results.csv")
    assert len(rows) == 16
    assert rows[0]["method"] == "ew" and rows[0]["budget"] == "epochs2"
    assert rows[0]["left/acc"] == pytest.approx(0.7) and rows[0]["seed"] == 0.0
    with pytest.raises(MtlkitError, match="is this a compare folder"):
        read_results(tmp_path / "missing.csv")


def test_plot_compare_draws_readable_figures(tmp_path):
    folder = write_compare_folder(tmp_path / "cmp", with_runs=True)
    written = plot_compare(folder)
    names = ["delta_m.png", "quality_vs_cost.png", "pareto.png", "curves.png", "weights.png"]
    assert [p.name for p in written] == names
    for path in written:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 700 and image.size[1] >= 400


def test_plot_redraws_a_compare_folder_and_tells_it_from_a_run_folder(tmp_path, capsys):
    folder = write_compare_folder(tmp_path / "cmp")  # no run folders: no curves
    assert [p.name for p in plot_folder(folder)] == ["delta_m.png", "quality_vs_cost.png",
                                                     "pareto.png"]  # fmt: skip
    (folder / "pareto.png").unlink()
    assert main(["plot", str(folder)]) == 0
    assert "pareto.png" in capsys.readouterr().out and (folder / "pareto.png").is_file()
    (folder / "compare.json").unlink()  # not a compare folder any more, nor a run folder
    assert main(["plot", str(folder)]) == 2
    assert "is this a run folder" in capsys.readouterr().err


def test_one_task_has_no_pareto_plot_and_no_baseline_no_delta_m_plot(tmp_path):
    folder = tmp_path / "cmp"
    folder.mkdir()
    meta = {"tasks": {"left": {"metrics": {"acc": True}, "weight": 1.0}}, "methods": ["ew"],
            "strategies": ["joint"], "seeds": [0], "budgets": [], "baselines": {}}  # fmt: skip
    (folder / "compare.json").write_text(json.dumps(meta))
    (folder / "results.csv").write_text(
        "run,method,strategy,seed,budget,left/acc,delta_m,seconds,forward_backward\n"
        "ew-joint-seed0,ew,joint,0,,0.8,,1.0,40\n"
    )
    assert plot_compare(folder) == []


def test_compare_weights_draw_changing_weights_and_name_constant_ones(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    folder = write_compare_folder(tmp_path / "cmp", with_runs=True)
    titles, drawn = [], []
    suptitle, plot = Figure.suptitle, Figure.add_subplot
    monkeypatch.setattr(
        Figure, "suptitle", lambda fig, t, **kw: titles.append(t) or suptitle(fig, t, **kw)
    )
    monkeypatch.setattr(
        Figure, "add_subplot", lambda fig, *a, **kw: drawn.append(1) or plot(fig, *a, **kw)
    )
    plt = pytest.importorskip("matplotlib.pyplot")
    meta = json.loads((folder / "compare.json").read_text())
    rows = read_results(folder / "results.csv")
    path = plot_compare_weights(plt, folder, rows, meta, folder / "weights.png")
    assert path == folder / "weights.png" and path.is_file()
    assert len(drawn) == 2  # mgda / joint, mgda / alternating: one panel each
    assert "budget epochs2" in titles[0]
    assert "constant: ew / joint (1), ew / alternating (1)" in titles[0]
    meta["methods"] = ["ew"]  # only constant weights: no figure
    assert plot_compare_weights(plt, folder, rows, meta, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
