"""Every benchmark loader, end to end: a registered model trains one step and is evaluated
through the Trainer on the generated fixture (the data format meets the model and the tasks)."""

from __future__ import annotations

import pytest
import torch
from dataset_fixtures import (
    write_celeba,
    write_cityscapes,
    write_mnist,
    write_nyuv2,
    write_office,
    write_qm9,
)
from torch.utils.data import DataLoader

from mtlkit import Budget, Joint, Trainer, methods
from mtlkit.architectures import ARCHITECTURES, build
from mtlkit.architectures.backbones import BACKBONES
from mtlkit.data.benchmarks import DATASETS


def fixture_args(name: str, root) -> dict:
    if name == "nyuv2":
        write_nyuv2(root, n_train=2, n_val=2, size=(16, 16))
        return {"root": str(root)}
    if name == "cityscapes_binary":
        write_cityscapes(root, n_train=2, n_val=2, size=(8, 16))
        return {"root": str(root), "tasks": "binary"}
    if name == "celeba":
        write_celeba(root, size=(20, 16))
        return {"root": str(root), "image_size": 8, "attributes": ["Smiling", "Male", "Young"]}
    if name == "office_31":
        write_office(root, {"amazon": 5, "dslr": 3, "webcam": 4}, ("a", "b"))
        return {"root": str(root), "image_size": 8, "split_dir": str(root / "split")}
    if name == "qm9":
        write_qm9(root, n=12)
        return {"root": str(root), "n_val": 2, "n_test": 2}
    if name == "multi_mnist":
        write_mnist(root, n_train=12, n_test=4)
        return {"root": str(root), "val_size": 4}
    return {"n_train": 16, "n_val": 4, "n_test": 4, "input_dim": 8}


CASES = {
    "nyuv2": ("nyuv2", "hps", {"backbone": "segnet", "widths": [4]}),
    "cityscapes_binary": ("cityscapes", "hps", {"backbone": "segnet", "widths": [4]}),
    "celeba": ("celeba", "hps", {"backbone": "cnn", "widths": [4]}),
    "office_31": ("office_31", "hps", {"backbone": "cnn", "widths": [4]}),
    "qm9": ("qm9", "mpnn", {"dim": 8, "edge_hidden": 8}),
    "multi_mnist": ("multi_mnist", "hps", {"backbone": "cnn", "widths": [4]}),
    "mmoe_synthetic": ("mmoe_synthetic", "hps", {"backbone": "mlp", "widths": [8]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_training_step_and_evaluation(case, tmp_path):
    dataset, arch, arch_args = CASES[case]
    if arch_args.get("backbone") == "segnet" and "segnet" not in BACKBONES:
        pytest.skip("the segnet backbone is not available")
    assert arch in ARCHITECTURES
    problem = DATASETS.get(dataset, **fixture_args(case, tmp_path / case))
    torch.manual_seed(0)
    model = build(arch, problem.input_shape, problem.task_outputs, problem.multi_input, **arch_args)

    def loader(data, shuffle=False):
        return DataLoader(data, batch_size=2, shuffle=shuffle)

    if problem.multi_input:
        loaders = {s: {t: loader(d) for t, d in data.items()} for s, data in problem.splits.items()}
    else:
        loaders = {s: loader(data) for s, data in problem.splits.items()}
    trainer = Trainer(
        model,
        problem.tasks,
        Joint(methods.get("ew")),
        budget=Budget(epochs=None, steps=1),
        progress=False,
        track_exploration=False,
    )
    trainer.fit(loaders["train"], loaders["val"])
    results = trainer.evaluate(loaders["test"], split="test", write=False)
    assert set(results) == {t.name for t in problem.tasks}
    for task in problem.tasks:
        assert set(task.metrics) <= set(results[task.name])
        assert all(torch.isfinite(torch.tensor(v)) for v in results[task.name].values())
