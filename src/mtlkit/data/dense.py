"""Dense prediction data in MTAN's preprocessed ``.npy`` layout, and the dense tasks.

NYUv2 and Cityscapes are distributed by MTAN (Liu et al., CVPR 2019), and used so by LibMTL,
Nash-MTL, FAMO and others, as one ``.npy`` file per sample and map::

    <root>/<split>/<folder>/<N>.npy        split: train | val, N = 0, 1, 2, ...

with ``image`` ``[H, W, 3]`` (RGB in [0, 1]), a label map ``[H, W]`` (class index, -1 for
unlabelled pixels), ``depth`` ``[H, W, 1]`` (0 where invalid) and, for NYUv2, ``normal``
``[H, W, 3]`` (unit vectors; the zero vector where invalid). Any real dtype is accepted (the
files are float64); labels must hold integers.

Missing values: as in MTAN's and LibMTL's loaders, the *only* marks of a missing value are depth
0, the zero normal and label -1 (the losses and metrics mask exactly those). A NaN or infinite
value in any map (or one too large for float32) is refused when the sample is read, with a
:class:`~mtlkit.errors.DatasetError` naming the file, the count and the first pixel: it would
otherwise pass the ``!= 0`` masks and turn the loss into NaN. Write 0 for a missing depth.

:class:`DenseNpy` reads one split; its items are ``(image float32 [3, H, W], {task: target})``
with segmentation targets int64 ``[H, W]`` (-1 = ignore), depth float32 ``[1, H, W]`` and normals
float32 ``[3, H, W]``, so the default collate gives ``[B, ...]`` batches. The tasks:

* segmentation: cross-entropy over the labelled pixels; metrics ``miou`` and ``pix_acc``
  (higher is better).
* depth: L1 over the valid pixels; metrics ``abs_err`` and ``rel_err`` (lower is better).
* normal: ``1 - cos`` over the valid pixels (the prediction is normalised by the loss, so a head
  may output any vector); metrics ``mean_angle``, ``median_angle`` (degrees, lower is better),
  ``within_11.25``, ``within_22.5``, ``within_30`` (fractions in [0, 1], higher is better).

Each task's Δm% weight is 1, and Δm% over these metrics with these directions is the convention of
MTAN, LibMTL and Nash-MTL (``delta_m(..., mode="flat")`` for Nash-MTL's mean over all metrics,
``mode="task_mean"`` for LibMTL's mean over tasks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from mtlkit.data.files import dataset_error, describe_missing, numbered_files
from mtlkit.data.transforms import DenseAugment, MapKind, normalize, resize_maps
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.metrics import (
    DepthAbsError,
    DepthRelError,
    MeanIoU,
    NormalMeanAngle,
    NormalMedianAngle,
    NormalWithinAngle,
    PixelAccuracy,
)
from mtlkit.tasks import Task

__all__ = [
    "DenseNpy",
    "dense_splits",
    "depth_loss",
    "depth_task",
    "normal_loss",
    "normal_task",
    "segmentation_loss",
    "segmentation_task",
]

IGNORE_INDEX = -1
"""The label of unlabelled pixels in MTAN's label maps."""


def segmentation_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits ``[B, C, H, W]`` against labels ``[B, H, W]``, averaged over the
    labelled pixels (label -1 is ignored; 0 when a batch has no labelled pixel, not NaN)."""
    target = target.to(torch.int64)
    total = F.cross_entropy(output, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def depth_loss(output: Tensor, target: Tensor) -> Tensor:
    """L1 between the predicted and target depth ``[B, 1, H, W]`` over the valid pixels (target
    != 0), as in MTAN/LibMTL."""
    if output.shape != target.shape:
        raise MtlkitError(
            f"depth_loss: output {tuple(output.shape)} != target {tuple(target.shape)}"
        )
    valid = (target != 0).to(output.dtype)
    return ((output - target).abs() * valid).sum() / valid.sum().clamp(min=1)


def normal_loss(output: Tensor, target: Tensor) -> Tensor:
    """``1 - cos`` between the normalised prediction and the target normal ``[B, 3, H, W]``,
    averaged over the valid pixels (target not the zero vector), as in MTAN/LibMTL."""
    if output.shape != target.shape or output.dim() != 4 or output.shape[1] != 3:
        raise MtlkitError(
            f"normal_loss: expected output and target [B, 3, H, W], got "
            f"{tuple(output.shape)} and {tuple(target.shape)}"
        )
    valid = (target != 0).any(dim=1).to(output.dtype)
    cosine = (F.normalize(output, dim=1) * target).sum(dim=1)
    return 1.0 - (cosine * valid).sum() / valid.sum().clamp(min=1)


def segmentation_task(name: str, num_classes: int) -> Task:
    """A segmentation task: :func:`segmentation_loss`, metrics ``miou`` and ``pix_acc``."""
    return Task(
        name,
        segmentation_loss,
        {
            "miou": functools.partial(MeanIoU, num_classes, IGNORE_INDEX),
            "pix_acc": functools.partial(PixelAccuracy, num_classes, IGNORE_INDEX),
        },
    )


def depth_task(name: str = "depth") -> Task:
    """A depth task: :func:`depth_loss`, metrics ``abs_err`` and ``rel_err``."""
    return Task(name, depth_loss, {"abs_err": DepthAbsError, "rel_err": DepthRelError})


def normal_task(name: str = "normal") -> Task:
    """A surface-normal task: :func:`normal_loss`, metrics ``mean_angle``, ``median_angle``,
    ``within_11.25``, ``within_22.5`` and ``within_30``."""
    return Task(
        name,
        normal_loss,
        {
            "mean_angle": NormalMeanAngle,
            "median_angle": NormalMedianAngle,
            "within_11.25": functools.partial(NormalWithinAngle, 11.25),
            "within_22.5": functools.partial(NormalWithinAngle, 22.5),
            "within_30": functools.partial(NormalWithinAngle, 30.0),
        },
    )


# How each map is stored (number of dimensions of the .npy array, channels) and read.
_STORED = {"image": (3, 3), "label": (2, None), "depth": (3, 1), "normal": (3, 3)}

TargetsFn = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


class DenseNpy(Dataset):
    """One split of a dataset in MTAN's ``.npy`` layout (see the module docstring).

    Args:
        dataset: the dataset's name, for error messages.
        folder: the split's folder, e.g. ``<root>/train``.
        sources: ``{map: (subfolder, kind)}``; must include ``"image"`` of kind ``image``.
        indices: the sample numbers ``N`` to use, in order.
        targets: turns the loaded maps (all but the image) into ``{task: target}``.
        layout: the expected layout, shown in errors.
        num_classes: the number of classes of the ``label`` maps (values -1 or in ``[0, C)``).
        augment: the random augmentation of the training split, or ``None``.
        size: ``(height, width)`` to resize every sample to first, or ``None``.
        mean, std: per-channel image normalisation, or ``None`` to keep [0, 1].
        seed: seed of the augmentation in the main process; in a ``DataLoader`` worker the
            generator is seeded from the worker's seed, which the loader draws from its own
            generator, so a seeded loader gives the same augmentations with any worker count
            > 0 and every worker draws differently.
    """

    def __init__(
        self,
        dataset: str,
        folder: Path,
        sources: Mapping[str, tuple[str, MapKind]],
        indices: Sequence[int],
        targets: TargetsFn,
        layout: str,
        num_classes: int | None = None,
        augment: DenseAugment | None = None,
        size: tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        if "image" not in sources or sources["image"][1] != "image":
            raise MtlkitError("DenseNpy: sources must include 'image' of kind 'image'")
        self.dataset = dataset
        self.folder = folder
        self.sources = dict(sources)
        self.kinds: dict[str, MapKind] = {name: kind for name, (_, kind) in sources.items()}
        self.indices = list(indices)
        self.targets_fn = targets
        self.layout = layout
        self.num_classes = num_classes
        self.augment = augment
        self.size = size
        self.mean, self.std = mean, std
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._worker: tuple[int, torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, name: str, index: int) -> Path:
        """The file of map ``name`` of sample number ``index``."""
        return self.folder / self.sources[name][0] / f"{index}.npy"

    def load_map(self, name: str, index: int) -> Tensor:
        """Map ``name`` of sample ``index`` in the layout of its kind (see the module docstring).

        Raises:
            DatasetError: if the file cannot be read or has the wrong shape or values (a NaN or
                infinite value included, see the module docstring).
        """
        path = self.path(name, index)
        kind = self.kinds[name]
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise dataset_error(
                self.dataset, f"cannot read {str(path)!r}: {error}", self.layout
            ) from None
        dims, channels = _STORED[kind]
        if kind == "depth" and array.ndim == 2:  # [H, W] depth: accept it
            array = array[..., None]
        ok = array.ndim == dims and (channels is None or array.shape[-1] == channels)
        real = np.issubdtype(array.dtype, np.number) and not np.issubdtype(
            array.dtype, np.complexfloating
        )
        if not ok or not real:
            want = {"image": "[H, W, 3]", "label": "[H, W]", "depth": "[H, W, 1]"}.get(
                kind, "[H, W, 3]"
            )
            raise dataset_error(
                self.dataset,
                f"{str(path)!r} holds {array.dtype} {list(array.shape)}, expected a real {want}",
                self.layout,
            )
        if np.issubdtype(array.dtype, np.floating):
            self._check_finite(path, kind, array)
        if kind == "label":
            labels = array.astype(np.int64)
            if np.issubdtype(array.dtype, np.floating) and not np.array_equal(labels, array):
                raise dataset_error(
                    self.dataset, f"{str(path)!r}: labels must be integers", self.layout
                )
            low, high = int(labels.min()), int(labels.max())
            if low < IGNORE_INDEX or (self.num_classes is not None and high >= self.num_classes):
                raise dataset_error(
                    self.dataset,
                    f"{str(path)!r}: labels from {low} to {high}, expected -1 (unlabelled) or "
                    f"0..{(self.num_classes or 1) - 1}",
                    self.layout,
                )
            return torch.from_numpy(labels)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)

    def _check_finite(self, path: Path, kind: MapKind, array: np.ndarray) -> None:
        """Raise a DatasetError naming the file, the count and the first pixel if ``array``
        holds NaN or infinite values, or values beyond float32 (the dtype they are read in)."""
        with np.errstate(over="ignore", invalid="ignore"):
            bad = ~np.isfinite(array.astype(np.float32))
        if not bad.any():
            return
        row, column = (int(i) for i in np.argwhere(bad)[0][:2])
        hint = {
            "depth": "; invalid depth is 0 in this layout, not NaN",
            "normal": "; an invalid normal is the zero vector in this layout, not NaN",
            "label": "; unlabelled pixels are -1 in this layout",
        }.get(kind, "")
        raise dataset_error(
            self.dataset,
            f"{str(path)!r}: {int(bad.sum())} NaN or infinite value(s), the first at row {row}, "
            f"column {column} ({array[row, column].ravel()[0]}){hint}",
            self.layout,
        )

    def _rng(self) -> torch.Generator:
        info = get_worker_info()
        if info is None:
            return self._generator
        if self._worker is None or self._worker[0] != info.seed:
            self._worker = (info.seed, torch.Generator().manual_seed(info.seed % 2**63))
        return self._worker[1]

    def load_maps(self, index: int) -> dict[str, Tensor]:
        """All maps of sample number ``index``, as stored (no resize, no augmentation).

        Raises:
            DatasetError: if a file cannot be read, is malformed, or the maps differ in size.
        """
        maps = {name: self.load_map(name, index) for name in self.sources}
        sizes = {name: list(x.shape[-2:]) for name, x in maps.items()}
        if len({tuple(s) for s in sizes.values()}) != 1:
            raise dataset_error(
                self.dataset,
                f"sample {index} of {str(self.folder)!r}: the maps differ in size {sizes}",
                self.layout,
            )
        return maps

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        maps = self.load_maps(self.indices[i])
        if self.size is not None:
            maps = resize_maps(maps, self.kinds, self.size)
        if self.augment is not None:
            maps = self.augment(maps, self.kinds, self._rng())
        image = maps.pop("image")
        if self.mean is not None and self.std is not None:
            image = normalize(image, self.mean, self.std)
        return image, self.targets_fn(maps)

    def __repr__(self) -> str:
        return (
            f"DenseNpy({self.dataset!r}, folder={str(self.folder)!r}, n={len(self)}, "
            f"augment={self.augment!r})"
        )


def _common_indices(
    dataset: str, folder: Path, sources: Mapping[str, tuple[str, MapKind]], layout: str
) -> list[int]:
    """The sample numbers present in every map folder of a split (they must agree)."""
    found = {
        name: set(numbered_files(dataset, folder / sub, ".npy", layout))
        for name, (sub, _) in sources.items()
    }
    image = found["image"]
    for name, numbers in found.items():
        if numbers != image:
            missing = sorted(image - numbers)
            extra = sorted(numbers - image)
            sub = sources[name][0]
            detail = (
                f"missing {describe_missing(f'{n}.npy' for n in missing)}"
                if missing
                else f"has {describe_missing(f'{n}.npy' for n in extra)} without an image"
            )
            raise dataset_error(
                dataset, f"{str(folder / sub)!r} does not match image/: {detail}", layout
            )
    return sorted(image)


def dense_splits(
    dataset: str,
    root: Path,
    sources: Mapping[str, tuple[str, MapKind]],
    targets: TargetsFn,
    layout: str,
    num_classes: int | None,
    seed: int,
    augment: bool,
    val_fraction: float,
    size: tuple[int, int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[dict[str, DenseNpy], tuple[int, int, int]]:
    """``{"train", "val", "test"}`` of an MTAN-layout dataset, and the input shape.

    ``test`` is the ``val`` folder. ``val`` is a seeded ``val_fraction`` of the ``train`` folder
    held out from training, or, with ``val_fraction=0`` (MTAN's and LibMTL's setting: those
    data sets have no validation split), the ``val`` folder again.

    Raises:
        DatasetError: if a folder or file is missing or malformed.
        ConfigError: on a bad option.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if size is not None:
        ok = isinstance(size, (tuple, list)) and len(size) == 2
        if not ok or not all(isinstance(s, int) and s > 0 for s in size):
            raise ConfigError(f"size must be two positive integers (height, width), got {size!r}")
        size = (int(size[0]), int(size[1]))
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    numbers = {
        split: _common_indices(dataset, root / split, sources, layout) for split in ("train", "val")
    }
    make = functools.partial(
        DenseNpy,
        dataset,
        sources=sources,
        targets=targets,
        layout=layout,
        num_classes=num_classes,
        size=size,
        mean=mean,
        std=std,
    )
    train_numbers = numbers["train"]
    val_numbers = numbers["val"]
    val_folder = root / "val"
    if val_fraction > 0:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train_numbers), generator=gen).tolist()
        n_val = max(1, round(val_fraction * len(train_numbers)))
        if n_val >= len(train_numbers):
            raise ConfigError(
                f"val_fraction={val_fraction} leaves no training sample of {len(train_numbers)}"
            )
        val_numbers = sorted(train_numbers[i] for i in order[:n_val])
        train_numbers = sorted(train_numbers[i] for i in order[n_val:])
        val_folder = root / "train"
    splits = {
        "train": make(
            root / "train",
            indices=train_numbers,
            augment=DenseAugment() if augment else None,
            seed=seed,
        ),
        "val": make(val_folder, indices=val_numbers),
        "test": make(root / "val", indices=numbers["val"]),
    }
    # Read one sample of each folder now, so that a malformed root fails here and not in a
    # DataLoader worker; it also gives the input shape.
    image = splits["train"].load_maps(train_numbers[0])["image"]
    splits["test"].load_maps(numbers["val"][0])
    height, width = size if size is not None else tuple(image.shape[-2:])
    return splits, (int(image.shape[0]), int(height), int(width))
