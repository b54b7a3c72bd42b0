"""The two-objective toy: the functions, the Pareto set, the runner and ``mtlkit toy``."""

from __future__ import annotations

import csv
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor

from mtlkit.app.cli import main
from mtlkit.app.toy import (
    STARTS,
    front_distance,
    front_x2,
    parse_starts,
    plot_runs,
    run_method,
    run_toy,
    table_rows,
    toy_losses,
)
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods import UW, GramianWeighting

F64 = torch.float64

# (x1, x2) -> (L1, L2) with s = 1, evaluated in float64 with a literal transcription of the
# reference code (CAGrad's toy.py, Nash-MTL's experiments/toy/problem.py)
GOLDEN = {
    (-8.5, 7.5): (6.552363407771327, 7.900798143172848),
    (9.0, 9.0): (7.943949188978327, 6.691495369217006),
    (-7.5, -0.5): (0.3888083765658879, -4.754483533912004),
    (9.0, -1.0): (-8.831058875238785, 2.8142934877134578),
    (0.0, -8.3552): (-15.091638445196326, -15.091638445196326),
    (0.0, 0.0): (0.0, 0.0),
}


def test_values_at_known_points_match_the_reference_code() -> None:
    for point, (l1, l2) in GOLDEN.items():
        x = torch.tensor(point, dtype=F64)
        f1, f2 = toy_losses(x, scale=1.0)
        assert float(f1) == pytest.approx(l1, rel=1e-14, abs=1e-14)
        assert float(f2) == pytest.approx(l2, rel=1e-14, abs=1e-14)
        assert float(toy_losses(x)[0]) == pytest.approx(0.1 * l1, rel=1e-14, abs=1e-14)
    batch = torch.tensor(list(GOLDEN), dtype=F64)
    f1, f2 = toy_losses(batch, scale=1.0)
    np.testing.assert_allclose(f1.numpy(), [v[0] for v in GOLDEN.values()], rtol=1e-14)
    np.testing.assert_allclose(f2.numpy(), [v[1] for v in GOLDEN.values()], rtol=1e-14)


def test_the_run_from_the_origin_moves() -> None:
    """At x2 = 0 clamp(tanh(x2/2), 0) passes the gradient, as in the reference code."""
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    f1, f2 = toy_losses(x, scale=1.0)
    g1 = torch.autograd.grad(f1, x, retain_graph=True)[0]
    g2 = torch.autograd.grad(f2, x)[0]
    # d/dx2 at 0: ½ h_i(0) - ½ q_i(0) with h_1 = h_2 = log 3.5 + 6 and q_1 = q_2 = -14.46
    expected = 0.5 * (math.log(3.5) + 6 + 14.46)
    assert g1.tolist() == [0.0, pytest.approx(expected, rel=1e-14)]
    assert g2.tolist() == [0.0, pytest.approx(expected, rel=1e-14)]


def gradients(point: tuple[float, float]) -> tuple[Tensor, Tensor]:
    x = torch.tensor(point, dtype=F64, requires_grad=True)
    f1, f2 = toy_losses(x)
    return torch.autograd.grad(f1, x, retain_graph=True)[0], torch.autograd.grad(f2, x)[0]


def test_pareto_set_is_where_the_gradients_are_opposite() -> None:
    assert float(front_x2(0.0)) == pytest.approx(-8.35511, abs=1e-5)
    assert float(front_x2(7.0)) == pytest.approx(-8.43446, abs=1e-5)
    assert float(front_x2(-7.0)) == pytest.approx(float(front_x2(7.0)), abs=1e-12)
    for x1 in np.linspace(-6.9, 6.9, 15):
        g1, g2 = gradients((float(x1), float(front_x2(x1))))
        cosine = float(g1 @ g2 / (g1.norm() * g2.norm()))
        assert cosine == pytest.approx(-1.0, abs=1e-9)
    g1, g2 = gradients((0.0, -7.5))  # off the set: not opposite (|sin| well above rounding)
    assert abs(float(g1[0] * g2[1] - g1[1] * g2[0])) / float(g1.norm() * g2.norm()) > 0.03
    assert front_distance((0.0, float(front_x2(0.0)))) == pytest.approx(0.0, abs=1e-9)
    assert front_distance((0.0, 0.0)) == pytest.approx(8.35511, abs=1e-4)
    assert front_distance((10.0, float(front_x2(7.0)))) == pytest.approx(3.0, abs=1e-9)
    with pytest.raises(ValueError, match="-7, 7"):
        front_x2(7.5)


def test_ew_decreases_the_summed_loss() -> None:
    run = run_method("ew", STARTS[0], 300, record_every=30)
    assert run.error is None and run.steps == 300 and run.trajectory.shape == (11, 2)
    with torch.no_grad():
        f1, f2 = toy_losses(torch.from_numpy(run.trajectory))
    total = (f1 + f2).numpy()
    assert total[0] == pytest.approx(0.1 * 6.552363407771327 + 7.900798143172848, rel=1e-6)
    assert np.all(np.diff(total) < 0) and total[-1] < total[0] - 0.02
    assert run.losses == (pytest.approx(float(f1[-1])), pytest.approx(float(f2[-1])))
    assert run.steps_per_second > 0 and not run.on_front


def test_a_run_near_the_front_is_reported_on_it() -> None:
    start = (1.0, float(front_x2(1.0)) + 0.01)
    run = run_method("mgda", start, 200)
    assert run.error is None and run.distance < 0.02 and run.on_front


def test_failing_methods_are_rows_not_crashes() -> None:
    runs = run_toy(["krum", "constant"], [(0.0, 0.0)], 10)
    assert [r.method for r in runs] == ["krum", "constant"]
    assert "n_byzantine + 3 = 4 tasks, got 2" in runs[0].error
    assert "needs argument(s) weights" in runs[1].error
    assert all(r.steps == 0 and not r.on_front and r.losses is None for r in runs)
    with pytest.raises(MtlkitError, match="unknown method 'nope'"):
        run_toy(["ew", "nope"], [(0.0, 0.0)], 10)


def test_a_method_with_parameters_matches_a_plain_torch_loop() -> None:
    """UW's log-variances get their own Adam group (lr 0.025) and fresh gradients each step
    (from (-8.5, 7.5), where both losses are positive: UW refuses a negative one)."""
    method = UW(num_tasks=2)
    run = run_method(method, (-8.5, 7.5), 20, record_every=1)
    x = torch.tensor([-8.5, 7.5], requires_grad=True)
    reference = UW(num_tasks=2)
    optimizer = torch.optim.Adam(
        [{"params": [x], "lr": 1e-3}, {"params": [reference.log_vars], "lr": 0.025}]
    )
    for _ in range(20):
        optimizer.zero_grad()
        losses = torch.stack(toy_losses(x))
        reference(losses).total(losses).backward()
        optimizer.step()
    torch.testing.assert_close(method.log_vars, reference.log_vars, rtol=1e-6, atol=1e-7)
    final = torch.tensor(run.final, dtype=torch.float32)
    torch.testing.assert_close(final, x.detach(), rtol=1e-6, atol=1e-6)
    assert float(method.log_vars.detach().abs().min()) > 0.1  # moved: 20 steps of about 0.025


class ExtraRecorder(GramianWeighting):
    """Records the extra Jacobians it is given and the Gramians it is asked to weight."""

    extra_batches = 2

    def __init__(self) -> None:
        super().__init__()
        self.extra: list = []
        self.gramians: list = []

    def observe_extra(self, jacobians) -> None:
        self.extra.append([j.clone() for j in jacobians])

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        self.gramians.append(gramian.clone())
        return torch.ones(2, dtype=gramian.dtype)


def test_extra_batches_get_the_same_jacobian() -> None:
    method = ExtraRecorder()
    run = run_method(method, (1.0, 2.0), 3, dtype=F64)
    assert run.error is None and len(method.extra) == 3
    for extra, gramian in zip(method.extra, method.gramians):
        assert len(extra) == 2 and torch.equal(extra[0], extra[1])
        torch.testing.assert_close(extra[0] @ extra[0].T, gramian, rtol=1e-14, atol=0)


class Warner(GramianWeighting):
    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        warnings.warn("solver gave up", RuntimeWarning, stacklevel=2)
        return torch.ones(2, dtype=gramian.dtype)


def test_warnings_are_counted_not_lost() -> None:
    run = run_method(Warner(), (-7.5, -0.5), 5)
    assert run.error is None and run.warnings == {"solver gave up": 5}
    assert table_rows([run])[0]["warnings"] == "5 x solver gave up"


def test_cli_writes_the_picture_and_the_tables(tmp_path, capsys) -> None:
    out = tmp_path / "toy"
    argv = ["toy", "--steps", "150", "--methods", "ew,mgda", "krum", "--out", str(out)]
    code = main([*argv, "--starts=-8.5,7.5;(9,-1)", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| ew | 0/2 |" in printed and "Krum(n_byzantine=1) needs" in printed
    png = (out / "toy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with (out / "toy.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["start"]) for r in rows] == [
        (m, s) for m in ("ew", "mgda", "krum") for s in ("(-8.5, 7.5)", "(9, -1)")
    ]
    assert all(r["on_front"] == "no" and r["steps"] == "150" for r in rows[:4])
    assert all(r["on_front"] == "error" and r["error"] for r in rows[4:])
    ew = rows[0]
    x = torch.tensor([float(ew["x1"]), float(ew["x2"])], dtype=F64)
    assert float(ew["L2"]) == pytest.approx(float(toy_losses(x)[1]), abs=1e-3)
    text = (out / "toy.md").read_text()
    assert "## Per method" in text and "| krum | 0/2 |" in text


def test_cli_errors(tmp_path, capsys) -> None:
    assert main(["toy", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["toy", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert main(["toy", "--starts", "1,2,3", "--out", str(tmp_path)]) == 2


def test_jobs_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="jobs must be >= 1, got 0"):
        run_toy(["ew"], STARTS[:1], 5, jobs=0)


@pytest.mark.slow  # two spawned worker processes import torch (~5 s)
def test_worker_processes_give_the_same_runs_in_order() -> None:
    names, starts = ["mgda", "famo"], [(0.0, 0.0), (-8.5, 7.5)]
    serial = run_toy(names, starts, 60, dtype=F64)
    parallel = run_toy(names, starts, 60, jobs=2, dtype=F64)
    assert [(r.method, r.start) for r in parallel] == [(r.method, r.start) for r in serial]
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.trajectory, b.trajectory)
        assert a.solver == b.solver and a.error is None


def test_parse_starts() -> None:
    assert parse_starts("(-8.5, 7.5); (0,0)") == [(-8.5, 7.5), (0.0, 0.0)]
    assert parse_starts("-8.5,7.5 9,9") == [(-8.5, 7.5), (9.0, 9.0)]
    for bad in ("", "1", "a,b", "1,nan"):
        with pytest.raises(ConfigError):
            parse_starts(bad)


def test_plot_names_the_extra_when_matplotlib_is_missing(tmp_path, monkeypatch) -> None:
    runs = run_toy(["ew"], [(0.0, 0.0)], 2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(MtlkitError, match=r"mtlkit\[plot\]"):
        plot_runs(runs, tmp_path / "toy.png")


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_loss_lower_bounds_hold_on_a_dense_grid(scale):
    from mtlkit.app.toy import loss_lower_bounds, toy_losses

    grid = torch.stack(
        torch.meshgrid(torch.linspace(-30, 30, 601), torch.linspace(-30, 30, 601), indexing="ij"),
        dim=-1,
    ).double()
    l1, l2 = toy_losses(grid, scale)
    bound1, bound2 = loss_lower_bounds(scale)
    assert float(l1.min()) > bound1 and float(l2.min()) > bound2
    assert float(l2.min()) < -19.9  # the bound is nearly attained: it is not vacuous


def test_famo_runs_on_the_toy_with_its_loss_bounds():
    from mtlkit.app.toy import run_method

    run = run_method("famo", (0.0, 0.0), steps=300)  # the losses are <= 0 from the start
    assert run.error is None and run.steps == 300
