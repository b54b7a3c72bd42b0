"""Data faults caught at load (issue 27, item 8): damaged or malformed data files give one
:class:`DatasetError` naming the file (and the row, molecule or pixel), a damaged cache heals
itself, and no NaN or infinite value reaches a loss.

The data sets are generated in their real on-disk formats by ``tests/data/dataset_fixtures.py``.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from dataset_fixtures import (
    METHANE,
    add_tar_member,
    flip_byte,
    truncate_file,
    write_cityscapes,
    write_nyuv2,
    write_office,
    write_qm9,
    write_qm9_archive,
)

from mtlkit.data import qm9 as qm9_module
from mtlkit.data.benchmarks import DATASETS
from mtlkit.data.qm9 import read_molecules
from mtlkit.data.synthetic import mmoe_synthetic
from mtlkit.errors import ConfigError, DatasetError

# --- QM9 -----------------------------------------------------------------------------------------


@pytest.fixture
def xyz_dir(tmp_path: Path) -> Path:
    write_qm9(tmp_path / "xyz", n=12)
    return tmp_path / "xyz"


@pytest.fixture
def archive_root(tmp_path: Path, xyz_dir: Path) -> Path:
    write_qm9_archive(tmp_path / "release" / "dsgdb9nsd.xyz.tar.bz2", xyz_dir)
    return tmp_path / "release"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped"])
def test_qm9_corrupt_archive_is_named(archive_root: Path, damage: str):
    archive = archive_root / "dsgdb9nsd.xyz.tar.bz2"
    if damage == "truncated":
        truncate_file(archive, 0.6)  # an interrupted download
    elif damage == "garbage":
        archive.write_bytes(b"<html>404 not found</html>" * 20)
    else:
        flip_byte(archive, len(archive.read_bytes()) // 2)
    with pytest.raises(DatasetError) as error:
        read_molecules(archive_root)
    message = str(error.value)
    assert f"cannot read the archive {str(archive)!r}" in message
    assert "truncated or corrupt" in message


def test_qm9_non_utf8_member_and_file_are_named(archive_root: Path, xyz_dir: Path):
    archive = archive_root / "dsgdb9nsd.xyz.tar.bz2"
    latin1 = METHANE.replace("gdb 1", "gdb 99").replace("InChI", "InChI\xe9").encode("latin-1")
    add_tar_member(archive, "dsgdb9nsd_000099.xyz", latin1)
    offset = latin1.index(b"\xe9")
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"'dsgdb9nsd.xyz.tar.bz2:dsgdb9nsd_000099.xyz' is not UTF-8 text: byte 0xe9 at "
            f"offset {offset}"
        ),
    ):
        read_molecules(archive_root)
    bad = xyz_dir / "dsgdb9nsd_000099.xyz"
    bad.write_bytes(latin1)
    with pytest.raises(DatasetError, match=re.escape(f"{str(bad)!r} is not UTF-8 text")):
        read_molecules(xyz_dir)


def _replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("value", "shown"), [("nan", "nan"), ("inf", "inf"), ("-Infinity", "-inf")]
)
def test_qm9_non_finite_property_is_named_with_file_and_molecule(xyz_dir: Path, value, shown):
    methane = xyz_dir / "dsgdb9nsd_000001.xyz"
    _replace_in(methane, "13.21", value)  # alpha, the 5th property
    with pytest.raises(DatasetError) as error:
        DATASETS.get("qm9", root=str(xyz_dir), n_val=2, n_test=2)
    first_line = str(error.value).splitlines()[0]
    assert first_line == f"qm9: {methane} line 2: molecule gdb 1: property alpha is {shown}"


def test_qm9_non_finite_coordinate_is_named(xyz_dir: Path):
    methane = xyz_dir / "dsgdb9nsd_000001.xyz"
    _replace_in(methane, "1.4637511618", "nan")  # y of the third atom, line 5
    with pytest.raises(DatasetError, match=r"000001\.xyz line 5: molecule gdb 1: coordinates"):
        read_molecules(xyz_dir)


def test_qm9_target_beyond_float32_is_named(xyz_dir: Path):
    _replace_in(xyz_dir / "dsgdb9nsd_000001.xyz", "35.3641", "1e39")  # r2, finite in float64
    with pytest.raises(DatasetError, match=r"molecule gdb 1: target r2 = 1e\+39 is not a finite"):
        DATASETS.get("qm9", root=str(xyz_dir), n_val=2, n_test=2)


def _cache_file(cache_dir: Path) -> Path:
    (cache,) = cache_dir.glob("qm9-*.npz")
    return cache


def _write_wrong_arrays(cache: Path) -> None:
    with np.load(cache) as saved:
        arrays = dict(saved)
    arrays["positions"] = arrays["positions"][:, :5]  # a cache of some other layout
    np.savez(cache, **arrays)


def _write_nan_property(cache: Path) -> None:
    with np.load(cache) as saved:
        arrays = dict(saved)
    arrays["properties"][3, 4] = np.nan
    np.savez(cache, **arrays)


DAMAGES = {
    "truncated": lambda cache: truncate_file(cache, 0.5),
    "empty": lambda cache: cache.write_bytes(b""),
    "flipped byte in the data": lambda cache: flip_byte(cache, len(cache.read_bytes()) // 2),
    "not a zip": lambda cache: cache.write_bytes(b"not an npz file at all"),
    "wrong arrays": _write_wrong_arrays,
    "NaN": _write_nan_property,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_qm9_damaged_cache_is_rebuilt_with_a_warning(
    archive_root: Path, tmp_path: Path, damage: str, monkeypatch
):
    cache_dir = tmp_path / "cache"
    first = read_molecules(archive_root, str(cache_dir))
    cache = _cache_file(cache_dir)
    good = cache.read_bytes()
    DAMAGES[damage](cache)
    assert cache.read_bytes() != good
    with pytest.warns(UserWarning, match=re.escape(f"qm9: the cache {str(cache)!r} is truncated")):
        healed = read_molecules(archive_root, str(cache_dir))
    for name in ("index", "numbers", "positions", "properties"):
        assert np.array_equal(getattr(healed, name), getattr(first, name))
    assert cache.read_bytes() == good  # rewritten whole
    assert sorted(p.name for p in cache_dir.iterdir()) == [cache.name]  # no temporary left

    def parse_again(*args, **kwargs):
        raise AssertionError("parsed again: the rebuilt cache was not used")

    monkeypatch.setattr(qm9_module, "parse_xyz", parse_again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning any more
        again = read_molecules(archive_root, str(cache_dir))
    assert np.array_equal(again.properties, first.properties)


def test_qm9_cache_write_is_atomic(archive_root: Path, tmp_path: Path, monkeypatch):
    cache_dir = tmp_path / "cache"
    read_molecules(archive_root, str(cache_dir))
    cache = _cache_file(cache_dir)
    good = cache.read_bytes()
    cache.unlink()

    def full_disk(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qm9_module.np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        read_molecules(archive_root, str(cache_dir))
    assert list(cache_dir.iterdir()) == []  # neither a partial cache nor a temporary file
    monkeypatch.undo()
    read_molecules(archive_root, str(cache_dir))
    assert cache.read_bytes() == good


# --- NYUv2 and Cityscapes (MTAN's .npy layout) ----------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "value", "hint"),
    [
        ("depth", np.nan, "invalid depth is 0 in this layout, not NaN"),
        ("depth", np.inf, "invalid depth is 0 in this layout, not NaN"),
        ("depth", 1e39, "invalid depth is 0"),  # finite in float64, infinite in float32
        ("normal", np.nan, "an invalid normal is the zero vector"),
        ("image", -np.inf, "column 7"),
    ],
)
def test_nyuv2_non_finite_values_are_refused_at_load(tmp_path: Path, folder, value, hint):
    root = tmp_path / "nyuv2"
    write_nyuv2(root, n_train=3, n_val=2, size=(12, 16))
    path = root / "train" / folder / "0.npy"  # sample 0 is read when the data set is built
    array = np.load(path)
    array[4, 7] = value
    array[9, 2] = value
    np.save(path, array)
    with pytest.raises(DatasetError) as error:
        DATASETS.get("nyuv2", root=str(root), augment=False, val_fraction=0.0)
    message = str(error.value)
    assert message.startswith(f"nyuv2: {str(path)!r}: ")
    assert "NaN or infinite value(s), the first at row 4, column 7" in message and hint in message
    count = 2 * array.shape[-1] if folder != "depth" else 2
    assert f": {count} NaN or infinite" in message


def test_nyuv2_non_finite_depth_of_a_later_sample_is_refused_when_read(tmp_path: Path):
    root = tmp_path / "nyuv2"
    written = write_nyuv2(root, n_train=3, n_val=2, size=(12, 16))
    path = root / "val" / "depth" / "1.npy"
    depth = written["val"][1]["depth"].copy()
    assert (depth == 0).any()  # 0 marks invalid depth, and stays accepted
    depth[0, 0, 0] = np.nan
    np.save(path, depth)
    problem = DATASETS.get("nyuv2", root=str(root), augment=False, val_fraction=0.0)
    _, targets = problem.splits["test"][0]
    assert torch.isfinite(targets["depth"]).all()
    with pytest.raises(DatasetError, match=re.escape(f"{str(path)!r}: 1 NaN or infinite value")):
        problem.splits["test"][1]


def test_cityscapes_non_finite_depth_is_refused(tmp_path: Path):
    root = tmp_path / "cityscapes"
    write_cityscapes(root, n_train=2, n_val=1)
    path = root / "val" / "depth" / "0.npy"
    depth = np.load(path)
    depth[3, 5, 0] = np.nan
    np.save(path, depth)
    with pytest.raises(DatasetError, match=r"the first at row 3, column 5 \(nan\)"):
        DATASETS.get("cityscapes", root=str(root), val_fraction=0.0)


# --- Office --------------------------------------------------------------------------------------


def test_office_empty_class_folder_is_refused(tmp_path: Path):
    root = tmp_path / "office31"
    write_office(root, {"amazon": 5, "dslr": 5, "webcam": 5})
    empty = root / "dslr" / "images" / "bike"
    for image in empty.iterdir():
        image.unlink()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError) as error:
        DATASETS.get("office_31", root=str(root))
    assert f"the class folder {str(empty)!r} holds no image (.jpg, .jpeg, .png, .bmp)" in str(
        error.value
    )


# --- Generated data ------------------------------------------------------------------------------


def test_mmoe_synthetic_targets_beyond_float32_are_refused():
    small = mmoe_synthetic(scale=1e30, n_train=8, n_val=2, n_test=2)
    assert torch.isfinite(small["train"].labels).all()
    with pytest.raises(ConfigError, match=r"scale=1e\+300 and noise=0\.1 give a target beyond"):
        mmoe_synthetic(scale=1e300, n_train=8, n_val=2, n_test=2)
