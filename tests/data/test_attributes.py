"""Attributes: the synthetic CelebA-like problem, its structure, metrics, tasks and registration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from mtlkit import Budget, Joint, Trainer, methods
from mtlkit.architectures import build
from mtlkit.data import (
    Attributes,
    AttributesConfig,
    BinaryAccuracy,
    BinaryF1,
    attribute_features,
    attribute_names,
    attributes,
    attributes_tasks,
    binary_loss,
)
from mtlkit.data.attributes import _cached_structure
from mtlkit.data.benchmarks import DATASETS
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.training.optim import optimizer

SPLITS = ("train", "val", "test")
SMALL = {"n_train": 300, "n_val": 100, "n_test": 100}
STRUCTURE_FIELDS = (
    "w1",
    "c1",
    "w2",
    "x_mean",
    "x_std",
    "weights",
    "thresholds",
    "clusters",
    "signs",
    "nonlinear_share",
    "positive_rate",
)


@pytest.fixture(scope="module")
def default() -> dict[str, Attributes]:
    return attributes(seed=0)


@pytest.fixture(scope="module")
def small() -> dict[str, Attributes]:
    return attributes(seed=0, **SMALL)


def test_names():
    assert attribute_names(3) == ["a00", "a01", "a02"]
    names = attribute_names()
    assert len(names) == 40 and names == sorted(names) and names[-1] == "a39"
    assert attribute_names(101)[-1] == "a100" and attribute_names(101)[0] == "a000"


def test_shapes_dtypes(default):
    sizes = {"train": 4000, "val": 1000, "test": 1000}
    names = attribute_names(40)
    for split in SPLITS:
        ds = default[split]
        assert isinstance(ds, Attributes) and len(ds) == sizes[split] and ds.split == split
        x, y = ds[3]
        assert x.shape == (64,) and x.dtype == torch.float32
        assert list(y) == names
        assert all(v.shape == () and v.dtype == torch.float32 for v in y.values())
        assert torch.equal(torch.stack(list(y.values())), ds.labels[3])
        assert set(ds.labels.unique().tolist()) == {0.0, 1.0}
        assert ds.latents.shape == (len(ds), 8)
        assert torch.isfinite(ds.inputs).all()
        assert list(ds.targets) == names and ds.targets["a05"].shape == (len(ds),)


def test_loader_batches_equal_the_collated_items(small):
    ds = small["val"]
    x, y = next(iter(DataLoader(ds, batch_size=7)))  # goes through __getitems__
    x2, y2 = default_collate([ds[i] for i in range(7)])
    assert x.shape == (7, 64) and x.dtype == torch.float32 and torch.equal(x, x2)
    assert list(y) == list(y2) == attribute_names(40)
    for name in y:
        assert y[name].dtype == torch.float32 and torch.equal(y[name], y2[name])


def test_deterministic_per_seed(small):
    _cached_structure.cache_clear()  # rebuild the structure too
    again = attributes(seed=0, **SMALL)
    for split in SPLITS:
        for attr in ("inputs", "labels", "latents"):
            assert torch.equal(getattr(small[split], attr), getattr(again[split], attr))
    for field in STRUCTURE_FIELDS:
        assert torch.equal(
            getattr(small["train"].structure, field), getattr(again["train"].structure, field)
        )
    # the structure is cached, but each build gets its own copy
    assert small["train"].structure.weights is not again["train"].structure.weights


def test_other_seed_is_another_sample_of_the_same_problem(small):
    other = attributes(seed=1, **SMALL)
    for split in SPLITS:
        assert not torch.equal(small[split].inputs, other[split].inputs)
        assert not torch.equal(small[split].labels, other[split].labels)
    for field in STRUCTURE_FIELDS:
        assert torch.equal(
            getattr(small["train"].structure, field), getattr(other["train"].structure, field)
        ), field
    # The splits of one seed are different samples too.
    assert not torch.equal(small["val"].latents, small["test"].latents)
    # Another structure seed is another problem.
    moved = attributes(seed=0, structure_seed=1, **SMALL)
    assert torch.equal(moved["train"].latents, small["train"].latents)
    assert not torch.equal(moved["train"].structure.weights, small["train"].structure.weights)
    assert not torch.equal(moved["train"].structure.w1, small["train"].structure.w1)


def test_attributes_do_not_depend_on_their_number(small):
    few = attributes(seed=0, num_attributes=7, **SMALL)
    assert list(few["train"][0][1]) == attribute_names(7)
    s, s7 = small["train"].structure, few["train"].structure
    assert torch.equal(s7.weights, s.weights[:7]) and torch.equal(s7.thresholds, s.thresholds[:7])
    for split in SPLITS:
        assert torch.equal(few[split].inputs, small[split].inputs)
        assert torch.equal(few[split].labels, small[split].labels[:, :7])


def test_structure(default):
    s = default["train"].structure
    assert s.weights.shape == (40, 24) and s.thresholds.shape == (40,)
    assert torch.allclose(s.weights.norm(dim=1), torch.ones(40, dtype=torch.float64))
    assert s.clusters.tolist() == [j // 5 for j in range(40)]
    assert set(s.signs.tolist()) == {-1.0, 1.0}
    assert s.nonlinear_share.min() >= 0 and s.nonlinear_share.max() <= 0.5
    # the clean inputs are standardised on the reference sample
    clean = s.render(default["train"].latents)
    assert clean.mean(dim=0).abs().max() < 0.15 and (clean.std(dim=0) - 1).abs().max() < 0.15


def test_features_are_uncorrelated_with_unit_variance():
    z = torch.randn(40000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = attribute_features(z)
    assert f.shape == (40000, 15)
    assert torch.allclose(f[:, :5], z)
    assert torch.allclose(f[:, 5], z[:, 0] * z[:, 1]) and torch.allclose(f[:, 9], z[:, 4] * z[:, 0])
    assert torch.allclose(f[:, 10], (z[:, 0] ** 2 - 1) / math.sqrt(2))
    assert (torch.cov(f.T) - torch.eye(15, dtype=torch.float64)).abs().max() < 0.06
    assert f.mean(dim=0).abs().max() < 0.03


def test_positive_rates(default):
    s = default["train"].structure
    assert s.positive_rate.min() >= 0.1 and s.positive_rate.max() <= 0.5
    rates = default["train"].labels.mean(dim=0)
    assert rates.min() >= 0.07 and rates.max() <= 0.53
    assert rates.min() < 0.15 and rates.max() > 0.45  # the range is used
    assert (rates.double() - s.positive_rate).abs().max() < 0.04  # thresholds hit the rates
    narrow = AttributesConfig(positive_rate=(0.3, 0.35), num_attributes=5).structure()
    assert narrow.positive_rate.min() >= 0.3 and narrow.positive_rate.max() <= 0.35


def test_clusters_are_correlated(default):
    labels = default["train"].labels
    corr = torch.corrcoef(labels.T)
    clusters = default["train"].structure.clusters
    same = clusters[:, None] == clusters[None, :]
    off_diagonal = ~torch.eye(40, dtype=torch.bool)
    within = corr[same & off_diagonal].abs().mean()
    between = corr[~same].abs().mean()
    assert within > 2 * between
    # some attributes of a cluster are anti-correlated (their signs differ)
    signs = default["train"].structure.signs
    opposite = same & (signs[:, None] != signs[None, :])
    assert corr[opposite].mean() < -0.1 and corr[same & off_diagonal & ~opposite].mean() > 0.1


def test_labels_follow_the_rule(small):
    clean = attributes(seed=0, noise=0.0, input_noise=0.0, **SMALL)
    for split in SPLITS:
        ds = clean[split]
        assert torch.equal(ds.labels, ds.rule_labels())
        assert torch.equal(ds.inputs, ds.structure.render(ds.latents).to(torch.float32))
    # label noise flips some labels, mostly near the threshold: the rule is still > 85% right
    agree = (small["train"].labels == small["train"].rule_labels()).float().mean()
    assert 0.85 < agree < 0.98


def test_binary_metrics_known_values():
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0], [0.0]])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    acc, f1 = BinaryAccuracy(), BinaryF1()
    acc.update(logits, target)
    f1.update(logits, target)
    # predictions (logit > 0): 1 0 1 0 0 -> correct 3 of 5; tp 1, fp 1, fn 1
    assert acc.compute() == pytest.approx(3 / 5)
    assert f1.compute() == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert BinaryAccuracy.higher_is_better and BinaryF1.higher_is_better
    none = BinaryF1()
    none.update(torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 0.0]))
    assert none.compute() == 0.0  # no positives, none predicted: defined as 0
    for metric in (BinaryAccuracy(), BinaryF1()):
        with pytest.raises(MtlkitError, match="before any update"):
            metric.compute()
        with pytest.raises(MtlkitError, match=r"\[B\] or \[B, 1\]"):
            metric.update(torch.zeros(4, 2), torch.zeros(4))


def test_binary_metrics_over_unequal_batches():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(103, 1, generator=gen)
    target = (torch.rand(103, generator=gen) < 0.3).float()
    whole = {name: make() for name, make in (("acc", BinaryAccuracy), ("f1", BinaryF1))}
    parts = {name: make() for name, make in (("acc", BinaryAccuracy), ("f1", BinaryF1))}
    for metric in whole.values():
        metric.update(logits, target)
    for start, stop in ((0, 1), (1, 40), (40, 97), (97, 103)):
        for metric in parts.values():
            metric.update(logits[start:stop].squeeze(1), target[start:stop])
    for name in whole:
        assert parts[name].compute() == pytest.approx(whole[name].compute(), abs=1e-12)
    predicted, actual = logits.squeeze(1) > 0, target > 0
    tp = (predicted & actual).sum().item()
    fp = (predicted & ~actual).sum().item()
    fn = (~predicted & actual).sum().item()
    assert whole["acc"].compute() == pytest.approx((predicted == actual).float().mean().item())
    assert whole["f1"].compute() == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_tasks_and_loss():
    tasks = attributes_tasks(40)
    assert [t.name for t in tasks] == attribute_names(40)
    assert all(t.higher_is_better() == {"acc": True, "f1": True} for t in tasks)
    assert len(attributes_tasks(3)) == 3
    logits = torch.tensor([[0.3], [-2.0], [1.5]])
    target = torch.tensor([1.0, 0.0, 0.0])
    expected = F.binary_cross_entropy_with_logits(logits.squeeze(1), target)
    assert torch.equal(binary_loss(logits, target), expected)
    assert torch.equal(binary_loss(logits.squeeze(1), target), expected)
    with pytest.raises(MtlkitError, match="binary_loss"):
        binary_loss(torch.zeros(3, 2), target)


def test_registered_problem():
    problem = DATASETS.get("attributes", num_attributes=6, **SMALL)
    assert problem.input_shape == (64,) and not problem.multi_input
    assert problem.task_outputs == dict.fromkeys(attribute_names(6), 1)
    assert [t.name for t in problem.tasks] == attribute_names(6)
    assert len(problem.splits["train"]) == 300
    with pytest.raises(ConfigError, match="n_val"):
        DATASETS.get("attributes", n_val=0)


def test_short_training_beats_the_majority_baseline():
    torch.manual_seed(0)
    problem = DATASETS.get("attributes", n_train=1000, n_val=200, n_test=500)
    model = build("hps", problem.input_shape, problem.task_outputs, backbone="mlp")
    loaders = {
        split: DataLoader(
            ds, batch_size=64, shuffle=split == "train", generator=torch.Generator().manual_seed(0)
        )
        for split, ds in problem.splits.items()
    }
    trainer = Trainer(
        model,
        problem.tasks,
        Joint(methods.EW()),
        optimizer("adam", lr=3e-3),
        budget=Budget(epochs=3),
        progress=False,
        track_exploration=False,
    )
    trainer.fit(loaders["train"], loaders["val"])
    results = trainer.evaluate(loaders["test"], write=False)
    accuracy = sum(r["acc"] for r in results.values()) / len(results)
    majority = (problem.splits["train"].labels.mean(dim=0) > 0.5).float()
    baseline = (problem.splits["test"].labels == majority).float().mean().item()
    assert accuracy > baseline + 0.05
    assert sum(r["f1"] for r in results.values()) / len(results) > 0.4  # majority: F1 = 0


@pytest.mark.parametrize(
    "key, value",
    [
        ("n_train", 0),
        ("n_test", 2.5),
        ("num_attributes", 0),
        ("noise", -0.1),
        ("input_noise", float("nan")),
        ("num_latents", 2),
        ("input_dim", True),
        ("cluster_size", 0),
        ("positive_rate", (0.5, 0.2)),
        ("positive_rate", (0.0, 0.2)),
        ("seed", -1),
        ("structure_seed", 2**32),
    ],
)
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        attributes(**{key: value})


def test_tasks_config_error():
    with pytest.raises(ConfigError, match="num_attributes"):
        attributes_tasks(0)
