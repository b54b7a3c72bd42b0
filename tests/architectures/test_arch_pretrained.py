"""Torchvision-format ResNet weights: the ``resnet18``/``resnet34`` backbones take a torchvision
``state_dict`` file by key mapping and compute what the torchvision network computes; files that
do not fit are one error naming the problem.

The reference network is written here from torchvision's documented layout (``conv1``, ``bn1``,
``relu``, ``maxpool``, ``layer1..4`` of ``BasicBlock`` with ``conv1/bn1/conv2/bn2`` and
``downsample.0/.1``, ``avgpool``, ``fc``), so no torchvision is needed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.architectures import build, build_backbone
from mtlkit.architectures.pretrained import load_torchvision_resnet, resnet_layout
from mtlkit.errors import ConfigError

IMAGE = (3, 64, 64)


class ReferenceBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ReferenceResNet(nn.Module):
    """torchvision.models.resnet.ResNet of basic blocks (ResNet-18: ``blocks=(2, 2, 2, 2)``)."""

    def __init__(self, blocks=(2, 2, 2, 2), classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            layer = [ReferenceBlock(c, width, stride)]
            layer += [ReferenceBlock(width, width, 1) for _ in range(count - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            c = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, classes)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return torch.flatten(self.avgpool(x), 1)


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every entry: convolutions at He scale, batch-norm affine parameters
    and running statistics away from their initial 1/0 (variances positive), counters > 0."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        shape = value.shape
        if key.endswith("num_batches_tracked"):
            new = torch.randint(1, 10_000, (), generator=generator)
        elif key.endswith("running_var"):
            new = 0.5 + torch.rand(shape, generator=generator)
        elif value.dim() == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            new = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("bn1.weight", "bn2.weight", "1.weight")):
            new = 0.5 + torch.rand(shape, generator=generator)
        else:
            new = 0.2 * torch.randn(shape, generator=generator)
        state[key] = new.to(value.dtype)
    return state


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    reference = ReferenceResNet()
    state = random_state(reference)
    reference.load_state_dict(state)
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(state, path)
    return reference.eval(), state, path


def test_a_torchvision_resnet18_file_gives_the_torchvision_features(torchvision_file):
    reference, state, path = torchvision_file
    backbone = build_backbone("resnet18", IMAGE, weights=path).eval()
    assert backbone.pretrained and backbone.out_shape == (512,)
    x = torch.randn(4, *IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.features(x)
        got = backbone(x)
    assert expected.abs().mean() > 0.1  # the random weights do not silence the network
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # every entry went somewhere: running statistics and counters too
    bn = backbone.stages[3][1].body[4]  # layer4.1.bn2
    assert torch.equal(bn.running_var, state["layer4.1.bn2.running_var"])
    assert bn.num_batches_tracked == state["layer4.1.bn2.num_batches_tracked"]
    # and the stages of an architecture start from them (every cross-stitch column)
    model = build("cross_stitch", IMAGE, {"a": 2, "b": 3}, backbone="resnet18", weights=path)
    for column in model.columns.values():
        torch.testing.assert_close(column[0][0].weight, state["conv1.weight"])


def test_parameter_counts_are_torchvisions_without_the_classifier():
    assert sum(p.numel() for p in ReferenceResNet().parameters()) == 11_689_512  # torchvision's
    counts = {
        name: sum(p.numel() for p in build_backbone(name, IMAGE).parameters())
        for name in ("resnet18", "resnet34")
    }
    assert counts == {"resnet18": 11_176_512, "resnet34": 21_284_672}
    assert build_backbone("resnet18", IMAGE).shapes == [
        (64, 16, 16),
        (128, 8, 8),
        (256, 4, 4),
        (512,),
    ]


def test_old_files_without_batch_norm_counters_load(torchvision_file):
    _, state, _ = torchvision_file
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    backbone = build_backbone("resnet18", IMAGE)
    load_torchvision_resnet(backbone, old)
    assert torch.equal(backbone.stages[0][0].weight, state["conv1.weight"])


def resnet50_state() -> dict[str, torch.Tensor]:
    """The keys and shapes of torchvision's ResNet-50 (bottleneck blocks 3-4-6-3)."""
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}
    state.update({f"bn1.{k}": torch.ones(64) for k in ("weight", "bias")})
    c = 64
    for i, (width, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(count):
            p = f"layer{i + 1}.{b}"
            state[f"{p}.conv1.weight"] = torch.zeros(width, c, 1, 1)
            state[f"{p}.conv2.weight"] = torch.zeros(width, width, 3, 3)
            state[f"{p}.conv3.weight"] = torch.zeros(4 * width, width, 1, 1)
            for j, n in ((1, width), (2, width), (3, 4 * width)):
                state[f"{p}.bn{j}.weight"] = torch.ones(n)
            if b == 0:
                state[f"{p}.downsample.0.weight"] = torch.zeros(4 * width, c, 1, 1)
            c = 4 * width
    return state


def test_a_resnet50_file_is_named_as_bottleneck_blocks(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50_state(), path)
    with pytest.raises(ConfigError) as caught:
        build("hps", IMAGE, {"a": 2}, backbone="resnet18", weights=str(path))
    message = str(caught.value)
    assert "resnet50.pth" in message and "'resnet18' backbone" in message
    assert "the file is a ResNet of bottleneck blocks 3-4-6-3" in message
    assert "the backbone of basic blocks 2-2-2-2" in message
    assert "unexpected keys ['layer1.0.bn3.weight'" in message
    assert "layer1.0.conv1.weight: file [64, 64, 1, 1] vs backbone [64, 64, 3, 3]" in message


def test_a_wrong_shape_file_names_the_tensors(torchvision_file, tmp_path):
    _, state, _ = torchvision_file
    gray = dict(state, **{"conv1.weight": torch.zeros(64, 1, 7, 7)})
    path = tmp_path / "gray.pth"
    torch.save(gray, path)
    with pytest.raises(ValueError) as caught:
        build_backbone("resnet18", IMAGE, weights=path)
    message = str(caught.value)
    assert "1 shape mismatches ['conv1.weight: file [64, 1, 7, 7] vs backbone [64, 3, 7, 7]']" in (
        message
    )
    assert "missing" not in message and "unexpected" not in message
    # a ResNet-34 file in a ResNet-18: its extra blocks, and its layout, are named
    deeper = tmp_path / "resnet34.pth"
    torch.save(random_state(ReferenceResNet((3, 4, 6, 3))), deeper)
    layouts = r"of basic blocks 3-4-6-3, the backbone of basic blocks 2-2-2-2"
    with pytest.raises(ValueError, match=layouts + r".*unexpected keys \['layer1.2.bn1.bias'"):
        build_backbone("resnet18", IMAGE, weights=deeper)
    # the small CIFAR-style resnet has a 3x3 stem: the stem and the missing layer4 are named
    with pytest.raises(ValueError, match=r"conv1.weight: file \[64, 3, 7, 7\] vs backbone"):
        build_backbone("resnet", IMAGE, weights=torchvision_file[2])
    with pytest.raises(ValueError, match="the 'mlp' backbone has no basic blocks"):
        build_backbone("mlp", IMAGE, weights=torchvision_file[2])


def test_a_training_checkpoint_is_not_a_state_dict(torchvision_file, tmp_path):
    _, state, _ = torchvision_file
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state}, path)
    with pytest.raises(ConfigError) as caught:
        build("hps", IMAGE, {"a": 2}, backbone="resnet18", weights=str(path))
    message = str(caught.value)
    assert "entries ['arch', 'epoch', 'state_dict'] are not tensors" in message
    assert "save its 'state_dict' entry alone" in message


def test_layouts_are_read_from_the_keys():
    assert resnet_layout(ReferenceResNet().state_dict()) == "basic blocks 2-2-2-2"
    assert resnet_layout(resnet50_state()) == "bottleneck blocks 3-4-6-3"
