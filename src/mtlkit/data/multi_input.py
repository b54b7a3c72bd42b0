"""Multi-input problems, where each task has its own input (e.g. Office-31, one domain per task).

* :class:`MultiInputLoader` iterates several task loaders together, one batch of each per step.
* :func:`two_domain_digits` is a small embedded two-domain problem built from the bundled UCI
  digits (see :mod:`mtlkit.data.multidigits` for the credit): task ``"plain"`` classifies the 8x8
  digits as they are; task ``"inverted"`` classifies digits of a second domain, with inverted
  intensities (``1 - x``) and flipped left-right. The two domains use disjoint source images, and
  have unequal training sizes (600 and 400 by default) so that the shorter loader cycles.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtlkit.data.multidigits import (
    SPLITS,
    _check_count,
    _check_noise,
    _stratified_order,
    load_uci_digits,
)
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.metrics import Accuracy
from mtlkit.tasks import Task

__all__ = [
    "TWO_DOMAIN_TASKS",
    "DomainDigits",
    "MultiInputLoader",
    "two_domain_digits",
    "two_domain_tasks",
]

TWO_DOMAIN_TASKS = ("plain", "inverted")


class MultiInputLoader:
    """Iterate one loader per task together; each step yields ``{task: batch}``.

    One epoch is as long as the longest loader; a shorter loader cycles: when it is exhausted its
    iterator is restarted (which reshuffles a ``DataLoader`` with ``shuffle=True``). A loader's
    batch ``(inputs, target)`` is passed on as a tuple (the default collate makes it a list).

    Args:
        loaders: ``{task: loader}``; every loader must have a ``len()`` > 0 (a ``DataLoader`` over
            a map-style dataset has one).

    Attributes:
        loaders: the loaders, by task, in the given order.

    Raises:
        MtlkitError: if ``loaders`` is empty, a loader has no length, or a loader is empty.
    """

    def __init__(self, loaders: Mapping[str, Iterable[Any]]) -> None:
        if not isinstance(loaders, Mapping) or not loaders:
            raise MtlkitError("MultiInputLoader needs a non-empty {task: loader} mapping")
        self.loaders: dict[str, Iterable[Any]] = dict(loaders)
        self._lengths: dict[str, int] = {}
        for task, loader in self.loaders.items():
            try:
                n = len(loader) if isinstance(loader, Sized) else None
            except TypeError:
                n = None
            if n is None:
                raise MtlkitError(f"MultiInputLoader: the loader of task {task!r} has no len()")
            if n == 0:
                raise MtlkitError(f"MultiInputLoader: the loader of task {task!r} is empty")
            self._lengths[task] = n

    @property
    def tasks(self) -> list[str]:
        """The task names, in order."""
        return list(self.loaders)

    def __len__(self) -> int:
        return max(self._lengths.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators = {task: iter(loader) for task, loader in self.loaders.items()}
        for _ in range(len(self)):
            batch: dict[str, Any] = {}
            for task, loader in self.loaders.items():
                try:
                    item = next(iterators[task])
                except StopIteration:
                    iterators[task] = iter(loader)
                    try:
                        item = next(iterators[task])
                    except StopIteration:
                        raise MtlkitError(
                            f"MultiInputLoader: the loader of task {task!r} yielded no batch"
                        ) from None
                batch[task] = tuple(item) if isinstance(item, list) else item
            yield batch

    def __repr__(self) -> str:
        sizes = ", ".join(f"{t}={n}" for t, n in self._lengths.items())
        return f"MultiInputLoader({sizes})"


class DomainDigits(Dataset):
    """Digits of one domain and split; items are ``(image float32 [1, 8, 8], label int64 [])``.

    Args:
        images: float32 ``[N, 1, 8, 8]``.
        labels: int64 ``[N]``.
        source_indices: int64 ``[N]``, the rows of the UCI digits file the images come from.
        name: ``"task/split"``, for ``repr``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        source_indices: torch.Tensor,
        name: str = "",
    ) -> None:
        n = images.shape[0]
        if images.dim() != 4 or labels.shape != (n,) or source_indices.shape != (n,):
            raise MtlkitError(
                f"DomainDigits: expected images [N, 1, H, W], labels [N], source_indices [N], got "
                f"{tuple(images.shape)}, {tuple(labels.shape)}, {tuple(source_indices.shape)}"
            )
        self.images = images.to(torch.float32)
        self.labels = labels.to(torch.int64)
        self.source_indices = source_indices.to(torch.int64)
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return f"DomainDigits({self.name!r}, n={len(self)})"


def _invert_flip(images: torch.Tensor) -> torch.Tensor:
    """The second domain: inverted intensities, flipped left-right."""
    return (1.0 - images).flip(-1)


def _as_pair(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise ConfigError(f"expected one integer or two (plain, inverted), got {value!r}")


def two_domain_digits(
    seed: int = 0,
    n_per_domain: int | tuple[int, int] = (600, 400),
    n_val: int | tuple[int, int] = 150,
    n_test: int | tuple[int, int] = 150,
    noise: float = 0.0,
) -> dict[str, dict[str, DomainDigits]]:
    """A small two-domain multi-input problem from the UCI digits.

    The 1797 source images are ordered at random, stratified by class, and cut into disjoint
    chunks: train/val/test of the ``"plain"`` domain, then train/val/test of the ``"inverted"``
    domain (inverted intensities, flipped left-right). Every source image is used at most once.

    Args:
        seed: seed of the split and the noise; the same seed gives bit-identical tensors.
        n_per_domain: training samples of ``(plain, inverted)``, or one number for both.
        n_val: validation samples per domain (one number, or a pair).
        n_test: test samples per domain (one number, or a pair).
        noise: standard deviation of Gaussian pixel noise (after the domain transform), clipped
            to [0, 1]; 0 by default.

    Returns:
        ``{split: {task: DomainDigits}}`` with splits ``"train", "val", "test"`` and tasks
        ``"plain", "inverted"``.

    Raises:
        ConfigError: on a size out of range, or more samples than the 1797 source images.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    sizes = {
        "train": _as_pair(n_per_domain),
        "val": _as_pair(n_val),
        "test": _as_pair(n_test),
    }
    for split, pair in sizes.items():
        for task, n in zip(TWO_DOMAIN_TASKS, pair, strict=True):
            _check_count(f"{split} size of {task}", n)
    _check_noise(noise)
    images, labels = load_uci_digits()
    total = sum(sum(pair) for pair in sizes.values())
    if total > labels.numel():
        raise ConfigError(
            f"two_domain_digits: {total} samples asked for, only {labels.numel()} source images"
        )
    gen = torch.Generator().manual_seed(seed)
    order = _stratified_order(labels, gen)
    result: dict[str, dict[str, DomainDigits]] = {split: {} for split in SPLITS}
    start = 0
    for d, task in enumerate(TWO_DOMAIN_TASKS):
        for split in SPLITS:
            n = sizes[split][d]
            rows = order[start : start + n]
            start += n
            x = images[rows].unsqueeze(1)
            if task == "inverted":
                x = _invert_flip(x)
            eps = torch.randn(x.shape, generator=gen, dtype=torch.float32)
            if noise > 0:
                x = (x + noise * eps).clamp_(0.0, 1.0)
            result[split][task] = DomainDigits(
                x.contiguous(), labels[rows], rows, name=f"{task}/{split}"
            )
    return result


def two_domain_tasks() -> list[Task]:
    """The tasks of :func:`two_domain_digits`: ``plain`` and ``inverted``, each cross-entropy on
    logits ``[B, 10]`` with metric ``acc``."""
    return [Task(name, F.cross_entropy, {"acc": Accuracy}) for name in TWO_DOMAIN_TASKS]
