"""Standardised regression targets, measured in original units (Standardizer, OriginalUnits,
regression_tasks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtlkit import Budget, Trainer, optimizer
from mtlkit.architectures import build
from mtlkit.data import (
    Standardizer,
    TensorTasks,
    regression_loss,
    regression_tasks,
    split_dataset,
)
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.metrics import MeanAbsoluteError, OriginalUnits, RootMeanSquaredError
from mtlkit.training.evaluation import evaluate_model


def scaled_problem(n: int = 400) -> TensorTasks:
    """Two targets of very different scales and offsets: energy ~ 1e4 +- 300, [N, 1]; and a
    pair of lengths ~ 2 +- 0.05 and -7 +- 3, [N, 2]."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    energy = 1e4 + 300 * (x[:, :1] - 0.5 * x[:, 1:2])
    lengths = torch.stack([2 + 0.05 * x[:, 2], -7 + 3 * x[:, 3] * x[:, 4]], dim=1)
    return TensorTasks(x, {"energy": energy, "lengths": lengths, "kind": (x[:, 0] > 0).long()})


def test_fit_uses_the_given_split_and_transform_standardises_it():
    splits = split_dataset(scaled_problem(), seed=1)
    scaler = Standardizer.fit(splits["train"], tasks=["energy", "lengths"])
    y = splits["train"].targets["lengths"].double().numpy()
    assert np.allclose(scaler.mean["lengths"].numpy(), y.mean(axis=0), rtol=0, atol=1e-12)
    assert np.allclose(scaler.std["lengths"].numpy(), y.std(axis=0, ddof=0), rtol=1e-12)
    assert scaler.mean["energy"].shape == (1,) and scaler.tasks == ["energy", "lengths"]
    train = scaler.transform(splits["train"])
    for task in ("energy", "lengths"):
        z = train.targets[task].double()
        assert torch.allclose(z.mean(0), torch.zeros(z.shape[1:], dtype=z.dtype), atol=1e-5)
        assert torch.allclose(z.std(0, correction=0), torch.ones(z.shape[1:], dtype=z.dtype))
        assert torch.allclose(
            scaler.inverse(task, z), splits["train"].targets[task].double(), rtol=1e-6, atol=1e-5
        )  # z is held in float32: about 1e-7 of a standard deviation
    assert torch.equal(train.targets["kind"], splits["train"].targets["kind"])  # untouched
    test = scaler.transform(splits["test"])  # the training mean, not the test split's own
    expected = (splits["test"].targets["energy"].double() - scaler.mean["energy"]) / scaler.std[
        "energy"
    ]
    assert torch.allclose(test.targets["energy"].double(), expected, atol=1e-6)
    assert float(test.targets["energy"].mean()) != pytest.approx(0.0, abs=1e-6)
    again = Standardizer.from_dict(json.loads(json.dumps(scaler.to_dict())))
    assert all(torch.equal(again.std[t], scaler.std[t]) for t in scaler.tasks)


def test_fit_errors_name_the_task():
    data = scaled_problem(20)
    with pytest.raises(ConfigError, match=r"task 'kind' has torch.int64 targets"):
        Standardizer.fit(data)
    with pytest.raises(ConfigError, match=r"unknown task.*'nope'"):
        Standardizer.fit(data, tasks=["nope"])
    constant = {"flat": torch.stack([torch.randn(20), torch.full((20,), 3.0)], dim=1)}
    with pytest.raises(ConfigError, match=r"task 'flat' has std 0.0 at element \[1\]"):
        Standardizer.fit(constant)
    with pytest.raises(ConfigError, match="non-finite"):
        Standardizer.fit({"a": torch.tensor([1.0, float("nan"), 2.0])})
    with pytest.raises(ConfigError, match="at least 2 samples"):
        Standardizer.fit({"a": torch.tensor([1.0])})
    scaler = Standardizer.fit(data, tasks=["energy"])
    with pytest.raises(ConfigError, match="no task 'lengths'; it standardises energy"):
        scaler.metric("lengths")
    with pytest.raises(ConfigError, match="no task 'lengths'"):
        regression_tasks(["energy", "lengths"], scaler)


def test_original_units_mae_and_rmse_equal_the_hand_computation():
    mean, std = np.array([1e4, -7.0]), np.array([300.0, 0.25])
    rng = np.random.default_rng(0)
    z_out, z_tgt = rng.normal(size=(23, 2)), rng.normal(size=(23, 2))
    out, tgt = z_out * std + mean, z_tgt * std + mean  # original units, by hand
    mae = OriginalUnits(MeanAbsoluteError, mean=torch.tensor(mean), scale=torch.tensor(std))
    rmse = OriginalUnits(RootMeanSquaredError, mean=torch.tensor(mean), scale=torch.tensor(std))
    for lo, hi in [(0, 1), (1, 8), (8, 23)]:  # unequal batches
        for metric in (mae, rmse):
            metric.update(torch.tensor(z_out[lo:hi]), torch.tensor(z_tgt[lo:hi]))
    assert mae.compute() == pytest.approx(np.abs(out - tgt).mean(), rel=1e-12)
    assert rmse.compute() == pytest.approx(np.sqrt(((out - tgt) ** 2).mean()), rel=1e-12)
    assert not mae.higher_is_better
    standardised = np.abs(z_out - z_tgt).mean()  # what a plain MAE on z would say
    assert mae.compute() > 100 * standardised
    one = OriginalUnits(MeanAbsoluteError, mean=5.0, scale=2.0)  # [B, 1] output, [B] target
    one.update(torch.tensor([[1.0], [0.0]]), torch.tensor([0.0, 0.0]))
    assert one.compute() == pytest.approx(1.0)  # |(1*2+5) - 5| and 0, mean 1
    mae.reset()
    with pytest.raises(MtlkitError, match="before any update"):
        mae.compute()
    with pytest.raises(MtlkitError, match="non-zero"):
        OriginalUnits(MeanAbsoluteError, scale=torch.tensor([1.0, 0.0]))


def test_regression_loss_refuses_a_broadcasting_shape():
    out = torch.tensor([[1.0], [3.0]])
    assert float(regression_loss(out, torch.tensor([0.0, 1.0]))) == pytest.approx(2.5)
    with pytest.raises(MtlkitError, match=r"output shape \(2, 2\) != target shape \(2,\)"):
        regression_loss(torch.zeros(2, 2), torch.zeros(2))


def test_trained_on_standardised_targets_the_mae_is_in_original_units():
    splits = split_dataset(scaled_problem(), seed=0)
    scaler = Standardizer.fit(splits["train"], tasks=["energy", "lengths"])
    data = {k: scaler.transform(v) for k, v in splits.items()}
    tasks = regression_tasks(["energy", "lengths"], scaler)
    assert [sorted(t.metrics) for t in tasks] == [["mae", "rmse"], ["mae", "rmse"]]
    torch.manual_seed(0)
    model = build("hps", data["train"].input_shape, {"energy": 1, "lengths": 2}, widths=[32])
    loaders = {k: DataLoader(v, batch_size=32, shuffle=k == "train") for k, v in data.items()}
    trainer = Trainer(
        model,
        tasks,
        optimizer=optimizer("adam", lr=1e-2),
        budget=Budget(epochs=4),
        progress=False,
    )
    trainer.fit(loaders["train"], loaders["val"])
    results = evaluate_model(model, tasks, loaders["test"], torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        pred = model(data["test"].inputs)
    for task in ("energy", "lengths"):  # by hand: predictions back in units, raw test targets
        p = (pred[task].double() * scaler.std[task] + scaler.mean[task]).numpy()
        y = splits["test"].targets[task].double().numpy()
        # rel 1e-6: the test targets are held standardised in float32 (1e-7 of a std apart)
        assert results[task]["mae"] == pytest.approx(np.abs(p - y).mean(), rel=1e-6)
        assert results[task]["rmse"] == pytest.approx(np.sqrt(((p - y) ** 2).mean()), rel=1e-6)
    assert results["energy"]["mae"] < 0.3 * float(scaler.std["energy"])  # it learnt something
    assert results["energy"]["loss"] < 0.2  # the loss is on the standardised targets


def test_regression_tasks_check_their_arguments():
    with pytest.raises(ConfigError, match="valid metrics: mae, rmse"):
        regression_tasks(["a"], metrics=["r2"])
    with pytest.raises(ConfigError, match="at least one task"):
        regression_tasks([])
    with pytest.raises(ConfigError, match=r"unknown task.*b"):
        regression_tasks(["a"], weights={"b": 2.0})
    (plain,) = regression_tasks(["a"], weights={"a": 2.0})
    assert plain.weight == 2.0
    metric = plain.new_metrics()["mae"]
    metric.update(torch.tensor([[1.0], [4.0]]), torch.tensor([0.0, 0.0]))
    assert metric.compute() == pytest.approx(2.5)  # no standardiser: the identity
