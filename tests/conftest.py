"""Shared fixtures: small multi-task models in float64."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mtlkit.architectures import HPS

TINY_COMPARE = [
    "data_args.n_train=64",
    "data_args.n_val=32",
    "data_args.n_test=32",
    "batch_size=32",
    "epochs=1",
    "tasks=[left,sum]",
]
"""A compare grid's smallest MultiDigits runs (one batch of 32 per epoch, two tasks)."""


def tiny_hps(num_tasks: int = 3, in_features: int = 5, seed: int = 0, dtype=torch.float64) -> HPS:
    """An HPS with a 2-layer MLP encoder (plus an unused parameter) and linear heads."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(in_features, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh())
    heads = {
        f"t{i}": nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
        for i in range(num_tasks)
    }
    return HPS(encoder, heads).to(dtype)


def task_losses(model: HPS, x: torch.Tensor, y: torch.Tensor, features: bool = False):
    """Squared-error loss of each task head on target column i (and the features if asked)."""
    outputs, z = model(x, return_features=True)
    losses = [((out.squeeze(-1) - y[:, i]) ** 2).mean() for i, out in enumerate(outputs.values())]
    return (losses, z) if features else losses


@pytest.fixture
def problem():
    model = tiny_hps()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    return model, x, y


def summary(folder) -> dict:
    """A run folder's ``summary.json``."""
    return json.loads((folder / "summary.json").read_text())


def one_line_error(capsys) -> str:
    """The captured stderr, checked to be exactly one ``mtlkit: error:`` line (no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("mtlkit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err
