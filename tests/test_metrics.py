"""Metric accumulators and Δm%."""

from __future__ import annotations

import pytest
import torch

from mtlkit.errors import MtlkitError
from mtlkit.metrics import Accuracy, MeanAbsoluteError, MeanSquaredError, delta_m


@pytest.mark.parametrize("metric_cls", [MeanAbsoluteError, MeanSquaredError])
def test_regression_metrics_over_unequal_batches_equal_the_whole(metric_cls):
    gen = torch.Generator().manual_seed(0)
    out, tgt = torch.randn(23, 2, generator=gen), torch.randn(23, 2, generator=gen)
    metric = metric_cls()
    for lo, hi in [(0, 1), (1, 8), (8, 23)]:  # batches of 1, 7 and 15 samples
        metric.update(out[lo:hi], tgt[lo:hi])
    diff = out - tgt
    expected = diff.abs().mean() if metric_cls is MeanAbsoluteError else diff.pow(2).mean()
    assert metric.compute() == pytest.approx(float(expected), rel=1e-6)
    # A mean of per-batch means would weigh the 1-sample batch like the others.
    per_batch = [
        float((diff[lo:hi].abs() if metric_cls is MeanAbsoluteError else diff[lo:hi] ** 2).mean())
        for lo, hi in [(0, 1), (1, 8), (8, 23)]
    ]
    assert metric.compute() != pytest.approx(sum(per_batch) / 3, rel=1e-3)


def test_accuracy_counts_correct_predictions_and_ignores_index():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    metric = Accuracy()
    metric.update(logits[:1], torch.tensor([0]))
    metric.update(logits[1:], torch.tensor([1, 1, 0]))
    assert metric.compute() == pytest.approx(2 / 4)
    dense = Accuracy(ignore_index=255)
    dense.update(
        torch.randn(2, 3, 4, 4).abs() * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1) + 0.01,
        torch.tensor([[[0, 0, 255, 255]] * 4, [[1, 255, 255, 255]] * 4]),
    )
    # 8 + 4 pixels count; the 8 class-0 pixels are right, the 4 class-1 ones wrong.
    assert dense.compute() == pytest.approx(8 / 12)


def test_metric_errors():
    with pytest.raises(MtlkitError, match="before any update"):
        Accuracy().compute()
    with pytest.raises(MtlkitError, match="shape"):
        MeanAbsoluteError().update(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(MtlkitError, match="logits"):
        Accuracy().update(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_delta_m_flat_and_task_mean():
    baseline = {"a": {"acc": 0.8, "f1": 0.5}, "b": {"mae": 2.0}}
    results = {"a": {"acc": 0.88, "f1": 0.45}, "b": {"mae": 1.0}}
    higher = {"a": {"acc": True, "f1": True}, "b": {"mae": False}}
    # per-metric relative drops: acc -10%, f1 +10%, mae -50%
    assert delta_m(results, baseline, higher) == pytest.approx(100 * (-0.1 + 0.1 - 0.5) / 3)
    assert delta_m(results, baseline, higher, mode="task_mean") == pytest.approx(
        100 * ((-0.1 + 0.1) / 2 - 0.5) / 2
    )
    assert delta_m(baseline, baseline, higher) == 0.0


def test_delta_m_errors_name_the_bad_entry():
    higher = {"a": {"acc": True}}
    with pytest.raises(MtlkitError, match="no baseline"):
        delta_m({"a": {"acc": 1.0}}, {}, higher)
    with pytest.raises(MtlkitError, match="a/acc"):
        delta_m({"a": {"acc": 1.0}}, {"a": {"acc": 0.0}}, higher)
    with pytest.raises(MtlkitError, match="mode"):
        delta_m({"a": {"acc": 1.0}}, {"a": {"acc": 1.0}}, higher, mode="mean")
