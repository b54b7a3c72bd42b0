"""Named problems for the CLI and configs: data splits, tasks, input shape, outputs per task."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from mtlkit.data.attributes import AttributesConfig as _AT
from mtlkit.data.attributes import attributes, attributes_tasks
from mtlkit.data.multi_input import two_domain_digits, two_domain_tasks
from mtlkit.data.multidigits import MultiDigitsConfig as _MD
from mtlkit.data.multidigits import multidigits, multidigits_tasks
from mtlkit.registry import Registry, normalize_name
from mtlkit.tasks import Task


@dataclass
class Problem:
    """A ready multi-task problem.

    Attributes:
        splits: ``{"train", "val", "test"}``; each a Dataset yielding ``(inputs, {task: target})``
            (single-input), or a ``{task: Dataset}`` yielding ``(inputs, target)`` (multi-input).
        tasks: the tasks, in order.
        input_shape: the shape of one input (without the batch dimension).
        task_outputs: the number of outputs of each task's head.
        multi_input: each task has its own input.
    """

    splits: Mapping[str, Dataset | Mapping[str, Dataset]]
    tasks: list[Task]
    input_shape: tuple[int, ...]
    task_outputs: dict[str, int]
    multi_input: bool = False


DATASETS: Registry[Problem] = Registry("dataset")


@DATASETS.register("multidigits")
def multidigits_problem(
    seed: int = 0,
    n_train: int = _MD.n_train,
    n_val: int = _MD.n_val,
    n_test: int = _MD.n_test,
    noise: float = _MD.noise,
    shift: int = _MD.shift,
) -> Problem:
    """MultiDigits (embedded): two UCI digits on one canvas; left, right and their sum."""
    splits = multidigits(
        seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, noise=noise, shift=shift
    )
    return Problem(
        splits=splits,
        tasks=multidigits_tasks(),
        input_shape=(1, 8, 8 + shift),
        task_outputs={"left": 10, "right": 10, "sum": 1},
    )


@DATASETS.register("two_domain_digits")
def two_domain_digits_problem(
    seed: int = 0,
    n_per_domain: int | tuple[int, int] = (600, 400),
    n_val: int | tuple[int, int] = 150,
    n_test: int | tuple[int, int] = 150,
    noise: float = 0.0,
) -> Problem:
    """A small multi-input problem (embedded): plain and inverted-flipped digits, one per task."""
    splits = two_domain_digits(
        seed=seed, n_per_domain=n_per_domain, n_val=n_val, n_test=n_test, noise=noise
    )
    tasks = two_domain_tasks()
    return Problem(
        splits=splits,
        tasks=tasks,
        input_shape=(1, 8, 8),
        task_outputs={t.name: 10 for t in tasks},
        multi_input=True,
    )


@DATASETS.register("attributes")
def attributes_problem(
    seed: int = 0,
    n_train: int = _AT.n_train,
    n_val: int = _AT.n_val,
    n_test: int = _AT.n_test,
    num_attributes: int = _AT.num_attributes,
    noise: float = _AT.noise,
    input_noise: float = _AT.input_noise,
    num_latents: int = _AT.num_latents,
    input_dim: int = _AT.input_dim,
    cluster_size: int = _AT.cluster_size,
    positive_rate: tuple[float, float] = _AT.positive_rate,
    structure_seed: int = _AT.structure_seed,
) -> Problem:
    """Attributes (synthetic, like CelebA): 40 correlated binary attributes of a latent vector."""
    splits = attributes(
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        num_attributes=num_attributes,
        noise=noise,
        input_noise=input_noise,
        num_latents=num_latents,
        input_dim=input_dim,
        cluster_size=cluster_size,
        positive_rate=positive_rate,
        structure_seed=structure_seed,
    )
    tasks = attributes_tasks(num_attributes)
    return Problem(
        splits=splits,
        tasks=tasks,
        input_shape=(input_dim,),
        task_outputs={t.name: 1 for t in tasks},
    )


# --- The standard benchmarks, read from a user-given root (nothing is downloaded) ---------------
# Each loader module documents its expected layout (its LAYOUT constant, also shown by the error
# a missing or malformed root raises). The imports are local so that `import mtlkit` stays light.


@DATASETS.register("nyuv2")
def nyuv2_problem(
    root: str,
    seed: int = 0,
    augment: bool = True,
    val_fraction: float = 0.1,
    size: tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Problem:
    """NYUv2 (MTAN's .npy layout): segmentation (13 classes), depth, surface normals."""
    from mtlkit.data.nyuv2 import TASK_OUTPUTS, nyuv2, nyuv2_tasks

    splits, shape = nyuv2(
        root, seed=seed, augment=augment, val_fraction=val_fraction, size=size, mean=mean, std=std
    )
    return Problem(
        splits=splits, tasks=nyuv2_tasks(), input_shape=shape, task_outputs=dict(TASK_OUTPUTS)
    )


@DATASETS.register("cityscapes")
def cityscapes_problem(
    root: str,
    seed: int = 0,
    tasks: str = "semantic_depth",
    classes: int = 7,
    augment: bool = True,
    val_fraction: float = 0.1,
    size: tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Problem:
    """Cityscapes (MTAN's .npy layout): tasks='semantic_depth' (segmentation + depth) or
    'binary' (7 binary segmentation tasks, one per category)."""
    from mtlkit.data.cityscapes import cityscapes, cityscapes_task_outputs, cityscapes_tasks

    splits, shape = cityscapes(
        root,
        seed=seed,
        tasks=tasks,  # type: ignore[arg-type]
        classes=classes,
        augment=augment,
        val_fraction=val_fraction,
        size=size,
        mean=mean,
        std=std,
    )
    return Problem(
        splits=splits,
        tasks=cityscapes_tasks(tasks, classes),  # type: ignore[arg-type]
        input_shape=shape,
        task_outputs=cityscapes_task_outputs(tasks, classes),  # type: ignore[arg-type]
    )


@DATASETS.register("celeba")
def celeba_problem(
    root: str,
    seed: int = 0,
    image_size: int = 64,
    attributes: list[str] | None = None,
    mean: tuple[float, float, float] | None = (0.485, 0.456, 0.406),
    std: tuple[float, float, float] | None = (0.229, 0.224, 0.225),
) -> Problem:
    """CelebA (official files and split): 40 binary attributes (or ``attributes``), one logit
    each. ``seed`` is unused (the split is official)."""
    from mtlkit.data.celeba import celeba, celeba_tasks

    splits, names = celeba(root, image_size=image_size, attributes=attributes, mean=mean, std=std)
    return Problem(
        splits=splits,
        tasks=celeba_tasks(names),
        input_shape=(3, image_size, image_size),
        task_outputs=dict.fromkeys(names, 1),
    )


def _office_problem(spec_name: str, root: str, seed: int, split_dir: str | None, **kw) -> Problem:
    from mtlkit.data import office as office_module

    spec = office_module.OFFICE31 if spec_name == "office_31" else office_module.OFFICE_HOME
    splits, num_classes = office_module.office(spec, root, seed=seed, split_dir=split_dir, **kw)
    tasks = office_module.office_tasks(spec)
    size = kw["image_size"]
    return Problem(
        splits=splits,
        tasks=tasks,
        input_shape=(3, size, size),
        task_outputs={t.name: num_classes for t in tasks},
        multi_input=True,
    )


@DATASETS.register("office_31")
def office31_problem(
    root: str,
    seed: int = 0,
    split_dir: str | None = None,
    image_size: int = 224,
    mean: tuple[float, float, float] | None = (0.485, 0.456, 0.406),
    std: tuple[float, float, float] | None = (0.229, 0.224, 0.225),
) -> Problem:
    """Office-31, multi-input (amazon, dslr, webcam; 31 classes); a seeded 60/20/20 split per
    domain, written to and re-read from ``split_dir``."""
    return _office_problem(
        "office_31", root, seed, split_dir, image_size=image_size, mean=mean, std=std
    )


@DATASETS.register("office_home")
def office_home_problem(
    root: str,
    seed: int = 0,
    split_dir: str | None = None,
    image_size: int = 224,
    mean: tuple[float, float, float] | None = (0.485, 0.456, 0.406),
    std: tuple[float, float, float] | None = (0.229, 0.224, 0.225),
) -> Problem:
    """Office-Home, multi-input (art, clipart, product, real_world; 65 classes); a seeded
    60/20/20 split per domain, written to and re-read from ``split_dir``."""
    return _office_problem(
        "office_home", root, seed, split_dir, image_size=image_size, mean=mean, std=std
    )


@DATASETS.register("qm9")
def qm9_problem(
    root: str,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int = 10000,
    n_test: int = 10000,
    energies: str = "atomization",
    exclude_uncharacterized: bool = True,
    cache_dir: str | None = None,
) -> Problem:
    """QM9 (the release's .xyz files): 11 regression targets, normalised with the training
    statistics, MAE in physical units; use the ``mpnn`` architecture."""
    from mtlkit.data.qm9 import MAX_ATOMS, TARGETS, qm9, qm9_tasks

    splits, mean, std = qm9(
        root,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        energies=energies,  # type: ignore[arg-type]
        exclude_uncharacterized=exclude_uncharacterized,
        cache_dir=cache_dir,
    )
    return Problem(
        splits=splits,
        tasks=qm9_tasks(mean.tolist(), std.tolist()),
        input_shape=(MAX_ATOMS, 4),
        task_outputs=dict.fromkeys(TARGETS, 1),
    )


def _multimnist_problem(dataset: str, root: str, seed: int, val_size: int, normalize: bool):
    from mtlkit.data.multimnist import multimnist, multimnist_tasks

    splits = multimnist(root, seed=seed, val_size=val_size, normalize=normalize, dataset=dataset)
    return Problem(
        splits=splits,
        tasks=multimnist_tasks(),
        input_shape=(1, 28, 28),
        task_outputs={"left": 10, "right": 10},
    )


@DATASETS.register("multi_mnist")
def multi_mnist_problem(
    root: str, seed: int = 0, val_size: int = 10000, normalize: bool = True
) -> Problem:
    """MultiMNIST (Sener & Koltun) from the MNIST IDX files: classify the left and right digit."""
    return _multimnist_problem("multi_mnist", root, seed, val_size, normalize)


@DATASETS.register("multi_fashion")
def multi_fashion_problem(
    root: str, seed: int = 0, val_size: int = 10000, normalize: bool = True
) -> Problem:
    """MultiFashion (Sener & Koltun's construction) from the Fashion-MNIST IDX files."""
    return _multimnist_problem("multi_fashion", root, seed, val_size, normalize)


@DATASETS.register("mmoe_synthetic")
def mmoe_synthetic_problem(
    seed: int = 0,
    correlation: float = 0.5,
    n_train: int = 10000,
    n_val: int = 1000,
    n_test: int = 1000,
    num_tasks: int = 2,
    input_dim: int = 100,
    scale: float = 1.0,
    num_sines: int = 10,
    noise: float = 0.1,
    structure_seed: int = 0,
) -> Problem:
    """The MMoE synthetic regression tasks (generated), with the task correlation as a knob."""
    from mtlkit.data.synthetic import mmoe_synthetic, mmoe_tasks

    splits = mmoe_synthetic(
        seed=seed,
        correlation=correlation,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        num_tasks=num_tasks,
        input_dim=input_dim,
        scale=scale,
        num_sines=num_sines,
        noise=noise,
        structure_seed=structure_seed,
    )
    tasks = mmoe_tasks(num_tasks)
    return Problem(
        splits=splits,
        tasks=tasks,
        input_shape=(input_dim,),
        task_outputs={t.name: 1 for t in tasks},
    )


# --- Memory estimates of the generated data sets, before they are generated ----------------------
# Upper estimates of the peak memory (bytes) of building each generated data set, from its
# arguments: the samples of every split times the bytes each sample takes while it is generated
# (float64 working copies included; the measured peaks are 55-95% of these), plus fixed parts. The
# data sets read from files have none: their memory is bounded by their files (or, for the lazy
# image loaders, by one batch).


def _multidigits_bytes(a: Mapping[str, int]) -> int:
    pixels = 8 * (8 + a["shift"])  # the canvas; four float32 copies of it while composed
    return (a["n_train"] + a["n_val"] + a["n_test"]) * (20 * pixels + 64)


def _attributes_bytes(a: Mapping[str, int]) -> int:
    from mtlkit.data.attributes import _REFERENCE_SIZE, _RENDER_HIDDEN

    # the reference sample of the structure is generated like the samples of a split
    samples = a["n_train"] + a["n_val"] + a["n_test"] + _REFERENCE_SIZE
    floats = a["input_dim"] + a["num_attributes"] + 4 * a["num_latents"] + _RENDER_HIDDEN
    return samples * 20 * floats


def _mmoe_synthetic_bytes(a: Mapping[str, int]) -> int:
    samples = a["n_train"] + a["n_val"] + a["n_test"]
    per_sample = 16 * a["input_dim"] + 16 * a["num_tasks"] * (a["num_sines"] + 2)
    return samples * per_sample + 16 * a["num_tasks"] * a["input_dim"]


_ESTIMATES: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, int]], int]]] = {
    "multidigits": (("n_train", "n_val", "n_test", "shift"), _multidigits_bytes),
    "attributes": (
        ("n_train", "n_val", "n_test", "input_dim", "num_attributes", "num_latents"),
        _attributes_bytes,
    ),
    "mmoe_synthetic": (
        ("n_train", "n_val", "n_test", "input_dim", "num_tasks", "num_sines"),
        _mmoe_synthetic_bytes,
    ),
}


def estimated_bytes(name: str, **args: Any) -> int | None:
    """An upper estimate of the memory (bytes) that building the data set ``name`` with the
    keyword arguments ``args`` takes, computed without building it.

    ``None`` for a data set read from files (its memory is bounded by the files), and when an
    argument the estimate needs is not a non-negative integer (the loader's own check then
    reports it).

    Raises:
        UnknownNameError: if ``name`` is not a registered data set.
    """
    factory = DATASETS.factory(name)
    entry = _ESTIMATES.get(normalize_name(name))
    if entry is None:
        return None
    keys, estimate = entry
    defaults = {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    values = {key: args.get(key, defaults.get(key)) for key in keys}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values.values()):
        return None
    return estimate(values)
