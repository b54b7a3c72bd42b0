"""Office-31 and Office-Home: multi-input classification, one task per domain.

Office-31 (Saenko et al., ECCV 2010: 4110 images of 31 classes in the domains amazon, dslr and
webcam) and Office-Home (Venkateswara et al., CVPR 2017: 15588 images of 65 classes in Art,
Clipart, Product and Real World), as multi-task problems in the manner of LibMTL: each domain is
a task with its own input images and its own classifier head over the shared classes. The folders
are read as released (see :data:`OFFICE31_LAYOUT` and :data:`OFFICE_HOME_LAYOUT`); classes are
numbered in the sorted order of their folder names, which every domain must share; a class folder
without images is refused (a :class:`~mtlkit.errors.DatasetError` naming it), since its class
could then be neither trained nor tested in that domain.

Split: there is no official one. Each domain is split 60/20/20 into train/val/test, per class
(stratified: ``round(0.2 n)`` images of a class of ``n`` go to val, as many to test, the rest to
train), by a permutation seeded with ``(seed, domain)``. With ``split_dir`` the split is
written there as LibMTL's ``data_txt`` files, ``<split_dir>/<domain>_<split>.txt`` with one line
``<path relative to root> <label>`` per image (e.g. ``dslr/images/back_pack/frame_0008.jpg 0``),
and re-read if present, so that later runs (and other seeds) reuse the same split; delete the
files to draw a new one. LibMTL's own files can be dropped into ``split_dir`` as they are.

Items are ``(image float32 [3, S, S], label int64 [])``: the image resized to ``S x S``
(``image_size``, 224 as in LibMTL) with Pillow's bilinear filter and normalised with the ImageNet
statistics. Tasks: cross-entropy, metric ``acc`` (higher is better); Δm% over the per-domain
accuracies as in LibMTL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.data.files import dataset_error, describe_missing, resolve_root
from mtlkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, load_image, normalize
from mtlkit.errors import ConfigError
from mtlkit.metrics import Accuracy
from mtlkit.tasks import Task

__all__ = [
    "OFFICE31",
    "OFFICE31_LAYOUT",
    "OFFICE_HOME",
    "OFFICE_HOME_LAYOUT",
    "OfficeDomain",
    "OfficeSpec",
    "office",
    "office_tasks",
]

SPLITS = ("train", "val", "test")
FRACTIONS = (0.6, 0.2, 0.2)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

OFFICE31_LAYOUT = """
<root>/                       Office-31, as released (one folder per domain)
  amazon/images/<class>/<image>.jpg     31 classes: back_pack, bike, ..., trash_can
  dslr/images/<class>/<image>.jpg       (<domain>/<class>/<image> without images/ also works)
  webcam/images/<class>/<image>.jpg
<split_dir>/<domain>_<split>.txt        written on the first run, re-read later:
                                        "<path relative to root> <label>" per line
"""

OFFICE_HOME_LAYOUT = """
<root>/                       Office-Home, as released (one folder per domain)
  Art/<class>/<image>.jpg               65 classes: Alarm_Clock, Backpack, ..., Webcam
  Clipart/<class>/<image>.jpg
  Product/<class>/<image>.jpg
  Real World/<class>/<image>.jpg        (or Real_World/)
<split_dir>/<domain>_<split>.txt        written on the first run, re-read later:
                                        "<path relative to root> <label>" per line
"""


@dataclass(frozen=True)
class OfficeSpec:
    """One Office data set: its name, its domains and the expected layout.

    Attributes:
        name: the data set's name, for messages.
        domains: ``{task: (file tag, folder names to try)}``; the file tag names the split files.
        layout: the expected layout, shown in errors.
    """

    name: str
    domains: Mapping[str, tuple[str, tuple[str, ...]]]
    layout: str


OFFICE31 = OfficeSpec(
    "office_31",
    {
        "amazon": ("amazon", ("amazon",)),
        "dslr": ("dslr", ("dslr",)),
        "webcam": ("webcam", ("webcam",)),
    },
    OFFICE31_LAYOUT,
)
OFFICE_HOME = OfficeSpec(
    "office_home",
    {
        "art": ("Art", ("Art",)),
        "clipart": ("Clipart", ("Clipart",)),
        "product": ("Product", ("Product",)),
        "real_world": ("Real_World", ("Real World", "Real_World")),
    },
    OFFICE_HOME_LAYOUT,
)


class OfficeDomain(Dataset):
    """The images of one domain and split; items ``(image [3, S, S], label int64 [])``.

    Args:
        root: the data set's root folder.
        files: the image paths relative to ``root``.
        labels: the class of each image.
        image_size: the side ``S`` of the square images.
        mean, std: per-channel normalisation, or ``None``.
        name: ``"domain/split"``, for ``repr`` and errors.
        spec: the data set, for error messages.
    """

    def __init__(
        self,
        root: Path,
        files: Sequence[str],
        labels: Sequence[int],
        spec: OfficeSpec,
        image_size: int = 224,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        name: str = "",
    ) -> None:
        self.root = root
        self.files = list(files)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.spec = spec
        self.image_size = image_size
        self.mean, self.std = mean, std
        self.name = name

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path = self.root / self.files[i]
        try:
            image = load_image(path, (self.image_size, self.image_size))
        except OSError as error:
            raise dataset_error(
                self.spec.name, f"cannot read image {str(path)!r}: {error}", self.spec.layout
            ) from None
        if self.mean is not None and self.std is not None:
            image = normalize(image, self.mean, self.std)
        return image, self.labels[i]

    def __repr__(self) -> str:
        return f"OfficeDomain({self.name!r}, n={len(self)})"


def _domain_folder(spec: OfficeSpec, root: Path, task: str) -> Path:
    """The folder holding the class folders of one domain."""
    for candidate in spec.domains[task][1]:
        folder = root / candidate
        if folder.is_dir():
            return folder / "images" if (folder / "images").is_dir() else folder
    names = " or ".join(f"{c}/" for c in spec.domains[task][1])
    raise dataset_error(spec.name, f"missing domain folder {names} in {str(root)!r}", spec.layout)


def _scan(spec: OfficeSpec, root: Path) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """The class names and ``{task: {class: [image paths relative to root]}}``."""
    listing: dict[str, dict[str, list[str]]] = {}
    for task in spec.domains:
        folder = _domain_folder(spec, root, task)
        classes: dict[str, list[str]] = {}
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                images = sorted(
                    Path(f.path).relative_to(root).as_posix()
                    for f in os.scandir(entry.path)
                    if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)
                )
                if not images:
                    raise dataset_error(
                        spec.name,
                        f"the class folder {entry.path!r} holds no image "
                        f"({', '.join(IMAGE_SUFFIXES)}); every class needs images in every domain",
                        spec.layout,
                    )
                classes[entry.name] = images
        if not classes:
            raise dataset_error(
                spec.name, f"no <class>/<image> files in {str(folder)!r}", spec.layout
            )
        listing[task] = classes
    reference = next(iter(listing))
    names = sorted(listing[reference])
    for task, classes in listing.items():
        if sorted(classes) != names:
            differ = sorted(set(classes) ^ set(names))
            raise dataset_error(
                spec.name,
                f"the domains {reference} and {task} have different classes "
                f"({describe_missing(differ)})",
                spec.layout,
            )
    return names, listing


def _seed_for(seed: int, domain: int) -> int:
    state = np.random.SeedSequence([seed, domain]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _draw_split(
    classes: Mapping[str, list[str]], names: Sequence[str], seed: int
) -> dict[str, list[tuple[str, int]]]:
    """A stratified 60/20/20 split of one domain: ``{split: [(path, label)]}``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, name in enumerate(names):
        files = classes[name]
        order = torch.randperm(len(files), generator=gen).tolist()
        n_val = round(FRACTIONS[1] * len(files))
        n_test = round(FRACTIONS[2] * len(files))
        n_train = len(files) - n_val - n_test
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
        cuts["test"] = order[n_train + n_val :]
        for split, rows in cuts.items():
            out[split] += [(files[r], label) for r in rows]
    return out


def _read_split_file(
    spec: OfficeSpec, path: Path, root: Path, num_classes: int
) -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").rsplit(" ", 1)
        if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
            raise dataset_error(
                spec.name,
                f"{str(path)!r} line {number}: expected '<path> <label>', got {line!r}",
                spec.layout,
            )
        file, label = parts[0].strip(), int(parts[1])
        if not 0 <= label < num_classes:
            raise dataset_error(
                spec.name,
                f"{str(path)!r} line {number}: label {label} not in 0..{num_classes - 1}",
                spec.layout,
            )
        if not (root / file).is_file():
            raise dataset_error(
                spec.name,
                f"{str(path)!r} line {number}: no image {str(root / file)!r}",
                spec.layout,
            )
        rows.append((file, label))
    if not rows:
        raise dataset_error(spec.name, f"{str(path)!r} lists no image", spec.layout)
    return rows


def _write_split_file(path: Path, rows: Sequence[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(f"{file} {label}\n" for file, label in rows), encoding="utf-8")
    os.replace(temporary, path)


def office_tasks(spec: OfficeSpec) -> list[Task]:
    """One task per domain: cross-entropy, metric ``acc``."""
    return [Task(task, F.cross_entropy, {"acc": Accuracy}) for task in spec.domains]


def office(
    spec: OfficeSpec,
    root: str,
    seed: int = 0,
    split_dir: str | None = None,
    image_size: int = 224,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> tuple[dict[str, dict[str, OfficeDomain]], int]:
    """The splits ``{split: {domain: OfficeDomain}}`` of an Office data set and its class count.

    Args:
        spec: :data:`OFFICE31` or :data:`OFFICE_HOME`.
        root: the folder of the spec's layout.
        seed: seed of the split (unused for a domain whose split files exist in ``split_dir``).
        split_dir: where the split files are written and re-read (see the module docstring);
            ``None`` draws the split from ``seed`` and writes nothing.
        image_size: the side of the square images.
        mean, std: per-channel normalisation, or ``None`` for [0, 1] images.

    Raises:
        DatasetError: if the root or a split file is missing or malformed (the message shows
            the layout).
        ConfigError: on a bad option.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be an integer >= 1, got {image_size!r}")
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    base = resolve_root(spec.name, root, spec.layout)
    names, listing = _scan(spec, base)
    out_dir = Path(split_dir).expanduser() if split_dir is not None else None
    result: dict[str, dict[str, OfficeDomain]] = {s: {} for s in SPLITS}
    for d, (task, (tag, _)) in enumerate(spec.domains.items()):
        files = {s: out_dir / f"{tag}_{s}.txt" for s in SPLITS} if out_dir else {}
        present = [s for s, f in files.items() if f.is_file()]
        if present and len(present) != len(SPLITS):
            raise dataset_error(
                spec.name,
                f"{str(out_dir)!r} has {', '.join(f'{tag}_{s}.txt' for s in present)} but not "
                f"the other split files of {tag}; delete them to draw a new split",
                spec.layout,
            )
        if present:
            rows = {s: _read_split_file(spec, files[s], base, len(names)) for s in SPLITS}
        else:
            rows = _draw_split(listing[task], names, _seed_for(seed, d))
            for s, path in files.items():
                _write_split_file(path, rows[s])
        for s in SPLITS:
            if not rows[s]:
                raise dataset_error(
                    spec.name, f"domain {tag} has no image in its {s} split", spec.layout
                )
            result[s][task] = OfficeDomain(
                base,
                [f for f, _ in rows[s]],
                [label for _, label in rows[s]],
                spec,
                image_size=image_size,
                mean=mean,
                std=std,
                name=f"{task}/{s}",
            )
    return result, len(names)
