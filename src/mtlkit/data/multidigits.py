"""MultiDigits: the embedded default benchmark, a small MultiMNIST built from the UCI digits.

Data set credit: the images are the test set of the UCI "Optical Recognition of Handwritten
Digits" data set (1797 images of 8x8 pixels with integer intensities 0..16, labels 0..9) by
E. Alpaydin and C. Kaynak, https://archive.ics.uci.edu/dataset/80, licensed under CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/). It is bundled, unmodified, as
``mtlkit/data/uci_digits.csv.gz`` (one row per image: 64 row-major pixels, then the label; no
header); see ``UCI_DIGITS_LICENSE.txt`` next to it.

Construction (like MultiMNIST):

* The 1797 *source* images are first split into disjoint train/val/test pools (60/20/20 by
  default, stratified by class, seeded), and pairs are drawn only from within a pool, so that the
  test pairs use digit images never seen in training.
* Each example is an 8 x (8 + ``shift``) canvas (8 x 12 with the default ``shift=4``): the left
  digit at columns 0-7 and the right digit shifted ``shift`` columns to the right (columns 4-11).
  Where they overlap, the pixels are combined by the pixel-wise **maximum** (so the canvas stays
  in [0, 1] and a stroke is never brighter than the brighter of the two digits).
* Optional Gaussian pixel noise of standard deviation ``noise`` is added to every pixel of the
  canvas, after which the image is clipped to [0, 1].
* Both source images of a pair are drawn uniformly at random (with replacement) from the pool, so
  the left and right classes are about uniform; the sum has a triangular distribution.

Three tasks:

* ``"left"``: the class of the left digit (10 classes), cross-entropy, metric ``acc``.
* ``"right"``: the class of the right digit (10 classes), cross-entropy, metric ``acc``.
* ``"sum"``: left + right as a regression target. The data set holds the **raw** sum (float32,
  0..18). The model's ``"sum"`` output is in *normalised* units: the loss is the MSE between the
  output and ``(sum - SUM_MEAN) / SUM_SCALE`` = ``(sum - 9) / 4`` (about zero mean and unit
  variance, so that it weighs about as much as a cross-entropy under equal weighting), and the
  metric ``mae`` converts the output back, ``SUM_MEAN + SUM_SCALE * output``, so it is reported
  in digits (:func:`sum_from_output` does the same conversion). The output may be ``[B]`` or
  ``[B, 1]`` (a linear head with one unit); the loss and the metric flatten it to ``[B]``.
  Predicting the mean gives an MAE of about 3.3 digits.

Default difficulty: ``n_train=5000`` pairs drawn from the ~1078 images of the train pool,
``n_val=1000`` and ``n_test=1000`` pairs, ``noise=0.2``. Measured with an MLP 96 -> 128 -> 64
(ReLU, shared) + three linear heads, equal weighting (the sum of the three losses), Adam lr 1e-3,
batch 64, 10 epochs (about 1 s on 2 CPU threads); test metrics, mean over seeds 0, 1, 2 (seeds 0
and 1 for ``n_train=2000``):

========  =====  ========  =========  =======
n_train   noise  left acc  right acc  sum MAE
========  =====  ========  =========  =======
5000      0.0    0.931     0.937      1.71
5000      0.2    0.876     0.883      2.02
5000      0.3    0.814     0.824      2.31
2000      0.0    0.887     0.895      2.02
2000      0.2    0.816     0.830      2.38
2000      0.3    0.754     0.760      2.64
========  =====  ========  =========  =======

Chance is 0.1 and predicting the mean sum gives an MAE of 3.33 on the test split; the default
stays clearly above both without saturating. The tasks compete: with the default data, weighting
the sum loss 4x (``SUM_SCALE = 2``) lowers the left/right accuracy from 0.885/0.871 to
0.869/0.853 while the sum MAE improves from 2.00 to 1.85 (seeds 0, 1), so that weighting methods
can differ.
"""

from __future__ import annotations

import gzip
import io
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.metrics import Accuracy, MeanAbsoluteError
from mtlkit.tasks import Task

__all__ = [
    "SPLITS",
    "SUM_MEAN",
    "SUM_SCALE",
    "UCI_DIGITS_FILE",
    "MultiDigits",
    "MultiDigitsConfig",
    "SumMeanAbsoluteError",
    "load_uci_digits",
    "multidigits",
    "multidigits_tasks",
    "sum_from_output",
    "sum_loss",
]

UCI_DIGITS_FILE = "uci_digits.csv.gz"
"""Name of the bundled UCI digits file inside the ``mtlkit.data`` package."""

SPLITS = ("train", "val", "test")
SUM_MEAN = 9.0
"""Centre of the normalised ``"sum"`` target: the mean of the sum of two uniform digits."""
SUM_SCALE = 4.0
"""Scale of the normalised ``"sum"`` target, about the standard deviation (sqrt(16.5))."""

_SIDE = 8  # the source images are _SIDE x _SIDE
_MAX_PIXEL = 16.0
_NUM_CLASSES = 10


def load_uci_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Read the bundled UCI digits (the optdigits test set, 1797 images).

    Works from a source checkout and from an installed wheel (the file is read through
    :mod:`importlib.resources`).

    Returns:
        ``(images, labels)``: float32 ``[1797, 8, 8]`` scaled to [0, 1] (pixel / 16) and int64
        ``[1797]`` with values 0..9, in the order of the file.

    Raises:
        MtlkitError: if the bundled file is missing or malformed.
    """
    try:
        raw = resources.files(__package__).joinpath(UCI_DIGITS_FILE).read_bytes()
        table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as error:
        raise MtlkitError(
            f"cannot read the bundled UCI digits {UCI_DIGITS_FILE}: {error}"
        ) from None
    if table.shape[1] != _SIDE * _SIDE + 1 or table.shape[0] == 0:
        raise MtlkitError(f"{UCI_DIGITS_FILE}: expected rows of 65 integers, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > _MAX_PIXEL or labels.min() < 0 or labels.max() > 9:
        raise MtlkitError(f"{UCI_DIGITS_FILE}: pixel or label out of range")
    images = torch.from_numpy(pixels.astype(np.float32) / _MAX_PIXEL).reshape(-1, _SIDE, _SIDE)
    return images.contiguous(), torch.from_numpy(labels.copy())


def _stratified_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(len(labels))`` in which every contiguous window is about
    class-balanced (each class in proportion to its size, within one sample).

    Each class is shuffled, and its samples are interleaved with the others by their relative rank
    ``(rank + u_c) / n_c`` (``u_c`` a random offset of class ``c`` that breaks ties).
    """
    n = labels.numel()
    perm = torch.randperm(n, generator=generator)
    shuffled = labels[perm]
    classes = torch.unique(labels)
    offsets = torch.rand(classes.numel(), generator=generator, dtype=torch.float64)
    key = torch.empty(n, dtype=torch.float64)
    for c, offset in zip(classes.tolist(), offsets.tolist(), strict=True):
        where = (shuffled == c).nonzero().squeeze(1)
        rank = torch.arange(where.numel(), dtype=torch.float64)
        key[where] = (rank + offset) / where.numel()
    return perm[torch.argsort(key, stable=True)]


def _split_sizes(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Sizes of consecutive chunks of ``n`` items, ``round(n * f)`` each; when the fractions sum
    to 1 the last chunk takes the rest, so nothing is left over by rounding."""
    sizes = [round(n * f) for f in fractions]
    if math.isclose(sum(fractions), 1.0):
        sizes[-1] = n - sum(sizes[:-1])
    return sizes


def _check_count(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_noise(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"noise must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"noise must be a finite number >= 0, got {value!r}")


def _check_fractions(fractions: object) -> None:
    ok = (
        isinstance(fractions, (tuple, list))
        and len(fractions) == 3
        and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions)
        and all(f > 0 for f in fractions)
        and sum(fractions) <= 1.0 + 1e-9
    )
    if not ok:
        raise ConfigError(
            f"pool_fractions must be three positive numbers summing to at most 1, got {fractions!r}"
        )


class MultiDigits(Dataset):
    """One split of MultiDigits; all images are built up front and held as tensors.

    Items are ``(image, targets)``: ``image`` float32 ``[1, 8, 8 + shift]`` in [0, 1] and
    ``targets = {"left": int64 [], "right": int64 [], "sum": float32 []}``, so the default collate
    gives ``(x [B, 1, 8, 8 + shift], {task: [B]})``.

    Args:
        images: float32 ``[N, 1, 8, W]``.
        left: int64 ``[N]``, the class of the left digit.
        right: int64 ``[N]``, the class of the right digit.
        source_indices: int64 ``[N, 2]``, the rows of the UCI digits file that the left and right
            digit come from.
        split: the name of the split, for ``repr``.

    Attributes:
        images, left, right, source_indices: as given.
        sum: float32 ``[N]``, ``left + right`` in digits (raw, not normalised).
        split: the name of the split.
    """

    def __init__(
        self,
        images: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        source_indices: torch.Tensor,
        split: str = "",
    ) -> None:
        n = images.shape[0]
        if images.dim() != 4 or images.shape[1] != 1:
            raise MtlkitError(
                f"MultiDigits: images must be [N, 1, H, W], got {tuple(images.shape)}"
            )
        if left.shape != (n,) or right.shape != (n,) or source_indices.shape != (n, 2):
            raise MtlkitError(
                f"MultiDigits: expected left/right [{n}] and source_indices [{n}, 2], got "
                f"{tuple(left.shape)}, {tuple(right.shape)}, {tuple(source_indices.shape)}"
            )
        self.images = images.to(torch.float32)
        self.left = left.to(torch.int64)
        self.right = right.to(torch.int64)
        self.sum = (self.left + self.right).to(torch.float32)
        self.source_indices = source_indices.to(torch.int64)
        self.split = split

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.images[index], {
            "left": self.left[index],
            "right": self.right[index],
            "sum": self.sum[index],
        }

    @property
    def targets(self) -> dict[str, torch.Tensor]:
        """All targets of the split, ``{task: [N]}``."""
        return {"left": self.left, "right": self.right, "sum": self.sum}

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape[1:])
        return f"MultiDigits(split={self.split!r}, n={len(self)}, image={shape})"


def _compose(left: torch.Tensor, right: torch.Tensor, shift: int) -> torch.Tensor:
    """Two digit batches ``[N, 8, 8]`` on one canvas ``[N, 1, 8, 8 + shift]``, pixel-wise max."""
    n = left.shape[0]
    canvas = torch.zeros(n, _SIDE, _SIDE + shift, dtype=torch.float32)
    canvas[:, :, :_SIDE] = left
    window = canvas[:, :, shift : shift + _SIDE]
    canvas[:, :, shift : shift + _SIDE] = torch.maximum(window, right)
    return canvas.unsqueeze(1)


def _add_noise(images: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian pixel noise of std ``noise``, then clip to [0, 1]. The noise is always drawn (also
    for ``noise=0``), so that the generator's state does not depend on the noise level."""
    eps = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    if noise == 0:
        return images
    return (images + noise * eps).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class MultiDigitsConfig:
    """How MultiDigits is built; :meth:`build` makes the three splits.

    Args:
        n_train: number of training pairs.
        n_val: number of validation pairs.
        n_test: number of test pairs.
        shift: columns by which the right digit is shifted; the canvas is ``8 x (8 + shift)``.
        noise: standard deviation of the Gaussian pixel noise (pixels are in [0, 1]; clipped to
            [0, 1] after the noise is added).
        seed: seed of everything random: the pools, the pairs and the noise.
        pool_fractions: fractions of the 1797 source images in the train/val/test pools.

    Raises:
        ConfigError: on a value out of range.
    """

    n_train: int = 5000
    n_val: int = 1000
    n_test: int = 1000
    shift: int = 4
    noise: float = 0.2
    seed: int = 0
    pool_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            _check_count(name, getattr(self, name))
        _check_count("shift", self.shift, minimum=0)
        _check_noise(self.noise)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        _check_fractions(self.pool_fractions)

    def build(self) -> dict[str, MultiDigits]:
        """Build ``{"train", "val", "test"}``; the same config gives bit-identical tensors.

        Each split has its own generator (seeded from ``seed``), so a split does not change when
        only the size of another split changes.
        """
        images, labels = load_uci_digits()
        base = torch.Generator().manual_seed(self.seed)
        order = _stratified_order(labels, base)
        split_seeds = torch.randint(0, 2**62, (len(SPLITS),), generator=base).tolist()
        sizes = _split_sizes(labels.numel(), tuple(self.pool_fractions))
        counts = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
        result: dict[str, MultiDigits] = {}
        start = 0
        for split, size, split_seed in zip(SPLITS, sizes, split_seeds, strict=True):
            pool = order[start : start + size]
            start += size
            gen = torch.Generator().manual_seed(split_seed)
            n = counts[split]
            pick = torch.randint(0, pool.numel(), (n, 2), generator=gen)
            source = pool[pick]
            canvas = _compose(images[source[:, 0]], images[source[:, 1]], self.shift)
            canvas = _add_noise(canvas, float(self.noise), gen)
            result[split] = MultiDigits(
                canvas, labels[source[:, 0]], labels[source[:, 1]], source, split=split
            )
        return result


def multidigits(
    seed: int = 0,
    n_train: int = 5000,
    n_val: int = 1000,
    n_test: int = 1000,
    noise: float = 0.2,
    shift: int = 4,
    pool_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> dict[str, MultiDigits]:
    """The MultiDigits benchmark: ``{"train", "val", "test"}`` datasets, deterministic per seed.

    See the module docstring and :class:`MultiDigitsConfig` for the arguments.

    Raises:
        ConfigError: on a value out of range.
    """
    return MultiDigitsConfig(
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        shift=shift,
        noise=noise,
        seed=seed,
        pool_fractions=tuple(pool_fractions),
    ).build()


def _flatten_to(output: torch.Tensor, target: torch.Tensor, what: str) -> torch.Tensor:
    """``output`` ``[B]`` or ``[B, 1]`` as ``target``'s shape ``[B]``."""
    if output.shape == target.shape:
        return output
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        flat = output.squeeze(-1)
        if flat.shape == target.shape:
            return flat
    raise MtlkitError(
        f"{what}: expected the sum output [B] or [B, 1] for targets {tuple(target.shape)}, "
        f"got {tuple(output.shape)}"
    )


def sum_from_output(output: torch.Tensor) -> torch.Tensor:
    """The model's normalised ``"sum"`` output in digits: ``SUM_MEAN + SUM_SCALE * output``."""
    return SUM_MEAN + SUM_SCALE * output


def sum_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the normalised output and the normalised raw sum ``(target - 9) / 4``.

    Args:
        output: ``[B]`` or ``[B, 1]``, in normalised units.
        target: ``[B]``, the raw sum in digits.
    """
    output = _flatten_to(output, target, "sum_loss")
    return F.mse_loss(output, (target.to(output.dtype) - SUM_MEAN) / SUM_SCALE)


class SumMeanAbsoluteError(MeanAbsoluteError):
    """MAE in digits of a normalised ``"sum"`` output (``[B]`` or ``[B, 1]``) against the raw
    sum ``[B]``."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        output = _flatten_to(output.detach(), target, "SumMeanAbsoluteError")
        super().update(sum_from_output(output), target.to(output.dtype))


def multidigits_tasks() -> list[Task]:
    """The tasks of MultiDigits: ``left`` and ``right`` (cross-entropy on logits ``[B, 10]``,
    metric ``acc``) and ``sum`` (:func:`sum_loss` on a normalised output ``[B]`` or ``[B, 1]``,
    metric ``mae`` in digits)."""
    return [
        Task("left", F.cross_entropy, {"acc": Accuracy}),
        Task("right", F.cross_entropy, {"acc": Accuracy}),
        Task("sum", sum_loss, {"mae": SumMeanAbsoluteError}),
    ]
