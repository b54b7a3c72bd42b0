"""Office-31 and Office-Home: domains as tasks, the seeded split written beside the results."""

from __future__ import annotations

import shutil

import pytest
import torch
from dataset_fixtures import write_office

from mtlkit.data.benchmarks import DATASETS
from mtlkit.errors import DatasetError

CLASSES = ("back_pack", "bike", "calculator")


@pytest.fixture
def office31(tmp_path):
    root = tmp_path / "office31"
    written = write_office(root, {"amazon": 10, "dslr": 5, "webcam": 6}, CLASSES)
    return root, written


def read_split(path):
    return [line.rsplit(" ", 1) for line in path.read_text().splitlines()]


def test_stratified_split_written_and_reread(office31, tmp_path):
    root, written = office31
    split_dir = tmp_path / "run"
    problem = DATASETS.get("office_31", root=str(root), split_dir=str(split_dir), image_size=16)
    assert problem.multi_input and [t.name for t in problem.tasks] == ["amazon", "dslr", "webcam"]
    assert problem.task_outputs == {"amazon": 3, "dslr": 3, "webcam": 3}
    assert problem.input_shape == (3, 16, 16)
    # 10 per class -> 6/2/2, 5 -> 3/1/1, 6 -> 4/1/1 (round), per class
    sizes = {t: [len(problem.splits[s][t]) for s in ("train", "val", "test")] for t in written}
    assert sizes == {"amazon": [18, 6, 6], "dslr": [9, 3, 3], "webcam": [12, 3, 3]}
    # LibMTL's data_txt format: "<path relative to root> <label>"; labels = sorted class order
    rows = read_split(split_dir / "amazon_train.txt")
    assert len(rows) == 18
    for path, label in rows:
        assert path.startswith("amazon/images/")
        assert CLASSES[int(label)] == path.split("/")[2]
    every = [
        p for s in ("train", "val", "test") for p, _ in read_split(split_dir / f"dslr_{s}.txt")
    ]
    assert sorted(every) == sorted(p for c in CLASSES for p, _ in written["dslr"][c])
    # re-read: move one image from train to test by hand; the loader follows the files
    moved = rows.pop()
    (split_dir / "amazon_train.txt").write_text("".join(f"{p} {y}\n" for p, y in rows))
    test_rows = [*read_split(split_dir / "amazon_test.txt"), moved]
    (split_dir / "amazon_test.txt").write_text("".join(f"{p} {y}\n" for p, y in test_rows))
    again = DATASETS.get("office_31", root=str(root), split_dir=str(split_dir), seed=5)
    assert len(again.splits["train"]["amazon"]) == 17
    assert again.splits["test"]["amazon"].files[-1] == moved[0]


def test_seeded_split_and_items(office31):
    root, written = office31
    a = DATASETS.get("office_31", root=str(root), seed=1, image_size=8, mean=None, std=None)
    b = DATASETS.get("office_31", root=str(root), seed=1, image_size=8)
    c = DATASETS.get("office_31", root=str(root), seed=2, image_size=8)
    assert a.splits["train"]["amazon"].files == b.splits["train"]["amazon"].files
    assert a.splits["train"]["amazon"].files != c.splits["train"]["amazon"].files
    ds = a.splits["val"]["webcam"]
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and label.dtype == torch.int64
    cls = ds.files[0].split("/")[2]
    assert int(label) == CLASSES.index(cls)
    colour = dict(written["webcam"][cls])[ds.files[0]]
    assert (image - torch.tensor(colour).view(3, 1, 1) / 255).abs().max() < 6 / 255


def test_office_home_with_a_space_in_real_world(tmp_path):
    root = tmp_path / "home"
    domains = {"Art": 5, "Clipart": 5, "Product": 5, "Real World": 5}
    write_office(root, domains, ("Alarm_Clock", "Backpack"), images_subfolder=False)
    problem = DATASETS.get("office-home", root=str(root), split_dir=str(tmp_path / "s"))
    assert [t.name for t in problem.tasks] == ["art", "clipart", "product", "real_world"]
    assert (tmp_path / "s" / "Real_World_test.txt").is_file()
    image, _ = problem.splits["test"]["real_world"][0]
    assert image.shape == (3, 224, 224)


def test_errors_show_the_layout(office31, tmp_path):
    root, _ = office31
    with pytest.raises(DatasetError) as error:
        DATASETS.get("office_31", root=str(tmp_path / "none"))
    assert "amazon/images/<class>/<image>.jpg" in str(error.value)
    split_dir = tmp_path / "run"
    DATASETS.get("office_31", root=str(root), split_dir=str(split_dir))
    (split_dir / "dslr_val.txt").unlink()
    with pytest.raises(DatasetError, match="not the other split files of dslr"):
        DATASETS.get("office_31", root=str(root), split_dir=str(split_dir))
    (split_dir / "dslr_val.txt").write_text("dslr/images/bike/frame_0001.jpg 31\n")
    with pytest.raises(DatasetError, match=r"label 31 not in 0\.\.2"):
        DATASETS.get("office_31", root=str(root), split_dir=str(split_dir))
    (split_dir / "dslr_val.txt").write_text("dslr/images/bike/missing.jpg 1\n")
    with pytest.raises(DatasetError, match="no image"):
        DATASETS.get("office_31", root=str(root), split_dir=str(split_dir))
    (root / "webcam" / "images" / "scissors").mkdir()
    shutil.copy(
        root / "webcam/images/bike/frame_0001.jpg", root / "webcam/images/scissors/a.jpg"
    )  # a class of one domain only (an empty class folder is refused first)
    with pytest.raises(DatasetError, match="different classes"):
        DATASETS.get("office_31", root=str(root))
