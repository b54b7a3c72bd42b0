"""Preference sweeps in ``mtlkit compare``: expansion of a method entry into one run per
preference vector, the front columns of results.csv (hypervolume recomputed from the rows),
the front section of results.md, the front plot; config errors before any run."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from conftest import TINY_COMPARE, one_line_error

import mtlkit.app.compare as compare
from mtlkit.app.cli import main
from mtlkit.app.pareto import hypervolume, non_dominated, reference_point

TINY = [
    *TINY_COMPARE,
    "strategies=[joint]",
    "seeds=[0]",
]
SWEEP = (
    "methods=[{name: ls, preferences: {count: 3}}, {name: epo, preferences: [[1, 3], [3, 1]]}, ew]"
)


def test_a_sweep_expands_into_one_run_per_preference_vector():
    grid = compare.load_grid(None, [*TINY, SWEEP])
    labels = [m.label for m in grid.methods]
    assert labels == [
        "ls_p0.75_0.25", "ls_p0.5_0.5", "ls_p0.25_0.75", "epo_p1_3", "epo_p3_1", "ew"
    ]  # fmt: skip
    assert [m.front for m in grid.methods] == ["ls"] * 3 + ["epo"] * 2 + [None]
    assert grid.methods[0].args == {"weights": [0.75, 0.25]}
    assert grid.methods[3].args == {"preference": [1.0, 3.0]}
    again = compare.load_grid(None, [*TINY, f"methods={grid.to_dict()['methods']}"])
    assert [(m.label, m.front, m.args) for m in again.methods] == [
        (m.label, m.front, m.args) for m in grid.methods
    ]


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("[{name: mgda, preferences: {count: 2}}]", "'mgda' takes no preference vector.*epo"),
        ("[{name: epo, preferences: {count: 4, k: 1}}]", "list of vectors or {count: k}"),
        ("[{name: epo, preferences: [[1, 0]]}]", r"preference \[1, 0\] of 'epo' must be"),
        ("[{name: epo, preferences: [[1, a]]}]", r"preference \[1, 'a'\] of 'epo' must be"),
        ("[{name: epo, preferences: [[1, 2, 3]]}]", r"one number per task \(2\)"),
        ("[{name: epo, preferences: [[1, 2]], args: {preference: [1, 1]}}]", "both"),
        ("[{name: pbi, preferences: {count: 0}}]", "count of 'pbi' must be >= 1"),
    ],
)
def test_sweep_errors_are_one_line_before_any_run(methods, message, tmp_path, capsys):
    code = main(["compare", "--out", str(tmp_path / "out"), *TINY, f"methods={methods}"])
    assert code == 2
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "out").exists()


def test_three_tasks_need_a_lattice_count(tmp_path, capsys):
    args = [*TINY, "tasks=[left,right,sum]", "methods=[{name: ls, preferences: {count: 4}}]"]
    assert main(["compare", "--out", str(tmp_path / "out"), *args]) == 2
    assert "valid counts: 1, 3, 6" in one_line_error(capsys)


@pytest.mark.slow
def test_the_sweep_reports_hypervolume_and_draws_the_front(tmp_path):
    out = tmp_path / "out"
    assert main(["compare", "--jobs", "0", "--no-progress", "--out", str(out), *TINY, SWEEP]) == 0
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["front"] for r in rows] == ["ls"] * 3 + ["epo"] * 2 + ["ew"]
    assert rows[0]["preference"] == "0.75 0.25" and rows[3]["preference"] == "1 3"
    points = np.array([[float(r["left/loss"]), float(r["sum/loss"])] for r in rows])
    reference = reference_point(points)
    for members in (slice(0, 3), slice(3, 5), slice(5, 6)):  # ls, epo, ew
        expected = hypervolume(points[members], reference)
        assert float(rows[members.start]["front_hypervolume"]) == pytest.approx(expected)
        flags = [r["non_dominated"] == "yes" for r in rows[members]]
        assert flags == non_dominated(points[members]).tolist()
    text = (out / "results.md").read_text()
    assert "## Pareto fronts" in text and "hypervolume ↑" in text
    assert (out / "front.png").stat().st_size > 1000


def test_front_report_of_given_rows():
    """Fronts from hand-made rows: ls has (1, 3), (2, 2), (3, 3) (the last dominated), epo
    (1.5, 1.5); the reference is the worst (3, 3) plus 10% of the ranges (0.2, 0.15)."""
    from mtlkit.app.compare.front import front_markdown, front_report
    from mtlkit.tasks import Task

    grid = compare.load_grid(None, [*TINY, SWEEP.replace("{count: 3}", "[[3, 1], [1, 1], [1, 3]]")])
    losses = {"ls_p3_1": (1, 3), "ls_p1_1": (2, 2), "ls_p1_3": (3, 3), "epo_p1_3": (1.5, 1.5)}
    rows = [
        {"run": f"{label}-joint-seed0", "method": label, "strategy": "joint", "seed": 0,
         "budget": "", "left/loss": a, "sum/loss": b}
        for label, (a, b) in losses.items()
    ]  # fmt: skip
    tasks = [Task(name="left", loss=None), Task(name="sum", loss=None)]
    report = front_report(grid, rows, tasks)
    np.testing.assert_allclose(report.reference, [3.2, 3.15])
    by_front = {g["front"]: g for g in report.groups}
    # ls: boxes from (1, 3) and (2, 2) up to (3.2, 3.15): 2.2 * 0.15 + 1.2 * (3 - 2) (and
    # nothing from the dominated (3, 3)).
    assert by_front["ls"]["hypervolume"] == pytest.approx(2.2 * 0.15 + 1.2 * 1.0)
    assert by_front["ls"]["non_dominated"] == 2 and by_front["epo"]["runs"] == 1
    assert [r["non_dominated"] for r in report.rows] == ["yes", "yes", "no", "yes"]
    assert report.rows[0]["preference"] == "3 1"
    assert report.pooled[""] == ["ls_p3_1-joint-seed0", "epo_p1_3-joint-seed0"]
    text = "\n".join(front_markdown(grid, report))
    assert "| ls | joint | 1 | 3 | 2 | 1.53 |" in text


def test_a_conditioned_models_run_is_a_front_of_its_own_points():
    """A COSMOS run carries its test rays' losses (``front_points``, from its front.csv): its
    front is those points, next to a sweep's runs, all up to one reference point."""
    from mtlkit.app.compare.front import front_report, has_fronts
    from mtlkit.tasks import Task

    grid = compare.load_grid(None, [*TINY, "methods=[ew, cosmos]"])
    assert not has_fronts(grid)
    rows = [
        {"run": "ew-joint-seed0", "method": "ew", "strategy": "joint", "seed": 0, "budget": "",
         "left/loss": 2.0, "sum/loss": 2.0},
        {"run": "cosmos-joint-seed0", "method": "cosmos", "strategy": "joint", "seed": 0,
         "budget": "", "left/loss": 1.5, "sum/loss": 1.5,
         "front_points": [[1.0, 3.0], [1.5, 1.5], [3.0, 1.0], [3.0, 3.0]]},
    ]  # fmt: skip
    assert has_fronts(grid, rows)
    tasks = [Task(name="left", loss=None), Task(name="sum", loss=None)]
    report = front_report(grid, rows, tasks)
    np.testing.assert_allclose(report.reference, [3.2, 3.2])  # over every point of both
    by_front = {g["front"]: g for g in report.groups}
    points = np.array([[1.0, 3.0], [1.5, 1.5], [3.0, 1.0], [3.0, 3.0]])
    expected = hypervolume(points, np.array([3.2, 3.2]))
    assert by_front["cosmos"]["hypervolume"] == pytest.approx(expected)
    assert by_front["cosmos"]["points"].shape == (4, 2)
    assert [r["non_dominated"] for r in report.rows] == ["yes", "yes"]  # each in its front
    assert by_front["cosmos"]["non_dominated"] == 1  # the run, counted once
    assert report.pooled[""] == ["cosmos-joint-seed0"]  # (1.5, 1.5) dominates ew's (2, 2)
    assert "front_points" not in report.rows[1]


def test_compare_reports_the_front_of_a_cosmos_run(tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--jobs", "0", "--no-progress", "--out", str(out), *TINY]
    assert main([*argv, "methods=[ew, {name: cosmos, args: {test_rays: 4}}]"]) == 0
    with open(out / "results.csv", newline="") as handle:
        rows = {r["method"].split("_")[0]: r for r in csv.DictReader(handle)}
    run = next(p for p in out.rglob("front.csv"))
    with open(run, newline="") as handle:
        points = np.array(
            [[float(r["left/loss"]), float(r["sum/loss"])] for r in csv.DictReader(handle)]
        )
    everything = np.vstack(
        [points, [[float(rows["ew"]["left/loss"]), float(rows["ew"]["sum/loss"])]]]
    )
    expected = hypervolume(points, reference_point(everything))
    assert float(rows["cosmos"]["front_hypervolume"]) == pytest.approx(expected)
    assert "## Pareto fronts" in (out / "results.md").read_text()
