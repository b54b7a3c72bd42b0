"""MultiDigits: the bundled UCI digits, the pairs, the targets and the tasks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mtlkit.data import (
    SUM_MEAN,
    SUM_SCALE,
    MultiDigits,
    MultiDigitsConfig,
    SumMeanAbsoluteError,
    load_uci_digits,
    multidigits,
    multidigits_tasks,
    sum_from_output,
    sum_loss,
)
from mtlkit.data.multidigits import _stratified_order
from mtlkit.errors import ConfigError, MtlkitError

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def uci() -> tuple[torch.Tensor, torch.Tensor]:
    return load_uci_digits()


@pytest.fixture(scope="module")
def default() -> dict[str, MultiDigits]:
    return multidigits(seed=0)


def test_load_uci_digits(uci):
    images, labels = uci
    assert images.shape == (1797, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == 0.0 and images.max() == 1.0
    # pixels are multiples of 1/16
    assert torch.equal(images * 16, (images * 16).round())
    counts = torch.bincount(labels, minlength=10)
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # first row of the file: a zero
    assert labels[0] == 0 and images[0, 0, 2] == 5 / 16


def test_shapes_dtypes_ranges(default):
    sizes = {"train": 5000, "val": 1000, "test": 1000}
    for split in SPLITS:
        ds = default[split]
        assert isinstance(ds, MultiDigits) and len(ds) == sizes[split]
        x, y = ds[0]
        assert x.shape == (1, 8, 12) and x.dtype == torch.float32
        assert set(y) == {"left", "right", "sum"}
        assert y["left"].shape == () and y["left"].dtype == torch.int64
        assert y["right"].shape == () and y["right"].dtype == torch.int64
        assert y["sum"].shape == () and y["sum"].dtype == torch.float32
        assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
        assert ds.left.min() >= 0 and ds.left.max() <= 9
        assert ds.right.min() >= 0 and ds.right.max() <= 9
        assert ds.source_indices.shape == (len(ds), 2)
        assert ds.source_indices.dtype == torch.int64


def test_default_collate(default):
    x, y = next(iter(DataLoader(default["val"], batch_size=7)))
    assert x.shape == (7, 1, 8, 12) and x.dtype == torch.float32
    assert {k: tuple(v.shape) for k, v in y.items()} == {"left": (7,), "right": (7,), "sum": (7,)}
    assert y["sum"].dtype == torch.float32 and y["left"].dtype == torch.int64


def test_deterministic_per_seed(default):
    again = multidigits(seed=0)
    other = multidigits(seed=1)
    for split in SPLITS:
        for attr in ("images", "left", "right", "sum", "source_indices"):
            assert torch.equal(getattr(default[split], attr), getattr(again[split], attr))
        assert not torch.equal(default[split].images, other[split].images)
        assert not torch.equal(default[split].source_indices, other[split].source_indices)


def test_split_does_not_depend_on_other_split_sizes(default):
    small = multidigits(seed=0, n_train=10, n_val=5)
    assert torch.equal(small["test"].images, default["test"].images)
    assert torch.equal(small["test"].source_indices, default["test"].source_indices)


def test_source_pools_are_disjoint(default):
    rows = {split: set(default[split].source_indices.flatten().tolist()) for split in SPLITS}
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]
    # 5000 pairs use (nearly) all of the ~60% train pool
    assert 1000 <= len(rows["train"]) <= 1079
    assert 300 <= len(rows["val"]) <= 360 and 300 <= len(rows["test"]) <= 360


def test_targets_match_sources(default, uci):
    _, labels = uci
    for split in SPLITS:
        ds = default[split]
        assert torch.equal(ds.left, labels[ds.source_indices[:, 0]])
        assert torch.equal(ds.right, labels[ds.source_indices[:, 1]])
        assert torch.equal(ds.sum, (ds.left + ds.right).float())
        assert ds.sum.min() >= 0 and ds.sum.max() <= 18


def test_images_rebuilt_from_sources_without_noise(uci):
    images, _ = uci
    ds = multidigits(seed=3, n_train=20, n_val=20, n_test=20, noise=0.0)["test"]
    for i in (0, 7, 19):
        a, b = ds.source_indices[i].tolist()
        canvas = torch.zeros(8, 12)
        canvas[:, :8] = images[a]
        canvas[:, 4:] = torch.maximum(canvas[:, 4:], images[b])
        assert torch.equal(ds[i][0], canvas.unsqueeze(0))
    # columns 0-3 are the left digit alone, 8-11 the right digit alone
    a, b = ds.source_indices[:, 0], ds.source_indices[:, 1]
    assert torch.equal(ds.images[:, 0, :, :4], images[a][:, :, :4])
    assert torch.equal(ds.images[:, 0, :, 8:], images[b][:, :, 4:])


def test_shift_sets_canvas_width(uci):
    images, _ = uci
    ds = multidigits(seed=0, n_train=5, n_val=5, n_test=5, noise=0.0, shift=8)["train"]
    assert ds.images.shape == (5, 1, 8, 16)
    assert torch.equal(ds.images[:, 0, :, :8], images[ds.source_indices[:, 0]])
    assert torch.equal(ds.images[:, 0, :, 8:], images[ds.source_indices[:, 1]])


def test_noise_changes_pixels_not_pairs():
    clean = multidigits(seed=0, n_train=50, n_val=5, n_test=5, noise=0.0)["train"]
    noisy = multidigits(seed=0, n_train=50, n_val=5, n_test=5, noise=0.3)["train"]
    assert torch.equal(clean.source_indices, noisy.source_indices)
    assert noisy.images.min() >= 0.0 and noisy.images.max() <= 1.0
    diff = (noisy.images - clean.images).abs()
    assert diff.mean() > 0.05


def test_class_balance(default):
    for split in SPLITS:
        ds = default[split]
        for labels in (ds.left, ds.right):
            freq = torch.bincount(labels, minlength=10).float() / len(ds)
            assert freq.min() > 0.06 and freq.max() < 0.14


def test_stratified_order_windows_are_balanced(uci):
    _, labels = uci
    order = _stratified_order(labels, torch.Generator().manual_seed(0))
    assert torch.equal(order.sort().values, torch.arange(1797))
    for start, size in ((0, 1078), (1078, 359), (1437, 360), (500, 100)):
        counts = torch.bincount(labels[order[start : start + size]], minlength=10)
        expected = torch.bincount(labels, minlength=10).float() * size / 1797
        assert (counts - expected).abs().max() <= 1.5


def test_tasks_losses_and_metrics(default):
    tasks = {t.name: t for t in multidigits_tasks()}
    assert list(tasks) == ["left", "right", "sum"]
    assert tasks["left"].higher_is_better() == {"acc": True}
    assert tasks["sum"].higher_is_better() == {"mae": False}
    _, y = next(iter(DataLoader(default["test"], batch_size=32)))
    logits = torch.randn(32, 10, requires_grad=True)
    tasks["left"].loss(logits, y["left"]).backward()
    assert logits.grad is not None

    # a perfect normalised sum output: zero loss and zero MAE, for [B] and [B, 1]
    perfect = (y["sum"] - SUM_MEAN) / SUM_SCALE
    for out in (perfect, perfect.unsqueeze(1)):
        assert tasks["sum"].loss(out, y["sum"]).item() == pytest.approx(0.0, abs=1e-12)
        metric = tasks["sum"].new_metrics()["mae"]
        metric.update(out, y["sum"])
        assert metric.compute() == pytest.approx(0.0, abs=1e-6)
    # output 0 predicts the mean sum 9
    metric = SumMeanAbsoluteError()
    metric.update(torch.zeros(32, 1), y["sum"])
    assert metric.compute() == pytest.approx(float((y["sum"] - 9).abs().mean()), rel=1e-6)
    assert sum_loss(torch.zeros(32), y["sum"]).item() == pytest.approx(
        float(((y["sum"] - 9) / 4).pow(2).mean()), rel=1e-6
    )
    assert torch.equal(sum_from_output(torch.tensor([0.0, 1.0])), torch.tensor([9.0, 13.0]))
    with pytest.raises(MtlkitError):
        sum_loss(torch.zeros(32, 2), y["sum"])
    with pytest.raises(MtlkitError):
        metric.update(torch.zeros(31), y["sum"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": 0},
        {"n_test": 2.5},
        {"noise": -0.1},
        {"noise": float("nan")},
        {"shift": -1},
        {"pool_fractions": (0.6, 0.3, 0.2)},
        {"pool_fractions": (0.5, 0.5)},
    ],
)
def test_config_errors(kwargs):
    with pytest.raises(ConfigError):
        MultiDigitsConfig(**kwargs)


def test_config_build_equals_function():
    a = MultiDigitsConfig(n_train=10, n_val=10, n_test=10, seed=5).build()
    b = multidigits(seed=5, n_train=10, n_val=10, n_test=10)
    assert all(torch.equal(a[s].images, b[s].images) for s in SPLITS)
