"""Writers of small data sets in exactly the on-disk formats of the real benchmarks.

Used by the loader tests (``tests/data/test_<dataset>.py``) and by ``benchmarks/bench_loaders.py``.
Each writer returns what it wrote (arrays, labels) so that tests can compare the loaded values
with the written ones.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# --- MTAN .npy layout (NYUv2, Cityscapes) -------------------------------------------------------


def unit_normals(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random unit normals ``[H, W, 3]`` (float64)."""
    v = rng.normal(size=(*shape, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_nyuv2(
    root: Path,
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (12, 16),
    seed: int = 0,
    constant: tuple[float, tuple[float, float, float]] | None = None,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """MTAN's NYUv2: ``<root>/{train,val}/{image,label,depth,normal}/N.npy``, float64 arrays
    (image ``[H, W, 3]`` in [0, 1], label ``[H, W]`` with -1 and 0..12, depth ``[H, W, 1]`` with
    invalid zeros, normal ``[H, W, 3]`` unit vectors with zero vectors where invalid).

    With ``constant=(depth, normal)`` every pixel has that depth and normal (all valid).
    """
    rng = np.random.default_rng(seed)
    written: dict[str, list[dict[str, np.ndarray]]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        written[split] = []
        for i in range(n):
            image = rng.random((*size, 3))
            label = rng.integers(-1, 13, size=size).astype(np.float64)
            if constant is None:
                depth = rng.uniform(0.5, 10.0, size=(*size, 1))
                depth[rng.random(size) < 0.2] = 0.0
                normal = unit_normals(rng, size)
                normal[rng.random(size) < 0.2] = 0.0
            else:
                depth = np.full((*size, 1), constant[0])
                normal = np.broadcast_to(np.array(constant[1]), (*size, 3)).copy()
            arrays = {"image": image, "label": label, "depth": depth, "normal": normal}
            for folder, array in arrays.items():
                path = root / split / folder
                path.mkdir(parents=True, exist_ok=True)
                np.save(path / f"{i}.npy", array)
            written[split].append(arrays)
    return written


def write_cityscapes(
    root: Path,
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (8, 16),
    seed: int = 0,
    label_folder: str = "label_7",
    with_19: bool = False,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """MTAN's Cityscapes: ``<root>/{train,val}/{image,<label_folder>,depth}/N.npy`` (float64;
    7-class labels -1..6), and ``label_19`` (-1..18) with ``with_19``."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[dict[str, np.ndarray]]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        written[split] = []
        for i in range(n):
            arrays = {
                "image": rng.random((*size, 3)),
                label_folder: rng.integers(-1, 7, size=size).astype(np.float64),
                "depth": np.where(
                    rng.random((*size, 1)) < 0.2, 0.0, rng.uniform(1, 80, (*size, 1))
                ),
            }
            if with_19:
                arrays["label_19"] = rng.integers(-1, 19, size=size).astype(np.float64)
            for folder, array in arrays.items():
                path = root / split / folder
                path.mkdir(parents=True, exist_ok=True)
                np.save(path / f"{i}.npy", array)
            written[split].append(arrays)
    return written


# --- CelebA --------------------------------------------------------------------------------------

CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]


def write_celeba(
    root: Path,
    partition: tuple[int, ...] = (0, 0, 0, 0, 1, 1, 2, 2),
    size: tuple[int, int] = (218, 178),
    seed: int = 0,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The official CelebA files: ``img_align_celeba/00000k.jpg`` (one flat colour each, JPEG,
    ``size = (height, width)``), ``list_attr_celeba.txt`` (count line, names line, then
    ``"000001.jpg -1  1 ..."`` with the release's double spaces before 1) and
    ``list_eval_partition.txt``. Returns (file names, -1/1 values [N, 40], colours [N, 3])."""
    rng = np.random.default_rng(seed)
    n = len(partition)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    values = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    colours = rng.integers(0, 256, size=(n, 3))
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    for name, colour in zip(files, colours):
        image = np.broadcast_to(colour.astype(np.uint8), (*size, 3))
        Image.fromarray(np.ascontiguousarray(image)).save(root / "img_align_celeba" / name)
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES) + " "]
    for name, row in zip(files, values):
        lines.append(name + "".join(f" {v:2d}" for v in row))  # "-1" or " 1"
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{name} {p}\n" for name, p in zip(files, partition))
    )
    return files, values, colours


# --- Office-31 / Office-Home ---------------------------------------------------------------------


def write_office(
    root: Path,
    domains: dict[str, int],
    classes: tuple[str, ...] = ("back_pack", "bike", "calculator"),
    images_subfolder: bool = True,
    size: tuple[int, int] = (30, 40),
    seed: int = 0,
) -> dict[str, dict[str, list[tuple[str, tuple[int, int, int]]]]]:
    """One folder per domain, ``<domain>[/images]/<class>/frame_000k.jpg`` (flat colours),
    ``domains[d]`` images per class. Returns ``{domain: {class: [(relative path, colour)]}}``."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[tuple[str, tuple[int, int, int]]]]] = {}
    for domain, per_class in domains.items():
        out[domain] = {}
        for cls in classes:
            folder = root / domain / ("images" if images_subfolder else "") / cls
            folder.mkdir(parents=True, exist_ok=True)
            out[domain][cls] = []
            for k in range(per_class):
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                path = folder / f"frame_{k + 1:04d}.jpg"
                Image.new("RGB", (size[1], size[0]), colour).save(path)
                out[domain][cls].append((path.relative_to(root).as_posix(), colour))
    return out


# --- MNIST IDX -----------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 2051 (3-d images) or 2049 (1-d labels), big-endian
    dimensions, then the data."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(
    root: Path, n_train: int = 60, n_test: int = 20, gz: bool = False, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four MNIST IDX files (``.gz`` with ``gz``); random 28 x 28 uint8 images (sparse blobs)
    and labels 0..9. Returns ``{"train": (images, labels), "t10k": (...)}``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (rng.random((n, 28, 28)) < 0.2) * rng.integers(1, 256, (n, 28, 28))
        images = images.astype(np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        out[prefix] = (images, labels)
    return out


# --- QM9 .xyz ------------------------------------------------------------------------------------

_METHANE_PROPERTIES = (
    "157.7118 157.70997 157.70699 0. 13.21 -0.3877 0.1171 0.5048 35.3641 0.044749 -40.47893 "
    "-40.476062 -40.475117 -40.498597 6.469"
)
METHANE = "\n".join(
    [
        "5",
        "\t".join(["gdb 1", *_METHANE_PROPERTIES.split()]) + "\t",
        "C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689",
        "H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921",
        "H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922",
        "H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923",
        "H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 0.133923",
        "1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788"
        "\t3151.7078",
        "C\tC\t",
        "InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4",
        "",
    ]
)
"""``dsgdb9nsd_000001.xyz`` of the QM9 release (methane), verbatim."""


def _mathematica(value: float) -> str:
    """A number as the release sometimes writes it: ``1.2345*^-6``."""
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa}*^{int(exponent)}"


def xyz_text(index: int, elements: list[str], positions: np.ndarray, properties: np.ndarray) -> str:
    """One molecule in the QM9 ``.xyz`` format; the first coordinate and every charge are
    written Mathematica-style (``*^``), the rest plainly."""
    head = "\t".join(["gdb", str(index), *(f"{p:.6f}" for p in properties)])
    lines = [str(len(elements)), head + "\t"]
    for k, (element, xyz) in enumerate(zip(elements, positions)):
        x = _mathematica(xyz[0]) if k == 0 else f"{xyz[0]:.10f}"
        charge = _mathematica(0.01 * (k + 1))
        lines.append(f"{element}\t{x}\t{xyz[1]:.10f}\t{xyz[2]:.10f}\t{charge}")
    lines.append("\t".join(f"{100.0 * (k + 1):.4f}" for k in range(3)))
    lines.append("C\tC\t")
    lines.append("InChI=1S/X\tInChI=1S/X")
    return "\n".join(lines) + "\n"


def write_qm9(
    root: Path, n: int = 40, seed: int = 0, methane: bool = True
) -> dict[int, tuple[list[str], np.ndarray, np.ndarray]]:
    """``dsgdb9nsd_NNNNNN.xyz`` files: methane (index 1, verbatim) and random molecules of 2..12
    atoms with random properties. Returns ``{index: (elements, positions, properties)}``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    start = 1
    if methane:
        (root / "dsgdb9nsd_000001.xyz").write_text(METHANE)
        start = 2
    for index in range(start, n + 1):
        k = int(rng.integers(2, 13))
        elements = list(rng.choice(["H", "C", "N", "O", "F"], size=k))
        positions = rng.normal(scale=1.5, size=(k, 3))
        properties = rng.normal(size=15)
        properties[10:14] -= 40.0  # energies in Hartree, about like methane's
        (root / f"dsgdb9nsd_{index:06d}.xyz").write_text(
            xyz_text(index, elements, positions, properties)
        )
        out[index] = (elements, positions, properties)
    return out


def write_qm9_archive(archive: Path, xyz_dir: Path) -> Path:
    """The ``.xyz`` files of ``xyz_dir`` packed as the release ships them, a ``.tar.bz2``
    (``archive``, e.g. ``<root>/dsgdb9nsd.xyz.tar.bz2``); returns ``archive``."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:bz2") as tar:
        for path in sorted(xyz_dir.glob("*.xyz")):
            tar.add(path, arcname=path.name)
    return archive


def add_tar_member(archive: Path, name: str, data: bytes) -> None:
    """Rewrite the ``.tar.bz2`` ``archive`` with one more member ``name`` holding ``data``."""
    with tarfile.open(archive, "r:bz2") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(archive, "w:bz2") as tar:
        for member, content in [*members, (tarfile.TarInfo(name), data)]:
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


# --- Damaged files -------------------------------------------------------------------------------


def truncate_file(path: Path, fraction: float = 0.5) -> None:
    """Cut ``path`` to the first ``fraction`` of its bytes (an interrupted write or download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def flip_byte(path: Path, offset: int) -> None:
    """Invert the bits of the byte at ``offset`` of ``path`` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
