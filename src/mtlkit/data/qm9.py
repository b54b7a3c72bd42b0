"""QM9: 11 molecular properties, one regression task each, from the original ``.xyz`` files.

Ramakrishnan et al., "Quantum chemistry structures and properties of 134 kilo molecules"
(Scientific Data 2014). The release is one ``.xyz`` file per molecule (``dsgdb9nsd_000001.xyz``
...; the folder, or the ``dsgdb9nsd.xyz.tar.bz2`` archive it comes in, see :data:`LAYOUT`)::

    line 1        the number of atoms n
    line 2        "gdb <index>" and 15 properties: A B C (GHz), mu (D), alpha (a0^3),
                  homo lumo gap (Ha), r2 (a0^2), zpve U0 U H G (Ha), Cv (cal/mol K)
    n lines       element, x, y, z (Angstrom), Mulliken charge (e)
    then          the harmonic frequencies, the SMILES (GDB-17, relaxed), the InChI (both)

Numbers may be written Mathematica-style, ``1.2*^-6`` for ``1.2e-6``; both forms are read.
Molecules listed in ``uncharacterized.txt`` (3054 that failed the release's consistency check;
read when present, first integer of each line = the gdb index) are left out, as PyTorch
Geometric does, which leaves 130831.

Tasks (:data:`TARGETS`), as in LibMTL and Nash-MTL (PyTorch Geometric's targets 0, 1, 2, 3, 5, 6,
12, 13, 14, 15, 11): ``mu`` (D), ``alpha`` (a0^3), ``homo``, ``lumo`` (meV), ``r2`` (a0^2),
``zpve`` (meV), ``U0``, ``U``, ``H``, ``G`` (meV; *atomization* energies: the molecule's energy
minus that of its free atoms, from the release's ``atomref`` table; ``energies="total"`` keeps the
total energies), ``Cv`` (cal/mol K). Energies are in meV (1 Ha = 27211.386246 meV), the unit of
the MAE tables of Nash-MTL and LibMTL. The data set holds the targets in these units; the loss is
the MSE on targets normalised with the mean and standard deviation of the *training* split (so a
head outputs normalised values), and the metric ``mae`` converts the output back and reports the
mean absolute error in the units above (lower is better).

Split (seeded, like LibMTL's ``random_split``): a permutation of the molecules; the first
``n_test`` (10000) are the test split, the next ``n_val`` (10000) the validation split, and the
rest (110831 with the uncharacterized left out) the training split, or its first ``n_train``.

Inputs are padded tensors, so that the default collate works and no graph library is needed:
float32 ``[29, 4]`` (29 = the largest QM9 molecule), row ``i`` = (atomic number, x, y, z) of atom
``i``, rows of zeros after the last atom. The ``mpnn`` architecture
(:mod:`mtlkit.architectures.mpnn`) builds the graph from the coordinates.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.data.files import dataset_error, resolve_root
from mtlkit.errors import ConfigError, DatasetError, MtlkitError
from mtlkit.metrics import Metric
from mtlkit.tasks import Task

__all__ = [
    "ATOMREF",
    "ELEMENTS",
    "LAYOUT",
    "MAX_ATOMS",
    "PROPERTIES",
    "QM9",
    "TARGETS",
    "Molecules",
    "NormalizedMAE",
    "NormalizedMSE",
    "parse_xyz",
    "qm9",
    "qm9_tasks",
    "read_molecules",
]

_DATASET = "qm9"
MAX_ATOMS = 29
HARTREE_TO_MEV = 27211.386246
"""1 Hartree in meV (CODATA 2018, the constant PyTorch Geometric uses)."""

ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
PROPERTIES = (
    "A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv",
)  # fmt: skip
"""The 15 properties of line 2, in order."""
TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
"""The 11 targets of the MTL literature, in LibMTL's order of tasks."""
_ENERGIES = ("U0", "U", "H", "G")
_IN_MEV = ("homo", "lumo", "zpve", *_ENERGIES)

ATOMREF = {
    "U0": {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730},
    "U": {1: -0.498857, 6: -37.845355, 7: -54.582445, 8: -75.063163, 9: -99.717314},
    "H": {1: -0.497912, 6: -37.844411, 7: -54.581501, 8: -75.062219, 9: -99.716370},
    "G": {1: -0.510927, 6: -37.861317, 7: -54.598897, 8: -75.079532, 9: -99.733544},
}
"""The energies (Ha) of the free atoms, by atomic number: the release's ``atomref`` table."""

LAYOUT = """
<root>/                       the QM9 release (Ramakrishnan et al. 2014), either
  dsgdb9nsd_000001.xyz ...    133885 files (or in a subfolder, e.g. dsgdb9nsd.xyz/), or
  dsgdb9nsd.xyz.tar.bz2       the archive they come in
  uncharacterized.txt         optional: the 3054 molecules to leave out
each .xyz file:
  line 1                      number of atoms n (at most 29)
  line 2                      gdb <index> A B C mu alpha homo lumo gap r2 zpve U0 U H G Cv
  n lines                     <element H|C|N|O|F> x y z <Mulliken charge>  ('*^' = 'e')
  3 more lines                frequencies, SMILES, InChI
"""

Energies = Literal["atomization", "total"]


def _number(token: str) -> float:
    return float(token.replace("*^", "e"))


def parse_xyz(text: str, name: str = "<xyz>") -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Parse one QM9 ``.xyz`` file: ``(gdb index, atomic numbers int64 [n], positions float64
    [n, 3], the 15 properties float64 [15])``.

    Raises:
        DatasetError: naming the file and line, if the text is not in the QM9 format or a
            property or coordinate is NaN or infinite (naming the molecule too).
    """
    lines = text.splitlines()

    def fail(line: int, problem: str) -> DatasetError:
        return dataset_error(_DATASET, f"{name} line {line}: {problem}", LAYOUT)

    if not lines or not lines[0].strip().isdigit():
        raise fail(1, "expected the number of atoms")
    n = int(lines[0])
    if not 1 <= n <= MAX_ATOMS:
        raise fail(1, f"{n} atoms, expected 1..{MAX_ATOMS}")
    if len(lines) < n + 2:
        raise fail(len(lines), f"the file ends before the {n} atom lines")
    head = lines[1].split()
    if len(head) < 2 + len(PROPERTIES) or head[0] != "gdb" or not head[1].isdigit():
        raise fail(2, f"expected 'gdb <index>' and {len(PROPERTIES)} properties")
    try:
        properties = np.array([_number(t) for t in head[2 : 2 + len(PROPERTIES)]])
    except ValueError as error:
        raise fail(2, f"bad number: {error}") from None
    bad = np.flatnonzero(~np.isfinite(properties))
    if bad.size:
        k = int(bad[0])
        raise fail(2, f"molecule gdb {head[1]}: property {PROPERTIES[k]} is {properties[k]}")
    numbers = np.empty(n, dtype=np.int64)
    positions = np.empty((n, 3), dtype=np.float64)
    for i in range(n):
        parts = lines[2 + i].split()
        if len(parts) < 4 or parts[0] not in ELEMENTS:
            raise fail(3 + i, f"expected '<H|C|N|O|F> x y z charge', got {lines[2 + i]!r}")
        numbers[i] = ELEMENTS[parts[0]]
        try:
            positions[i] = [_number(t) for t in parts[1:4]]
        except ValueError as error:
            raise fail(3 + i, f"bad number: {error}") from None
        if not np.isfinite(positions[i]).all():
            raise fail(3 + i, f"molecule gdb {head[1]}: coordinates {positions[i].tolist()}")
    return int(head[1]), numbers, positions, properties


class Molecules:
    """All parsed molecules, sorted by gdb index (numpy arrays).

    Attributes:
        index: int64 ``[M]``, the gdb indices.
        numbers: int8 ``[M, 29]``, atomic numbers, 0 after the last atom.
        positions: float32 ``[M, 29, 3]``, Angstrom, 0 after the last atom.
        properties: float64 ``[M, 15]``, line 2's properties in the release's units.
    """

    def __init__(
        self,
        index: np.ndarray,
        numbers: np.ndarray,
        positions: np.ndarray,
        properties: np.ndarray,
    ) -> None:
        order = np.argsort(index, kind="stable")
        self.index = index[order]
        self.numbers = numbers[order]
        self.positions = positions[order]
        self.properties = properties[order]

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def subset(self, keep: np.ndarray) -> Molecules:
        return Molecules(
            self.index[keep], self.numbers[keep], self.positions[keep], self.properties[keep]
        )

    def targets(self, energies: Energies = "atomization") -> np.ndarray:
        """float64 ``[M, 11]``, the :data:`TARGETS` in the units of the module docstring."""
        columns = []
        for name in TARGETS:
            value = self.properties[:, PROPERTIES.index(name)].copy()
            if name in _ENERGIES and energies == "atomization":
                reference = np.zeros(10)
                for z, energy in ATOMREF[name].items():
                    reference[z] = energy
                value -= reference[self.numbers.astype(np.int64)].sum(axis=1)
            if name in _IN_MEV:
                value *= HARTREE_TO_MEV
            columns.append(value)
        return np.stack(columns, axis=1)


def _read_text(path: str) -> str:
    """The text of one ``.xyz`` file (ASCII in the release).

    Raises:
        DatasetError: naming the file, if it cannot be read or is not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise dataset_error(_DATASET, f"cannot read {path!r}: {error}", LAYOUT) from None
    return _decode(raw, repr(path))


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise dataset_error(
            _DATASET,
            f"{name} is not UTF-8 text: byte {raw[error.start]:#04x} at offset {error.start}",
            LAYOUT,
        ) from None


def _unpack(archive: Path) -> Iterator[tuple[str, str]]:
    """``(archive:member, text)`` of each ``.xyz`` member of a tar archive.

    Raises:
        DatasetError: naming the archive if it is truncated or corrupt, or the member if it is
            not UTF-8.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".xyz"):
                    handle = tar.extractfile(member)
                    if handle is None:
                        raise tarfile.ReadError(f"member {member.name!r} has no data")
                    name = f"{archive.name}:{member.name}"
                    yield name, _decode(handle.read(), repr(name))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise dataset_error(
            _DATASET,
            f"cannot read the archive {str(archive)!r} ({type(error).__name__}: {error}); "
            "it is truncated or corrupt: download it again",
            LAYOUT,
        ) from None


def _sources(root: Path) -> tuple[str, Iterator[tuple[str, str]]] | None:
    """The xyz files under ``root`` (or its subfolders, one level) or in an archive there:
    ``(cache key, iterator of (name, text))``, or ``None`` if there are none."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        files = sorted(e.path for e in os.scandir(folder) if e.name.endswith(".xyz"))
        if files:
            key = f"dir:{folder.resolve()}:{len(files)}"
            return key, ((path, _read_text(path)) for path in files)
    archives = sorted(p for p in root.iterdir() if p.name.endswith((".tar.bz2", ".tar.gz", ".tar")))
    if archives:
        archive = archives[0]
        stat = archive.stat()
        key = f"tar:{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return key, _unpack(archive)
    return None


_CACHED = {
    "index": (np.int64, ()),
    "numbers": (np.int8, (MAX_ATOMS,)),
    "positions": (np.float32, (MAX_ATOMS, 3)),
    "properties": (np.float64, (len(PROPERTIES),)),
}
"""The arrays of a cache file: ``{name: (dtype, shape after the molecule axis)}``."""


def _cache_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with the arrays read from a cache file, or ``None``."""
    count = len(arrays["index"])
    for name, (dtype, shape) in _CACHED.items():
        array = arrays[name]
        if array.dtype != dtype or array.shape != (count, *shape):
            return f"{name} is {array.dtype} {list(array.shape)}"
    if count == 0 or len(np.unique(arrays["index"])) != count:
        return "the gdb indices are empty or repeated"
    if not (np.isfinite(arrays["positions"]).all() and np.isfinite(arrays["properties"]).all()):
        return "it holds NaN or infinite values"
    if not np.isin(arrays["numbers"], [0, *ELEMENTS.values()]).all():
        return "it holds unknown atomic numbers"
    return None


def load_cache(path: Path) -> Molecules | None:
    """The molecules of a cache file written by :func:`read_molecules`, or ``None`` if the file
    is truncated or corrupt (a warning names it; the caller rebuilds it).

    The arrays are read whole, so zip's CRC-32 of each array is checked, and then validated
    (dtypes, shapes, unique indices, finite values, known elements).

    Raises:
        DatasetError: if the file exists but cannot be read at all (e.g. no permission).
    """
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in _CACHED}
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError) as error:
        problem: str | None = f"{type(error).__name__}: {error}"
    except OSError as error:
        raise dataset_error(
            _DATASET, f"cannot read the cache {str(path)!r}: {error}", LAYOUT
        ) from None
    else:
        problem = _cache_problem(arrays)
        if problem is None:
            return Molecules(**arrays)
    warnings.warn(
        f"qm9: the cache {str(path)!r} is truncated or corrupt ({problem}); rebuilding it from "
        "the source files",
        stacklevel=3,
    )
    return None


def write_cache(path: Path, molecules: Molecules) -> None:
    """Save ``molecules`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over ``path`` (so a crash never leaves a partial cache there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, before the rename)
        dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            np.savez(handle, **{name: getattr(molecules, name) for name in _CACHED})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def read_molecules(root: str | Path, cache_dir: str | None = None) -> Molecules:
    """Parse every ``.xyz`` file of the QM9 release under ``root`` (see :data:`LAYOUT`).

    Args:
        root: the folder with the ``.xyz`` files, a subfolder of them, or the archive.
        cache_dir: if given, the parsed arrays are saved there (``qm9-<key>.npz``, about 20 MB)
            and loaded on later calls with the same source (the key hashes the folder and its
            file count, or the archive's size and time); ``None`` parses every time (about a
            minute for the whole release on one core). A truncated or corrupt cache file is
            rebuilt from the source, with a warning naming it (:func:`load_cache`).

    Raises:
        DatasetError: if there is no ``.xyz`` file, or one is malformed, not UTF-8 or holds a
            NaN or infinite number, or the archive is corrupt (naming the file or member).
    """
    base = resolve_root(_DATASET, root, LAYOUT)
    found = _sources(base)
    if found is None:
        raise dataset_error(_DATASET, f"no .xyz files or .tar.bz2 archive in {str(base)!r}", LAYOUT)
    key, texts = found
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        cache = Path(cache_dir).expanduser() / f"qm9-{digest}.npz"
        if cache.is_file():
            cached = load_cache(cache)
            if cached is not None:
                return cached
    indices, numbers, positions, properties = [], [], [], []
    for name, text in texts:
        index, z, pos, props = parse_xyz(text, name)
        padded_z = np.zeros(MAX_ATOMS, dtype=np.int8)
        padded_z[: len(z)] = z
        padded_pos = np.zeros((MAX_ATOMS, 3), dtype=np.float32)
        with np.errstate(over="ignore"):
            padded_pos[: len(z)] = pos
        if not np.isfinite(padded_pos).all():
            raise dataset_error(
                _DATASET, f"{name}: molecule gdb {index}: a coordinate exceeds float32", LAYOUT
            )
        indices.append(index)
        numbers.append(padded_z)
        positions.append(padded_pos)
        properties.append(props)
    if not indices:
        raise dataset_error(_DATASET, f"no .xyz file found in the source {key!r}", LAYOUT)
    molecules = Molecules(
        np.array(indices, dtype=np.int64),
        np.stack(numbers),
        np.stack(positions),
        np.stack(properties),
    )
    if len(np.unique(molecules.index)) != len(molecules):
        raise dataset_error(_DATASET, "two .xyz files have the same gdb index", LAYOUT)
    if cache is not None:
        write_cache(cache, molecules)
    return molecules


def read_uncharacterized(path: Path) -> set[int]:
    """The gdb indices listed in ``uncharacterized.txt`` (the first integer of each data line;
    lines that do not start with an integer followed by more fields are headers)."""
    indices: set[int] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            indices.add(int(parts[0]))
    return indices


def _check_float32(targets: np.ndarray, index: np.ndarray) -> None:
    """Raise a DatasetError naming the molecule and target if a target is not finite in
    float32 (the dtype of the data set's targets)."""
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~np.isfinite(targets.astype(np.float32))
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise dataset_error(
            _DATASET,
            f"molecule gdb {int(index[row])}: target {TARGETS[column]} = {targets[row, column]} "
            "is not a finite float32 number",
            LAYOUT,
        )


class QM9(Dataset):
    """One split: ``(x float32 [29, 4], {target: float32 [1]})`` items (see the module
    docstring); the targets are in physical units, not normalised.

    Attributes:
        inputs: float32 ``[N, 29, 4]``.
        targets: float32 ``[N, 11]``.
        index: the gdb indices of the molecules.
    """

    def __init__(self, molecules: Molecules, targets: np.ndarray, split: str = "") -> None:
        z = torch.from_numpy(molecules.numbers.astype(np.float32)).unsqueeze(-1)
        self.inputs = torch.cat([z, torch.from_numpy(molecules.positions)], dim=-1).contiguous()
        self.targets = torch.from_numpy(targets.astype(np.float32))
        self.index = torch.from_numpy(molecules.index)
        self.split = split

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        row = self.targets[i]
        return self.inputs[i], {name: row[t : t + 1] for t, name in enumerate(TARGETS)}

    def __repr__(self) -> str:
        return f"QM9(split={self.split!r}, n={len(self)})"


class NormalizedMSE:
    """MSE between a normalised output and the normalised target ``(y - mean) / std``."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        if output.shape != target.shape:
            raise MtlkitError(
                f"NormalizedMSE: output {tuple(output.shape)} != target {tuple(target.shape)}"
            )
        return F.mse_loss(output, (target.to(output.dtype) - self.mean) / self.std)

    def __repr__(self) -> str:
        return f"NormalizedMSE(mean={self.mean:.6g}, std={self.std:.6g})"


class NormalizedMAE(Metric):
    """MAE of ``mean + std * output`` against the target, in the target's units."""

    higher_is_better = False

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)
        super().__init__()

    def update(self, output: Tensor, target: Tensor) -> None:
        if output.shape != target.shape:
            raise MtlkitError(
                f"NormalizedMAE: output {tuple(output.shape)} != target {tuple(target.shape)}"
            )
        value = self.mean + self.std * output.detach().double()
        self.total += float((value - target.double()).abs().sum())
        self.count += target.numel()

    def __repr__(self) -> str:
        return f"NormalizedMAE(mean={self.mean:.6g}, std={self.std:.6g})"


def qm9_tasks(mean: Sequence[float], std: Sequence[float]) -> list[Task]:
    """The 11 tasks of :data:`TARGETS`, normalised with the given training statistics."""
    return [
        Task(name, NormalizedMSE(m, s), {"mae": functools.partial(NormalizedMAE, m, s)})
        for name, m, s in zip(TARGETS, mean, std, strict=True)
    ]


def qm9(
    root: str,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int = 10000,
    n_test: int = 10000,
    energies: Energies = "atomization",
    exclude_uncharacterized: bool = True,
    cache_dir: str | None = None,
) -> tuple[dict[str, QM9], np.ndarray, np.ndarray]:
    """The QM9 splits and the training mean and std of the targets (float64 ``[11]`` each).

    Args:
        root: the folder of :data:`LAYOUT`.
        seed: seed of the split.
        n_train: training molecules (``None``: all the rest).
        n_val, n_test: validation and test molecules.
        energies: ``"atomization"`` (the literature's targets) or ``"total"``.
        exclude_uncharacterized: leave out the molecules of ``uncharacterized.txt`` if present.
        cache_dir: where to cache the parsed files (see :func:`read_molecules`).

    Raises:
        DatasetError: if the root is missing or malformed (the message shows :data:`LAYOUT`).
        ConfigError: on a bad option, or more molecules asked for than there are.
    """
    if energies not in ("atomization", "total"):
        raise ConfigError(f"energies must be 'atomization' or 'total', got {energies!r}")
    for name, value in (("n_val", n_val), ("n_test", n_test), ("n_train", n_train)):
        if value is None and name == "n_train":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    base = resolve_root(_DATASET, root, LAYOUT)
    molecules = read_molecules(base, cache_dir)
    listed = base / "uncharacterized.txt"
    if exclude_uncharacterized and listed.is_file():
        skip = read_uncharacterized(listed)
        molecules = molecules.subset(~np.isin(molecules.index, sorted(skip)))
    total = len(molecules)
    rest = total - n_val - n_test
    if rest < 1 or (n_train is not None and n_train > rest):
        raise ConfigError(
            f"qm9: {total} molecules, cannot take n_test={n_test}, n_val={n_val} and "
            f"n_train={n_train if n_train is not None else 'the rest'}"
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=gen).numpy()
    parts = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :][: n_train if n_train is not None else rest],
    }
    targets = molecules.targets(energies)
    _check_float32(targets, molecules.index)
    train_targets = targets[parts["train"]]
    mean = train_targets.mean(axis=0)
    std = train_targets.std(axis=0) if len(train_targets) > 1 else np.ones(len(TARGETS))
    std = np.where(std > 0, std, 1.0)
    splits = {
        split: QM9(molecules.subset(np.sort(rows)), targets[np.sort(rows)], split=split)
        for split, rows in (
            ("train", parts["train"]),
            ("val", parts["val"]),
            ("test", parts["test"]),
        )
    }
    return splits, mean, std
