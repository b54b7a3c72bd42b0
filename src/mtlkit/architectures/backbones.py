"""Small encoders written here (no torchvision): an MLP and a plain CNN."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class MLPEncoder(nn.Sequential):
    """Flatten, then ``Linear -> ReLU`` for each hidden width. ``out_features`` is the last."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (256, 128)) -> None:
        if not hidden:
            raise ValueError("MLPEncoder needs at least one hidden width")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__(*layers)
        self.out_features = width


class CNNEncoder(nn.Module):
    """``Conv3x3 -> ReLU`` blocks (max-pooled by 2 after each block while the map is larger than
    2x2), then global average pooling; ``out_features`` = the last channel count."""

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64)) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CNNEncoder needs a [C, H, W] input shape, got {tuple(input_shape)}")
        if not channels:
            raise ValueError("CNNEncoder needs at least one channel count")
        layers: list[nn.Module] = []
        c, h, w = input_shape
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            if min(h, w) > 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.out_features = c

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def build_encoder(
    name: str, input_shape: Sequence[int], widths: Sequence[int] | None = None
) -> nn.Module:
    """``"mlp"`` or ``"cnn"`` with the given hidden widths / channels (defaults if ``None``)."""
    if name == "mlp":
        return MLPEncoder(input_shape, widths or (256, 128))
    if name == "cnn":
        return CNNEncoder(input_shape, widths or (32, 64))
    raise ValueError(f"unknown backbone {name!r}; valid backbones: cnn, mlp")


def encoder_output_features(encoder: nn.Module, input_shape: Sequence[int]) -> int:
    """The width of the encoder's flat output, read from ``out_features`` or by a dry run."""
    width = getattr(encoder, "out_features", None)
    if isinstance(width, int):
        return width
    with torch.no_grad():
        return int(encoder(torch.zeros(1, *input_shape)).reshape(1, -1).shape[1])
