"""MultiInputLoader and the two-domain digits problem."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mtlkit.data import (
    DomainDigits,
    MultiInputLoader,
    load_uci_digits,
    two_domain_digits,
    two_domain_tasks,
)
from mtlkit.errors import ConfigError, MtlkitError


def _indexed(n: int) -> TensorDataset:
    """A dataset whose inputs are the sample indices, so batches show which samples were seen."""
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


@pytest.fixture(scope="module")
def domains() -> dict[str, dict[str, DomainDigits]]:
    return two_domain_digits(seed=0)


def test_epoch_is_longest_and_short_loader_cycles():
    long = DataLoader(_indexed(20), batch_size=2)  # 10 batches
    short = DataLoader(_indexed(6), batch_size=2, shuffle=True, generator=torch.Generator())
    loader = MultiInputLoader({"a": long, "b": short})
    assert len(loader) == 10 and loader.tasks == ["a", "b"]
    batches = list(loader)
    assert len(batches) == 10
    for batch in batches:
        assert list(batch) == ["a", "b"]
        for task in ("a", "b"):
            inputs, target = batch[task]
            assert isinstance(batch[task], tuple)
            assert inputs.shape == (2, 1) and target.shape == (2,)
            assert torch.equal(inputs.squeeze(1).long(), target)
    seen_a = torch.cat([b["a"][1] for b in batches])
    assert torch.equal(seen_a, torch.arange(20))  # the long loader is seen once, in order
    seen_b = torch.cat([b["b"][1] for b in batches])
    assert seen_b.numel() == 20
    # every pass of 3 batches over the short loader is a permutation of its 6 samples
    for start in (0, 6, 12):
        assert sorted(seen_b[start : start + 6].tolist()) == list(range(6))
    assert set(seen_b.tolist()) == set(range(6))


def test_every_epoch_restarts_all_loaders():
    loader = MultiInputLoader(
        {"a": DataLoader(_indexed(3), batch_size=1), "b": DataLoader(_indexed(2), batch_size=1)}
    )
    first = [(int(b["a"][1]), int(b["b"][1])) for b in loader]
    second = [(int(b["a"][1]), int(b["b"][1])) for b in loader]
    assert first == second == [(0, 0), (1, 1), (2, 0)]


def test_single_loader_and_equal_lengths():
    loader = MultiInputLoader({"a": DataLoader(_indexed(5), batch_size=2)})
    assert len(loader) == 3 and len(list(loader)) == 3
    both = MultiInputLoader(
        {"a": DataLoader(_indexed(4), batch_size=2), "b": DataLoader(_indexed(4), batch_size=2)}
    )
    assert len(list(both)) == 2


def test_errors_on_empty_input():
    with pytest.raises(MtlkitError):
        MultiInputLoader({})
    with pytest.raises(MtlkitError, match="'b' is empty"):
        MultiInputLoader({"a": DataLoader(_indexed(4)), "b": DataLoader(_indexed(0), batch_size=2)})
    with pytest.raises(MtlkitError, match="no len"):
        MultiInputLoader({"a": (x for x in range(3))})


def test_two_domain_structure(domains):
    assert list(domains) == ["train", "val", "test"]
    sizes = {"train": (600, 400), "val": (150, 150), "test": (150, 150)}
    for split, by_task in domains.items():
        assert list(by_task) == ["plain", "inverted"]
        for task, n in zip(by_task, sizes[split], strict=True):
            ds = by_task[task]
            assert len(ds) == n
            x, y = ds[0]
            assert x.shape == (1, 8, 8) and x.dtype == torch.float32
            assert y.shape == () and y.dtype == torch.int64
            assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
            assert ds.labels.min() >= 0 and ds.labels.max() <= 9


def test_two_domain_sources_disjoint_and_transforms(domains):
    images, labels = load_uci_digits()
    all_rows = torch.cat(
        [ds.source_indices for by_task in domains.values() for ds in by_task.values()]
    )
    assert all_rows.unique().numel() == all_rows.numel() == 1600
    for by_task in domains.values():
        plain, inverted = by_task["plain"], by_task["inverted"]
        assert torch.equal(plain.labels, labels[plain.source_indices])
        assert torch.equal(inverted.labels, labels[inverted.source_indices])
        assert torch.equal(plain.images[:, 0], images[plain.source_indices])
        expected = (1.0 - images[inverted.source_indices]).flip(-1)
        assert torch.equal(inverted.images[:, 0], expected)


def test_two_domain_balance_and_determinism(domains):
    for task in ("plain", "inverted"):
        ds = domains["train"][task]
        counts = torch.bincount(ds.labels, minlength=10)
        assert (counts - len(ds) / 10).abs().max() <= 2
    again = two_domain_digits(seed=0)
    other = two_domain_digits(seed=1)
    for split in domains:
        for task in ("plain", "inverted"):
            assert torch.equal(domains[split][task].images, again[split][task].images)
            assert not torch.equal(
                domains[split][task].source_indices, other[split][task].source_indices
            )


def test_two_domain_options_and_errors():
    data = two_domain_digits(seed=2, n_per_domain=50, n_val=(10, 20), n_test=5, noise=0.2)
    assert [len(data["val"][t]) for t in ("plain", "inverted")] == [10, 20]
    assert len(data["train"]["inverted"]) == 50
    assert data["train"]["plain"].images.min() >= 0 and data["train"]["plain"].images.max() <= 1
    with pytest.raises(ConfigError):
        two_domain_digits(n_per_domain=(1000, 800))
    with pytest.raises(ConfigError):
        two_domain_digits(n_val=0)
    with pytest.raises(ConfigError):
        two_domain_digits(n_per_domain=(1, 2, 3))
    with pytest.raises(ConfigError):
        two_domain_digits(noise=-1.0)


def test_two_domain_with_loader_and_tasks(domains):
    tasks = two_domain_tasks()
    assert [t.name for t in tasks] == ["plain", "inverted"]
    loaders = {
        t: DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
        for t, ds in domains["train"].items()
    }
    loader = MultiInputLoader(loaders)
    assert len(loader) == 10  # ceil(600 / 64); the 400 samples (7 batches) cycle
    batch = next(iter(loader))
    for task in tasks:
        inputs, target = batch[task.name]
        assert inputs.shape == (64, 1, 8, 8)
        logits = torch.zeros(64, 10, requires_grad=True)
        loss = task.loss(logits, target)
        assert loss.item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
        metric = task.new_metrics()["acc"]
        metric.update(logits.detach(), target)
        assert 0.0 <= metric.compute() <= 1.0
