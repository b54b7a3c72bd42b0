"""Issue 19, case 3: a solver-based method reports each step's solver status (steps.csv,
TensorBoard, the toy's counts) and warns once per run instead of once per step."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from mtlkit import Budget, Joint, Trainer, methods
from mtlkit.app.toy import front_x2, run_method
from mtlkit.architectures import build
from mtlkit.data.benchmarks import DATASETS
from mtlkit.training.diagnostics import SOLVER_COLUMNS
from mtlkit.training.optim import optimizer


def test_nash_mtl_on_the_toy_warns_once_and_counts_every_step() -> None:
    """200 float64 steps from just above the front at x1 = 2: 91 solves find the gradients
    Pareto-stationary; each issued a RuntimeWarning before (91 warnings; 35,000 float32 steps
    from the five starts gave 19,807-28,357 per run), now one, and the statuses count them."""
    start = (2.0, float(front_x2(2.0)) + 0.01)
    run = run_method("nash_mtl", start, 200, dtype=torch.float64)
    assert run.error is None
    assert sum(run.warnings.values()) == 1
    (message,) = run.warnings
    assert "Pareto-stationary" in message and "once per run" in message
    assert sum(run.solver.values()) == 200
    stationary = run.solver["newton: Pareto-stationary: no solution, zero weights"]
    assert stationary == 91 and run.solver["newton: converged"] == 109


def test_a_new_run_warns_again() -> None:
    method = methods.get("nash_mtl")
    method.setup(2)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="Pareto-stationary"):
        method(opposite)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decision = method.aggregate(opposite)
    assert not decision.status.converged and "Pareto-stationary" in decision.status.message
    method.reset()
    with pytest.warns(RuntimeWarning, match="Pareto-stationary"):
        method(opposite)


def _train(tmp_path, name: str, tensorboard: bool = False) -> list[dict[str, str]]:
    torch.manual_seed(0)
    problem = DATASETS.get("multidigits", seed=0, n_train=128, n_val=32, n_test=32)
    model = build("hps", problem.input_shape, problem.task_outputs, backbone="mlp")
    train = DataLoader(problem.splits["train"], batch_size=64)
    trainer = Trainer(
        model,
        problem.tasks,
        Joint(methods.get(name)),
        optimizer("adam", lr=1e-3),
        budget=Budget(epochs=1),
        out_dir=tmp_path,
        progress=False,
        tensorboard=tensorboard,
    )
    trainer.fit(train, DataLoader(problem.splits["val"], batch_size=32))
    with open(tmp_path / "steps.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("name", ["mgda", "cagrad", "nash_mtl", "upgrad"])
def test_steps_csv_has_the_solver_status(tmp_path, name: str) -> None:
    rows = _train(tmp_path, name)
    assert len(rows) == 2
    for row in rows:
        assert row["solver/converged"] == "1"
        assert int(row["solver/iterations"]) >= 0 and float(row["solver/residual"]) <= 1e-9
        assert row["solver/message"] == ""


def test_methods_without_a_solver_have_no_solver_columns(tmp_path) -> None:
    rows = _train(tmp_path, "ew")
    assert not set(SOLVER_COLUMNS) & set(rows[0])


def test_tensorboard_gets_the_numeric_solver_columns(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, "mgda", tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tb" / "steps"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"solver/converged", "solver/iterations", "solver/residual"} <= tags
    assert "solver/message" not in tags
    assert [e.value for e in events.Scalars("solver/converged")] == [1.0, 1.0]
