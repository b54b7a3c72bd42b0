"""NYUv2: 13-class semantic segmentation, depth and surface normals (3 tasks).

Silberman et al. (ECCV 2012), in the preprocessed form of MTAN (Liu et al., CVPR 2019) that
LibMTL, Nash-MTL, FAMO and others use: 795 training and 654 test scenes of 288 x 384 pixels, one
``.npy`` file per scene and map (see :data:`LAYOUT` and :mod:`mtlkit.data.dense`). Images are RGB
in [0, 1] (not normalised, as in MTAN); labels are 13 classes (0..12) with -1 unlabelled; depth is
in metres with 0 where invalid; normals are unit vectors, zero where invalid. Those are the only
marks of missing values (MTAN's and LibMTL's masks): a NaN or infinite value in any map is refused
with a :class:`~mtlkit.errors.DatasetError` naming the file (see :mod:`mtlkit.data.dense`).

Tasks (:func:`nyuv2_tasks`): ``segmentation`` (13 channels; ``miou``, ``pix_acc``), ``depth``
(1 channel; ``abs_err``, ``rel_err``), ``normal`` (3 channels; ``mean_angle``, ``median_angle``,
``within_11.25``, ``within_22.5``, ``within_30``); Δm% over all nine metrics with these
directions, as in the literature.

Augmentation (``augment=True``, the training split only): MTAN's random scale-crop (zoom 1.0, 1.2
or 1.5, depth divided by the zoom) and left-right flip (normals' x negated),
:class:`~mtlkit.data.transforms.DenseAugment`. MTAN's paper trained without it; LibMTL, Nash-MTL
and FAMO train with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from mtlkit.data.dense import (
    DenseNpy,
    dense_splits,
    depth_task,
    normal_task,
    segmentation_task,
)
from mtlkit.data.files import resolve_root
from mtlkit.data.transforms import MapKind
from mtlkit.tasks import Task

__all__ = ["LAYOUT", "NUM_CLASSES", "TASKS", "nyuv2", "nyuv2_tasks"]

NUM_CLASSES = 13
TASKS = ("segmentation", "depth", "normal")
TASK_OUTPUTS = {"segmentation": NUM_CLASSES, "depth": 1, "normal": 3}

LAYOUT = """
<root>/                       the preprocessed NYUv2 of MTAN (as used by LibMTL)
  train/                      795 scenes
    image/0.npy ...           float [288, 384, 3], RGB in [0, 1]
    label/0.npy ...           [288, 384], class 0..12, -1 = unlabelled
    depth/0.npy ...           float [288, 384, 1], metres, 0 = invalid (NaN/inf refused)
    normal/0.npy ...          float [288, 384, 3], unit normals, 0 = invalid
  val/                        654 scenes, the same four folders (used as the test split)
"""

_SOURCES: dict[str, tuple[str, MapKind]] = {
    "image": ("image", "image"),
    "segmentation": ("label", "label"),
    "depth": ("depth", "depth"),
    "normal": ("normal", "normal"),
}


def nyuv2_tasks() -> list[Task]:
    """``segmentation`` (13 classes), ``depth`` and ``normal``; see :mod:`mtlkit.data.dense`."""
    return [segmentation_task("segmentation", NUM_CLASSES), depth_task(), normal_task()]


def _targets(maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {task: maps[task] for task in TASKS}


def nyuv2(
    root: str,
    seed: int = 0,
    augment: bool = True,
    val_fraction: float = 0.1,
    size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[dict[str, DenseNpy], tuple[int, int, int]]:
    """The NYUv2 splits ``{"train", "val", "test"}`` and the input shape ``(3, H, W)``.

    Args:
        root: the folder of :data:`LAYOUT`.
        seed: seed of the augmentation and of the ``val_fraction`` hold-out.
        augment: random scale-crop and flip on the training split.
        val_fraction: the fraction of ``train/`` held out as the validation split (0.1, so that
            model selection never sees the test split); 0 reproduces the literature's setting
            (MTAN, LibMTL), which uses ``val/`` for both validation and test.
        size: ``(height, width)`` to resize to (e.g. for fast CPU runs), or ``None``.
        mean, std: per-channel image normalisation, or ``None`` (MTAN's [0, 1] images).

    Raises:
        DatasetError: if the root is missing or malformed (the message shows :data:`LAYOUT`).
        ConfigError: on a bad option.
    """
    path = resolve_root("nyuv2", root, LAYOUT)
    return dense_splits(
        "nyuv2",
        path,
        _SOURCES,
        _targets,
        LAYOUT,
        num_classes=NUM_CLASSES,
        seed=seed,
        augment=augment,
        val_fraction=val_fraction,
        size=size,
        mean=mean,
        std=std,
    )
