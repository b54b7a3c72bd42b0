"""TensorTasks (a data set from tensors) and split_dataset (a seeded train/val/test split)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from mtlkit import HPS, Budget, MeanAbsoluteError, Trainer, optimizer
from mtlkit.architectures import build
from mtlkit.data import TensorTasks, split_dataset
from mtlkit.errors import ConfigError
from mtlkit.metrics import Accuracy
from mtlkit.tasks import Task


def toy(n: int = 40) -> TensorTasks:
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    return TensorTasks(x, {"reg": x[:, :1] * 2, "cls": torch.arange(n) % 4})


def test_items_and_batches_are_input_and_targets_by_task():
    data = toy()
    x, y = data[5]
    assert torch.equal(x, torch.tensor([15.0, 16.0, 17.0]))
    assert set(y) == {"reg", "cls"} and float(y["reg"][0]) == 30.0 and int(y["cls"]) == 1
    xb, yb = next(iter(DataLoader(data, batch_size=8)))
    assert xb.shape == (8, 3) and yb["reg"].shape == (8, 1) and yb["cls"].shape == (8,)
    assert torch.equal(yb["cls"], torch.arange(8) % 4)
    assert data.input_shape == (3,) and data.task_names == ["reg", "cls"]
    assert data.target_sizes() == {"reg": 1, "cls": 1}
    assert TensorTasks(np.zeros((4, 2)), {"a": np.ones((4, 5))}).target_sizes() == {"a": 5}


def test_a_length_mismatch_names_the_task_and_both_lengths():
    with pytest.raises(ConfigError, match=r"task 'b' has 9 targets but the inputs have 10"):
        TensorTasks(torch.zeros(10, 2), {"a": torch.zeros(10), "b": torch.zeros(9, 1)})
    with pytest.raises(ConfigError, match="mapping"):
        TensorTasks(torch.zeros(3, 2), {})
    with pytest.raises(ConfigError, match="mapping"):
        TensorTasks(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ConfigError, match="scalar"):
        TensorTasks(torch.zeros(3, 2), {"a": torch.tensor(1.0)})
    with pytest.raises(ConfigError, match="non-empty strings"):
        TensorTasks(torch.zeros(3, 2), {"": torch.zeros(3)})
    with pytest.raises(ConfigError, match="inputs must be a tensor"):
        TensorTasks(object(), {"a": torch.zeros(3)})


def test_split_is_a_seeded_partition_and_leaves_the_global_rng_alone():
    data = toy(100)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    splits = split_dataset(data, val=0.1, test=0.2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert {k: len(v) for k, v in splits.items()} == {"train": 70, "val": 10, "test": 20}
    rows = {k: set(v.inputs[:, 0].div(3).long().tolist()) for k, v in splits.items()}
    assert set().union(*rows.values()) == set(range(100))
    assert sum(map(len, rows.values())) == 100  # disjoint
    for split in splits.values():  # targets stay with their inputs
        assert torch.equal(split.targets["reg"][:, 0], split.inputs[:, 0] * 2)
    again = split_dataset(data, val=0.1, test=0.2, seed=7)
    assert all(torch.equal(again[k].inputs, splits[k].inputs) for k in splits)
    other = split_dataset(data, val=0.1, test=0.2, seed=8)
    assert not torch.equal(other["test"].inputs, splits["test"].inputs)
    counts = split_dataset(data, val=5, test=1, seed=0)
    assert (len(counts["train"]), len(counts["val"]), len(counts["test"])) == (94, 5, 1)
    plain = split_dataset(TensorDataset(torch.arange(10)), val=0.2, test=0.2, seed=0)
    assert isinstance(plain["train"], Subset) and len(plain["train"]) == 6


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [
        (0.5, 0.5, "leave no training sample"),
        (0.0, 0.1, r"val must be a fraction in \(0, 1\)"),
        (1.5, 0.1, r"val must be a fraction in \(0, 1\)"),
        (0.1, 0, "test must be a count >= 1"),
        (0.1, True, "test must be a fraction"),
        ("0.1", 0.1, "val must be a fraction"),
    ],
)
def test_bad_split_sizes_are_config_errors(val, test, message):
    with pytest.raises(ConfigError, match=message):
        split_dataset(toy(10), val=val, test=test)


def test_the_trainer_trains_and_evaluates_on_tensor_tasks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    data = TensorTasks(x, {"sum": x.sum(1, keepdim=True), "sign": (x[:, 0] > 0).long()})
    splits = split_dataset(data, seed=0)
    tasks = [
        Task("sum", nn.functional.mse_loss, {"mae": MeanAbsoluteError}),
        Task("sign", nn.functional.cross_entropy, {"acc": Accuracy}),
    ]
    outputs = {**data.target_sizes(), "sign": 2}  # a classification head: one output per class
    torch.manual_seed(0)
    model = build("hps", data.input_shape, outputs, widths=[32])
    assert isinstance(model, HPS)
    loaders = {k: DataLoader(v, batch_size=32, shuffle=k == "train") for k, v in splits.items()}
    trainer = Trainer(
        model,
        tasks,
        optimizer=optimizer("adam", lr=1e-2),
        budget=Budget(epochs=5),
        progress=False,
    )
    before = trainer.evaluate(loaders["test"], write=False)
    trainer.fit(loaders["train"], loaders["val"])
    after = trainer.evaluate(loaders["test"], write=False)
    assert after["sum"]["mae"] < 0.25 * before["sum"]["mae"]
    assert after["sign"]["acc"] > 0.85
