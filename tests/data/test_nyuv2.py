"""NYUv2 in MTAN's .npy layout: loading, augmentation, the dense losses and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dataset_fixtures import write_nyuv2
from torch import nn
from torch.utils.data import DataLoader

from mtlkit.data.benchmarks import DATASETS
from mtlkit.data.dense import depth_loss, normal_loss, segmentation_loss
from mtlkit.errors import ConfigError, DatasetError


@pytest.fixture
def nyu(tmp_path):
    written = write_nyuv2(tmp_path / "nyuv2", n_train=3, n_val=2, size=(12, 16))
    return tmp_path / "nyuv2", written


def test_loads_values_shapes_and_layout(nyu):
    root, written = nyu
    problem = DATASETS.get("nyuv2", root=str(root), augment=False, val_fraction=0.0)
    assert problem.input_shape == (3, 12, 16)
    assert problem.task_outputs == {"segmentation": 13, "depth": 1, "normal": 3}
    assert [t.name for t in problem.tasks] == ["segmentation", "depth", "normal"]
    assert [len(problem.splits[s]) for s in ("train", "val", "test")] == [3, 2, 2]
    image, targets = problem.splits["test"][1]
    w = written["val"][1]
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32
    assert image[:, 4, 5].tolist() == pytest.approx(w["image"][4, 5].tolist())  # HWC -> CHW
    seg = targets["segmentation"]
    assert seg.dtype == torch.int64 and seg.shape == (12, 16)
    assert torch.equal(seg, torch.from_numpy(w["label"]).long())
    assert (seg == -1).any()  # unlabelled pixels stay -1
    assert targets["depth"].shape == (1, 12, 16)
    assert float(targets["depth"][0, 2, 3]) == pytest.approx(w["depth"][2, 3, 0])
    assert targets["normal"].shape == (3, 12, 16)
    assert targets["normal"][:, 7, 9].tolist() == pytest.approx(w["normal"][7, 9].tolist())
    metrics = problem.tasks[2].higher_is_better()
    assert metrics == {
        "mean_angle": False,
        "median_angle": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }


def test_augmentation_scales_depth_and_flips_normals_through_the_loader(tmp_path):
    root = tmp_path / "const"
    write_nyuv2(root, n_train=2, n_val=1, size=(12, 16), constant=(6.0, (0.6, 0.0, 0.8)))
    problem = DATASETS.get("nyuv2", root=str(root), seed=3)
    train = problem.splits["train"]
    depths, xs = set(), set()
    for _ in range(30):
        _, t = train[0]
        depth, x = t["depth"], t["normal"][0]
        assert torch.allclose(depth, depth[0, 0, 0]) and torch.allclose(x, x[0, 0])
        depths.add(round(float(depth[0, 0, 0]), 4))
        xs.add(round(float(x[0, 0]), 4))
    assert depths == {6.0, 5.0, 4.0} and xs == {0.6, -0.6}
    # test and validation data are never augmented
    _, t = problem.splits["test"][0]
    assert float(t["depth"].unique()) == 6.0


def test_augmentation_is_reproducible_with_workers(nyu):
    root, _ = nyu
    problem = DATASETS.get("nyuv2", root=str(root), seed=0)

    def epoch(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(
            problem.splits["train"],
            batch_size=2,
            num_workers=workers,
            generator=torch.Generator().manual_seed(7),
        )
        return [batch[1]["depth"] for batch in loader]

    first, second = epoch(2), epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_val_fraction_holds_out_part_of_train(nyu):
    root, written = nyu
    problem = DATASETS.get("nyuv2", root=str(root), augment=False, val_fraction=0.34)
    train, val = problem.splits["train"], problem.splits["val"]
    assert len(train) == 2 and len(val) == 1
    assert not set(train.indices) & set(val.indices)
    _, t = val[0]
    expected = written["train"][val.indices[0]]["label"]
    assert torch.equal(t["segmentation"], torch.from_numpy(expected).long())
    again = DATASETS.get("nyuv2", root=str(root), augment=False, val_fraction=0.34)
    assert again.splits["val"].indices == val.indices
    with pytest.raises(ConfigError, match="val_fraction"):
        DATASETS.get("nyuv2", root=str(root), val_fraction=1.0)


def test_resize_option(nyu):
    root, _ = nyu
    problem = DATASETS.get("nyuv2", root=str(root), augment=False, size=[6, 8])
    image, t = problem.splits["train"][0]
    assert problem.input_shape == (3, 6, 8)
    assert image.shape == (3, 6, 8) and t["segmentation"].shape == (6, 8)


def test_missing_and_malformed_roots_show_the_layout(tmp_path, nyu):
    with pytest.raises(DatasetError) as error:
        DATASETS.get("nyuv2", root=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert "does not exist" in message and "expected layout" in message
    assert "train/" in message and "normal/0.npy" in message and "-1 = unlabelled" in message
    root, _ = nyu
    (root / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(DatasetError, match=r"depth.*missing 1\.npy"):
        DATASETS.get("nyuv2", root=str(root))


def test_malformed_files_are_named(nyu):
    root, _ = nyu
    np.save(root / "train" / "normal" / "0.npy", np.zeros((12, 16, 2)))
    with pytest.raises(DatasetError, match=r"normal/0\.npy.*expected a real \[H, W, 3\]"):
        DATASETS.get("nyuv2", root=str(root))
    np.save(root / "train" / "normal" / "0.npy", np.zeros((12, 16, 3)))
    np.save(root / "train" / "label" / "2.npy", np.full((12, 16), 13.0))
    problem = DATASETS.get("nyuv2", root=str(root), val_fraction=0.0)
    with pytest.raises(DatasetError, match=r"label/2\.npy.*labels from 13 to 13"):
        problem.splits["train"][2]
    np.save(root / "train" / "label" / "2.npy", np.full((12, 16), 0.5))
    with pytest.raises(DatasetError, match="integers"):
        problem.splits["train"][2]
    (root / "train" / "image" / "1.npy").write_bytes(b"not numpy")
    with pytest.raises(DatasetError, match=r"cannot read .*image/1\.npy"):
        problem.splits["train"][1]


def test_dense_losses_mask_as_mtan():
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0, 0] = -1
    keep = labels != -1
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], labels[keep])
    assert segmentation_loss(logits, labels) == pytest.approx(float(expected), rel=1e-6)
    assert segmentation_loss(logits, torch.full((2, 3, 3), -1)).item() == 0.0  # not NaN
    pred = torch.tensor([[[[1.0, 5.0], [2.0, 0.0]]]])
    true = torch.tensor([[[[2.0, 0.0], [2.5, 0.0]]]])
    assert depth_loss(pred, true).item() == pytest.approx((1.0 + 0.5) / 2)
    normal_true = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 3)
    normal_true[..., 2] = 0.0  # invalid
    normal_pred = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).T
    normal_pred = normal_pred.reshape(1, 3, 1, 3)
    # cosines 1 and 1/sqrt(2) on the two valid pixels (the prediction is normalised)
    expected_normal = 1 - (1 + 1 / math.sqrt(2)) / 2
    assert normal_loss(normal_pred, normal_true).item() == pytest.approx(expected_normal)


class TinyDense(nn.Module):
    """A 3x3 conv and a 1x1 conv head per task: enough to run the tasks end to end."""

    def __init__(self, task_outputs: dict[str, int]) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Conv2d(8, n, 1) for t, n in task_outputs.items()})

    def forward(self, x):
        z = self.body(x)
        return {t: head(z) for t, head in self.heads.items()}


def test_one_step_and_metrics_on_the_fixture(nyu):
    root, _ = nyu
    problem = DATASETS.get("nyuv2", root=str(root))
    torch.manual_seed(0)
    model = TinyDense(problem.task_outputs)
    x, y = next(iter(DataLoader(problem.splits["train"], batch_size=3)))
    out = model(x)
    losses = {t.name: t.loss(out[t.name], y[t.name]) for t in problem.tasks}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    metrics = {t.name: t.new_metrics() for t in problem.tasks}
    for x, y in DataLoader(problem.splits["test"], batch_size=1):
        out = model(x)
        for task, ms in metrics.items():
            for m in ms.values():
                m.update(out[task], y[task])
    values = {t: {n: m.compute() for n, m in ms.items()} for t, ms in metrics.items()}
    assert 0 <= values["segmentation"]["miou"] <= 1
    assert 0 <= values["normal"]["within_30"] <= 1
    assert values["depth"]["abs_err"] > 0


def test_cli_reports_a_missing_root_in_one_error_with_the_layout(tmp_path, capsys):
    from mtlkit.app.cli import main

    code = main(
        ["train", "--data", "nyuv2", f"data_args.root={tmp_path / 'nope'}", "--no-progress"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("mtlkit: error: nyuv2: root") and "Traceback" not in err
    assert "expected layout:" in err and "depth/0.npy" in err
