"""Task metrics as accumulators, and the multi-task performance drop Δm%.

Accumulators keep sums, not means, so that a metric over several batches of unequal size equals
the metric over their concatenation. Each declares whether higher is better, which Δm% needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch

from mtlkit.errors import MtlkitError


class Metric:
    """An accumulator: ``update(output, target)`` per batch, then ``compute()``."""

    higher_is_better: ClassVar[bool]

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        if self.count == 0:
            raise MtlkitError(f"{type(self).__name__}.compute() called before any update()")
        return self.total / self.count

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_same_shape(output: torch.Tensor, target: torch.Tensor, metric: str) -> None:
    if output.shape != target.shape:
        raise MtlkitError(
            f"{metric}: output shape {tuple(output.shape)} != target shape {tuple(target.shape)}"
        )


class Accuracy(Metric):
    """Fraction of correct class predictions; ``output`` holds logits ``[B, C, ...]``,
    ``target`` class indices ``[B, ...]``. Targets equal to ``ignore_index`` are not counted."""

    higher_is_better = True

    def __init__(self, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index
        super().__init__()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.dim() != target.dim() + 1 or output.shape[2:] != target.shape[1:]:
            raise MtlkitError(
                f"Accuracy: expected logits [B, C, ...] and targets [B, ...], got "
                f"{tuple(output.shape)} and {tuple(target.shape)}"
            )
        correct = output.argmax(dim=1) == target
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            correct = correct[keep]
        self.total += int(correct.sum())
        self.count += correct.numel()


class MeanAbsoluteError(Metric):
    """Mean absolute error over all elements."""

    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_same_shape(output, target, "MeanAbsoluteError")
        self.total += float((output.detach() - target).abs().double().sum())
        self.count += target.numel()


class MeanSquaredError(Metric):
    """Mean squared error over all elements."""

    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_same_shape(output, target, "MeanSquaredError")
        self.total += float((output.detach() - target).double().pow(2).sum())
        self.count += target.numel()


class RootMeanSquaredError(MeanSquaredError):
    """Root mean squared error over all elements: the square root of the mean squared error
    over every batch (not a mean of per-batch roots)."""

    def compute(self) -> float:
        return math.sqrt(super().compute())


class OriginalUnits(Metric):
    """A metric of outputs and targets taken back from standardised units, ``y * scale + mean``:
    a model trained on standardised regression targets ``(y - mean) / scale`` is measured in the
    targets' own units (MAE in meV rather than in standard deviations).

    Args:
        metric: the factory of the metric to compute in original units (e.g.
            :class:`MeanAbsoluteError`); its direction is this metric's.
        mean, scale: the standardisation, broadcast against one sample's target (a number,
            or a tensor of the target's per-sample shape, e.g. ``[k]`` for ``[B, k]`` targets);
            ``scale`` must be finite and non-zero.

    An output ``[B, 1]`` against a target ``[B]`` is read as ``[B]`` (a head with one unit).
    """

    def __init__(self, metric: Callable[[], Metric], mean: Any = 0.0, scale: Any = 1.0) -> None:
        self.metric = metric()
        if not isinstance(self.metric, Metric):
            raise MtlkitError(
                f"OriginalUnits: metric must build a Metric, got {type(self.metric).__name__}"
            )
        self.higher_is_better = self.metric.higher_is_better  # type: ignore[misc]
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.scale = torch.as_tensor(scale, dtype=torch.float64)
        if not bool(torch.isfinite(self.mean).all()) or not bool(torch.isfinite(self.scale).all()):
            raise MtlkitError(f"OriginalUnits: mean and scale must be finite, got {mean}, {scale}")
        if bool((self.scale == 0).any()):
            raise MtlkitError(f"OriginalUnits: scale must be non-zero, got {scale}")
        super().__init__()

    def reset(self) -> None:
        self.metric.reset()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
            output = output.squeeze(-1)
        mean, scale = self.mean.to(target.device), self.scale.to(target.device)
        self.metric.update(output.detach().double() * scale + mean, target.double() * scale + mean)

    def compute(self) -> float:
        return self.metric.compute()

    def __repr__(self) -> str:
        mean, scale = self.mean.tolist(), self.scale.tolist()
        return f"OriginalUnits({self.metric!r}, mean={mean}, scale={scale})"


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
    mode: Literal["flat", "task_mean"] = "flat",
    task_weights: Mapping[str, float] | None = None,
) -> float:
    """Multi-task performance drop against a baseline, in percent (lower is better).

    ``mode="flat"``: Nash-MTL's and FAMO's **Δm%** (Navon et al., 2022; Liu et al.,
    2023), the mean over all K metrics of all tasks,
    ``Δm = 100/K · Σ_k (−1)^{h_k} (M_k − B_k) / |B_k|`` with ``h_k = 1`` when higher is better.
    ``mode="task_mean"``: the mean over tasks of each task's mean over its metrics, optionally
    weighted by ``task_weights``; LibMTL's **Δp** is its negative (:func:`delta_p`).

    Raises:
        MtlkitError: if a task or metric of ``results`` is missing from the baseline, or a
            baseline value is zero (the relative change is undefined).
    """
    if mode not in ("flat", "task_mean"):
        raise MtlkitError(f"delta_m: unknown mode {mode!r}; valid modes: flat, task_mean")
    per_task: dict[str, list[float]] = {}
    for task, metrics in results.items():
        if task not in baseline:
            raise MtlkitError(f"delta_m: task {task!r} has no baseline; have {sorted(baseline)}")
        for name, value in metrics.items():
            if name not in baseline[task]:
                raise MtlkitError(
                    f"delta_m: metric {task}/{name} has no baseline; have {sorted(baseline[task])}"
                )
            base = float(baseline[task][name])
            if base == 0.0 or not math.isfinite(base):
                raise MtlkitError(
                    f"delta_m: baseline {task}/{name} = {base} (must be finite, != 0)"
                )
            sign = -1.0 if higher_is_better[task][name] else 1.0
            per_task.setdefault(task, []).append(sign * (float(value) - base) / abs(base))
    if not per_task:
        raise MtlkitError("delta_m: no metrics to compare")
    if mode == "flat":
        flat = [d for ds in per_task.values() for d in ds]
        return 100.0 * sum(flat) / len(flat)
    weights = {t: (task_weights or {}).get(t, 1.0) for t in per_task}
    total = sum(weights.values())
    return 100.0 * sum(weights[t] * sum(ds) / len(ds) for t, ds in per_task.items()) / total


def delta_p(
    results: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
    task_weights: Mapping[str, float] | None = None,
) -> float:
    """LibMTL's **Δp** (``count_improvement`` in LibMTL/utils.py; Lin and Zhang, JMLR 2023), in
    percent, **higher is better**: the mean over the T tasks of each task's mean over its M_t
    metrics, ``Δp = 100/T · Σ_t 1/M_t · Σ_m (−1)^{w_tm} (B_tm − N_tm) / B_tm`` with
    ``w_tm = 1`` when higher is better (``|B_tm|`` here, the same for positive baselines).
    It is ``-delta_m(mode="task_mean")``; ``task_weights`` weigh the tasks (LibMTL: equal).

    Raises:
        MtlkitError: as :func:`delta_m`.
    """
    return -delta_m(results, baseline, higher_is_better, "task_mean", task_weights)


# --- Dense prediction: segmentation, depth, surface normals -------------------------------------
#
# The conventions of MTAN (Liu et al., CVPR 2019) and LibMTL's NYUv2/Cityscapes examples: a
# segmentation target of -1 is unlabelled; a depth target of 0 is invalid; a normal target that
# is the zero vector is invalid. Every metric is over all valid pixels of all batches (not a mean
# of per-batch means), so it does not depend on the batch size.


class ConfusionMatrix(Metric):
    """Accumulates the ``[C, C]`` confusion matrix (rows: target class, columns: predicted
    class) of logits ``[B, C, ...]`` against class indices ``[B, ...]``; pixels whose target is
    ``ignore_index`` are skipped. Base of :class:`MeanIoU` and :class:`PixelAccuracy`.

    Raises (in ``update``):
        MtlkitError: on mismatched shapes, a wrong number of channels, or a target outside
            ``[0, C)`` that is not ``ignore_index``.
    """

    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int | None = -1) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        name = type(self).__name__
        if output.dim() != target.dim() + 1 or output.shape[2:] != target.shape[1:]:
            raise MtlkitError(
                f"{name}: expected logits [B, C, ...] and targets [B, ...], got "
                f"{tuple(output.shape)} and {tuple(target.shape)}"
            )
        if output.shape[1] != self.num_classes:
            raise MtlkitError(
                f"{name}: expected {self.num_classes} channels, got {output.shape[1]}"
            )
        predicted = output.detach().argmax(dim=1).flatten()
        target = target.flatten().to(torch.int64)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            predicted, target = predicted[keep], target[keep]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise MtlkitError(
                f"{name}: targets must be in [0, {self.num_classes}) or {self.ignore_index}, got "
                f"values from {int(target.min())} to {int(target.max())}"
            )
        counts = torch.bincount(
            target * self.num_classes + predicted, minlength=self.num_classes**2
        )
        self.matrix += counts.reshape(self.num_classes, self.num_classes).cpu()
        self.count += target.numel()

    def _check_counted(self) -> None:
        if self.count == 0:
            raise MtlkitError(f"{type(self).__name__}: no labelled pixel seen (call update())")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, "
            f"ignore_index={self.ignore_index})"
        )


class MeanIoU(ConfusionMatrix):
    """Mean intersection over union, ``mean_c tp_c / (tp_c + fp_c + fn_c)``, over the classes
    that occur in the targets or the predictions (a class with an empty union has no IoU and is
    left out, like ``nanmean``; LibMTL's plain mean would be NaN)."""

    def per_class(self) -> torch.Tensor:
        """IoU of each class, float64 ``[C]``; NaN for a class with an empty union."""
        m = self.matrix.to(torch.float64)
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.nan)

    def compute(self) -> float:
        self._check_counted()
        iou = self.per_class()
        return float(iou[~iou.isnan()].mean())


class PixelAccuracy(ConfusionMatrix):
    """The fraction of labelled pixels whose predicted class is right."""

    def compute(self) -> float:
        self._check_counted()
        return float(self.matrix.diagonal().sum()) / float(self.matrix.sum())


def _depth_pairs(
    output: torch.Tensor, target: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and target depth at the valid pixels (target != 0), as float64."""
    if output.shape != target.shape:
        if output.dim() == target.dim() + 1 and output.shape[1] == 1:
            output = output.squeeze(1)
        if output.shape != target.shape:
            raise MtlkitError(
                f"{name}: output shape {tuple(output.shape)} != target shape {tuple(target.shape)}"
            )
    valid = target != 0
    return output.detach()[valid].double(), target[valid].double()


class DepthAbsError(Metric):
    """Mean absolute depth error ``|d - d*|`` over the valid pixels (``d* != 0``); output
    ``[B, 1, H, W]`` (or the target's shape) against target ``[B, 1, H, W]``."""

    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred, true = _depth_pairs(output, target, "DepthAbsError")
        self.total += float((pred - true).abs().sum())
        self.count += true.numel()


class DepthRelError(Metric):
    """Mean relative depth error ``|d - d*| / d*`` over the valid pixels (``d* != 0``)."""

    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred, true = _depth_pairs(output, target, "DepthRelError")
        self.total += float(((pred - true).abs() / true.abs()).sum())
        self.count += true.numel()


def normal_angles(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between predicted and target normals ``[B, 3, ...]`` at the valid
    pixels (target not the zero vector), flat. ``atan2(|p x t|, p . t)`` is the angle between
    the two vectors whatever their lengths (so the prediction need not be normalised) and is
    accurate near 0 and 180 degrees, where ``acos`` of the dot product is not."""
    if output.shape != target.shape or output.dim() < 2 or output.shape[1] != 3:
        raise MtlkitError(
            f"normals: expected output and target [B, 3, ...] of one shape, got "
            f"{tuple(output.shape)} and {tuple(target.shape)}"
        )
    dtype = torch.promote_types(output.dtype, torch.float32)
    p = output.detach().to(dtype).movedim(1, -1).reshape(-1, 3)
    t = target.to(dtype).movedim(1, -1).reshape(-1, 3)
    valid = (t != 0).any(dim=1)
    p, t = p[valid], t[valid]
    cross = torch.linalg.vector_norm(torch.linalg.cross(p, t), dim=1)
    return torch.rad2deg(torch.atan2(cross, (p * t).sum(dim=1)))


class _NormalMetric(Metric):
    """Base of the surface-normal metrics: angles from :func:`normal_angles`."""

    higher_is_better = False

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self._add(normal_angles(output, target))

    def _add(self, angles: torch.Tensor) -> None:
        raise NotImplementedError


class NormalMeanAngle(_NormalMetric):
    """Mean angle error of the surface normals, in degrees."""

    def _add(self, angles: torch.Tensor) -> None:
        self.total += float(angles.double().sum())
        self.count += angles.numel()


class NormalMedianAngle(_NormalMetric):
    """Median angle error of the surface normals, in degrees (the mean of the two middle values
    for an even count, like ``numpy.median``).

    The angles are counted in a histogram of ``bins`` bins over [0, 180] (1.4 MB for the default
    180000), so memory does not grow with the data set; the median is the centre of the bin of
    each middle value, exact to half a bin (0.0005 degrees by default).
    """

    def __init__(self, bins: int = 180_000) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
        self.bins = bins
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.histogram = torch.zeros(self.bins, dtype=torch.int64)

    def _add(self, angles: torch.Tensor) -> None:
        index = (angles.double() * (self.bins / 180.0)).long().clamp_(0, self.bins - 1)
        self.histogram += torch.bincount(index, minlength=self.bins).cpu()
        self.count += angles.numel()

    def compute(self) -> float:
        if self.count == 0:
            raise MtlkitError("NormalMedianAngle.compute() called before any update()")
        cumulative = self.histogram.cumsum(0)
        ranks = torch.tensor([(self.count - 1) // 2, self.count // 2])
        where = torch.searchsorted(cumulative, ranks, right=True).double()
        centres = (where + 0.5) * (180.0 / self.bins)
        return float(centres.mean())


class NormalWithinAngle(_NormalMetric):
    """The fraction of valid pixels whose normal's angle error is below ``threshold`` degrees
    (strictly, as in MTAN/LibMTL); reported in [0, 1]."""

    higher_is_better = True

    def __init__(self, threshold: float = 11.25) -> None:
        if not 0 < threshold <= 180:
            raise ValueError(f"threshold must be in (0, 180] degrees, got {threshold!r}")
        self.threshold = float(threshold)
        super().__init__()

    def _add(self, angles: torch.Tensor) -> None:
        self.total += int((angles < self.threshold).sum())
        self.count += angles.numel()

    def __repr__(self) -> str:
        return f"NormalWithinAngle(threshold={self.threshold})"
