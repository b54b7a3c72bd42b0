"""MTAN's SegNet, ``segnet_split`` and ``segnet_mtan`` (Liu et al., 2019): parameter counts of
their code for NYUv2's tasks, level shapes, pooling indices, ownership and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.architectures import HPS, SegNet, SegNetMTAN, build, build_backbone
from mtlkit.errors import ConfigError

NYUV2 = {"segmentation": 13, "depth": 1, "normal": 3}
SMALL = [2, 3, 4, 5, 6]  # five levels of distinct widths: catches a channel mix-up


def count(params) -> int:
    return sum(p.numel() for p in params)


def convs_per_level(blocks: nn.ModuleList) -> list[int]:
    return [sum(isinstance(m, nn.Conv2d) for m in block.modules()) for block in blocks]


@pytest.mark.slow
def test_parameter_counts_are_those_of_their_code():
    """Counted on MTAN's ``SegNet`` (model_segnet_mtan.py) and Nash-MTL's copy of it: 44,229,073
    without ``logsigma``; the split model of the same SegNet with their prediction layers."""
    mtan = build("segnet_mtan", (3, 32, 32), NYUV2)
    assert count(mtan.parameters()) == 44_229_073
    split = build("segnet_split", (3, 32, 32), NYUV2)
    assert count(split.parameters()) == 25_055_185
    heads = {t: count(split.task_parameters(t)) for t in NYUV2}
    # Conv3x3 64 -> 64 (36,928) + Conv1x1 64 -> k
    assert heads == {t: 36_928 + 64 * k + k for t, k in NYUV2.items()}
    shared_mtan = count(mtan.shared_parameters())
    assert shared_mtan == count(mtan.segnet.parameters()) + count(
        mtan.encoder_block.parameters()
    ) + count(mtan.decoder_block.parameters())


def test_segnet_is_vgg16_with_pooling_indices():
    torch.manual_seed(0)
    segnet = SegNet(3, SMALL)
    assert [
        a + b
        for a, b in zip(convs_per_level(segnet.encoder_first), convs_per_level(segnet.encoder_rest))
    ] == [2, 2, 3, 3, 3]
    decoder = [
        a + b
        for a, b in zip(convs_per_level(segnet.decoder_first), convs_per_level(segnet.decoder_rest))
    ]
    assert decoder == [2, 2, 3, 3, 3]  # by level: run deepest first, 3, 3, 3, 2, 2
    x = torch.randn(2, 3, 64, 32)
    encoder, decoder_maps = segnet.levels(x)
    assert [tuple(b.shape[1:]) for _, b in encoder] == [
        (2, 64, 32),
        (3, 32, 16),
        (4, 16, 8),
        (5, 8, 4),
        (6, 4, 2),
    ]
    assert [tuple(d.shape[1:]) for _, d in decoder_maps] == [
        (5, 4, 2),
        (4, 8, 4),
        (3, 16, 8),
        (2, 32, 16),
        (2, 64, 32),
    ]
    # max-unpooling puts each pooled value back where its maximum was: at most one non-zero
    # per 2x2 window (nearest upsampling would fill all four)
    for u, _ in decoder_maps:
        windows = (u != 0).unfold(2, 2, 2).unfold(3, 2, 2).sum(dim=(-1, -2))
        assert int(windows.max()) == 1
    assert torch.equal(segnet(x), decoder_maps[-1][1])


def test_segnet_mtan_outputs_and_ownership():
    torch.manual_seed(0)
    model = build("segnet_mtan", (3, 32, 64), {"a": 3, "b": 1}, widths=SMALL)
    assert isinstance(model, SegNetMTAN) and not model.has_shared_representation
    out = model(torch.randn(2, 3, 32, 64))
    assert {t: tuple(y.shape) for t, y in out.items()} == {"a": (2, 3, 32, 64), "b": (2, 1, 32, 64)}
    own_a = {id(p) for p in model.task_parameters("a")}
    expected = {
        id(p)
        for m in (model.encoder_attention["a"], model.decoder_attention["a"], model.heads["a"])
        for p in m.parameters()
    }
    assert own_a == expected
    # task b's loss does not reach task a's attention
    model.zero_grad()
    model(torch.randn(2, 3, 32, 64))["b"].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.task_parameters("a"))
    assert any(p.grad is not None and p.grad.any() for p in model.task_parameters("b"))


def test_initialisation_is_theirs():
    torch.manual_seed(0)
    model = build("segnet_split", (3, 32, 32), {"a": 2}, widths=SMALL)
    assert isinstance(model, HPS)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(not m.bias.any() for m in convs)  # zero biases (PyTorch's default is uniform)
    backbone = build_backbone("vgg_segnet", (3, 32, 32))
    assert backbone.shapes == [(64, 32, 32)] and len(backbone) == 1


@pytest.mark.parametrize(
    "args, shape, message",
    [
        ({"widths": [4, 4]}, (3, 32, 32), "has 5 levels"),
        ({}, (3, 48, 32), "divisible by 32"),
        ({}, (12,), r"needs a \[C, H, W\] input shape"),
    ],
)
def test_bad_arguments_are_config_errors(args, shape, message):
    for name in ("segnet_mtan", "segnet_split"):
        with pytest.raises(ConfigError, match=message):
            build(name, shape, {"a": 1}, **args)
