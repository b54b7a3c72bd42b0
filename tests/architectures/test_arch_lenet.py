"""MultiLeNet (Sener & Koltun, 2018): layer shapes, parameter counts and the forward pass of
their ``MultiLeNetR`` / ``MultiLeNetO``, written out here with functional calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlkit.architectures import HPS, build, build_backbone
from mtlkit.errors import ConfigError

TASKS = {"left": 10, "right": 10}


def count(params) -> int:
    return sum(p.numel() for p in params)


def test_parameter_counts_and_shapes_are_those_of_the_paper():
    model = build("multi_lenet", (1, 28, 28), TASKS)
    assert isinstance(model, HPS)
    assert model.encoder.shapes == [(10, 12, 12), (20, 4, 4), (50,)]
    # conv1 260 + conv2 5020 + fc 16050; each head 2550 + 510
    assert count(model.shared_parameters()) == 21_330
    assert [count(model.task_parameters(t)) for t in TASKS] == [3_060, 3_060]
    assert count(model.parameters()) == 27_450
    out = model(torch.randn(3, 1, 28, 28))
    assert {t: tuple(y.shape) for t, y in out.items()} == {"left": (3, 10), "right": (3, 10)}


def test_forward_is_their_forward_in_evaluation():
    """Their evaluation pass (no dropout): relu(pool(conv1)), relu(pool(conv2)), relu(fc),
    then per task fc2(relu(fc1)); their log_softmax is applied to both sides."""
    torch.manual_seed(0)
    model = build("multi_lenet", (1, 28, 28), TASKS).eval()
    conv1, conv2 = (m for m in model.modules() if isinstance(m, nn.Conv2d))
    fc = model.encoder.stages[2][1]
    x = torch.randn(4, 1, 28, 28)
    z = F.relu(F.max_pool2d(F.conv2d(x, conv1.weight, conv1.bias), 2))
    z = F.relu(F.max_pool2d(F.conv2d(z, conv2.weight, conv2.bias), 2))
    z = F.relu(F.linear(z.view(-1, 320), fc.weight, fc.bias))
    out = model(x)
    for task in TASKS:
        fc1, fc2 = (m for m in model.heads[task] if isinstance(m, nn.Linear))
        theirs = F.log_softmax(fc2(F.relu(fc1(z))), dim=1)
        torch.testing.assert_close(F.log_softmax(out[task], dim=1), theirs)


def test_dropout_is_active_in_training_only_and_can_be_turned_off():
    torch.manual_seed(0)
    model = build("multi_lenet", (1, 28, 28), TASKS)
    x = torch.randn(8, 1, 28, 28)
    model.train()
    assert not torch.equal(model(x)["left"], model(x)["left"])
    model.eval()
    torch.testing.assert_close(model(x)["left"], model(x)["left"], rtol=0, atol=0)
    plain = build("multi_lenet", (1, 28, 28), TASKS, dropout=0.0)
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in plain.modules())
    assert count(plain.parameters()) == 27_450


def test_lenet_backbone_and_other_sizes():
    backbone = build_backbone("lenet", (1, 36, 36))  # Pareto MTL's canvas: 20 x 6 x 6 = 720
    assert backbone.shapes == [(10, 16, 16), (20, 6, 6), (50,)]
    assert build_backbone("lenet", (3, 28, 28), [4, 6, 8]).shapes[-1] == (8,)
    model = build("hps", (1, 28, 28), TASKS, backbone="lenet")
    assert count(model.encoder.parameters()) == 21_330


@pytest.mark.parametrize(
    "args, message",
    [
        ({"widths": [10, 20]}, "takes 3 widths"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"head_width": 0}, "head_width must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        build("multi_lenet", (1, 28, 28), TASKS, **args)
    with pytest.raises(ConfigError, match="at least 16 x 16"):
        build("multi_lenet", (1, 12, 12), TASKS)
