"""Every ready config under ``configs/`` loads and trains for one optimizer step on a generated
fixture of its data set (in the data set's real on-disk format), through ``mtlkit.app.runner.run``.

The configs' models, methods and optimizers are used as they are (full widths); only the budget
(one step), the batch size, the workers and the fixture's image sizes are overridden. Grid
configs (``mtlkit compare``: grid keys ``methods``, ``strategies``, ...) are loaded through
:func:`mtlkit.app.compare.load_grid`, and each of their methods and strategies trains one step.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mtlkit.app.cli import main
from mtlkit.app.compare import GRID_KEYS, load_grid, run_grid
from mtlkit.app.config import load_config
from mtlkit.app.runner import run
from mtlkit.training.evaluation import last_k_epochs

sys.path.insert(0, str(Path(__file__).parent / "data"))
from dataset_fixtures import (
    write_celeba,
    write_cityscapes,
    write_mnist,
    write_nyuv2,
    write_office,
    write_qm9,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def is_grid(path: Path) -> bool:
    """Whether ``path`` is a ``mtlkit compare`` config (a train config plus grid keys)."""
    return bool(set(yaml.safe_load(path.read_text()) or {}) & set(GRID_KEYS))


TRAIN_CONFIGS = [p for p in CONFIGS if not is_grid(p)]
GRID_CONFIGS = [p for p in CONFIGS if is_grid(p)]


# One fixture per data set: a writer of the data set's on-disk format into a folder, returning
# the data_args overrides that make it small (beside data_args.root).
Fixture = Callable[[Path], list[str]]


def _nyuv2(root: Path) -> list[str]:
    write_nyuv2(root, n_train=3, n_val=2, size=(32, 32))  # 5 SegNet levels: divisible by 32
    return []


def _cityscapes(root: Path) -> list[str]:
    write_cityscapes(root, n_train=3, n_val=2, size=(32, 64))
    return []


def _celeba(root: Path) -> list[str]:
    write_celeba(root, size=(20, 16))
    return ["data_args.image_size=16"]


def _office_31(root: Path) -> list[str]:
    write_office(root, {"amazon": 5, "dslr": 5, "webcam": 5}, ("back_pack", "bike"))
    return ["data_args.image_size=16"]


def _office_home(root: Path) -> list[str]:
    domains = {"Art": 5, "Clipart": 5, "Product": 5, "Real World": 5}
    write_office(root, domains, ("Alarm_Clock", "Backpack"), images_subfolder=False)
    return ["data_args.image_size=16"]


def _qm9(root: Path) -> list[str]:
    write_qm9(root, n=12)
    return ["data_args.n_val=2", "data_args.n_test=2"]


def _mnist(root: Path) -> list[str]:
    write_mnist(root, n_train=12, n_test=4)
    return ["data_args.val_size=4"]


FIXTURES: dict[str, Fixture] = {
    "nyuv2": _nyuv2,
    "cityscapes": _cityscapes,
    "celeba": _celeba,
    "office_31": _office_31,
    "office_home": _office_home,
    "qm9": _qm9,
    "multi_mnist": _mnist,
    "multi_fashion": _mnist,
}
GENERATED = {"mmoe_synthetic": ["data_args.n_train=16", "data_args.n_val=8", "data_args.n_test=8"]}
# Embedded data sets (grid configs only): shrunk, not written.
EMBEDDED = {"multidigits": ["data_args.n_train=64", "data_args.n_val=32", "data_args.n_test=32"]}

ONE_STEP = ["steps=1", "batch_size=2", "workers=0", "progress=false", "checkpoint_every=null"]


def test_there_are_configs_for_every_standard_data_set():
    data = {load_config(path).data for path in TRAIN_CONFIGS}
    assert data == set(FIXTURES) | set(GENERATED)
    assert GRID_CONFIGS, "no mtlkit compare config"


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_config_trains_one_step_on_its_fixture(path, tmp_path):
    config = load_config(path)
    if config.data in GENERATED:
        overrides = GENERATED[config.data]
    else:
        assert config.data in FIXTURES, f"{path.name}: no fixture for data set {config.data!r}"
        root = tmp_path / "data"
        overrides = [f"data_args.root={root}", *FIXTURES[config.data](root)]
    if last_k_epochs(load_config(path).select) is not None:  # one step: there is one epoch
        overrides.append("select=last")
    config = load_config(path, [*overrides, *ONE_STEP])
    out = tmp_path / "run"
    results = run(config, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost"]["steps"] == 1
    test = summary["results"]["test"]
    assert test == results and len(test) >= 2
    for task, metrics in test.items():
        assert len(metrics) >= 2, task  # the loss and at least one metric
        assert all(math.isfinite(v) for v in metrics.values()), (task, metrics)
    # the run keeps the config's model, method and optimizer
    saved = yaml.safe_load((out / "config.yaml").read_text())
    original = yaml.safe_load(path.read_text())
    for key in ("arch", "arch_args", "method", "optimizer", "lr", "scheduler"):
        if key in original:
            assert saved[key] == original[key], key


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_header_names_source_and_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "Source:" in text and "Adapted:" in text
    command = "compare" if is_grid(path) else "train"
    assert f"mtlkit {command} --config configs/{path.name}" in text
    assert all(len(line) <= 100 for line in header)


@pytest.mark.parametrize("path", GRID_CONFIGS, ids=lambda p: p.stem)
def test_grid_config_runs_each_method_and_strategy_for_one_step(path, tmp_path):
    """Every method and strategy of a grid config, with its arguments, trains one batch (one
    seed, one budget of one step, which alternating overshoots by its other groups' steps; the
    baselines one step too) and gets a finite Δm%."""
    full = load_grid(path)
    assert full.base.data in EMBEDDED, f"{path.name}: no small setting for {full.base.data!r}"
    small = [*EMBEDDED[full.base.data], *ONE_STEP, "plots=false", f"out={tmp_path}"]
    seed = f"seeds=[{full.seeds[0]}]"
    grid = load_grid(path, [*small, seed, "budgets=[{steps: 1, name: one}]"])
    assert (grid.methods, grid.strategies) == (full.methods, full.strategies)
    report = run_grid(grid, jobs=0, echo=lambda line: None)
    assert not report.failed and not report.interrupted
    assert len(report.rows) == len(full.methods) * len(full.strategies)
    for row in report.rows:
        assert row["batches"] == 1, row["run"]
        assert math.isfinite(row["delta_m"]), row["run"]


@pytest.mark.parametrize(
    "path", [p for p in TRAIN_CONFIGS if load_config(p).data in FIXTURES], ids=lambda p: p.stem
)
def test_the_data_root_is_left_to_the_user_with_one_clear_error(
    path, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # no runs/ folder in the checkout
    assert "root" not in (yaml.safe_load(path.read_text()).get("data_args") or {})
    assert "data_args.root=PATH" in path.read_text()  # the header says how to give it
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"mtlkit: error: dataset '{load_config(path).data}' needs data_args.root")
    assert "--data-root PATH" in err
    assert list((tmp_path / "runs").iterdir()) == []  # the new run folder is removed again
