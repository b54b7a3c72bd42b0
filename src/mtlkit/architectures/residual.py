"""The basic residual block of He et al. ("Deep Residual Learning for Image Recognition", CVPR
2016), used by the ``resnet``, ``resnet18`` and ``resnet34`` backbones; its own module so that
both the stage builders and the torchvision key mapping (:mod:`mtlkit.architectures.pretrained`)
can know it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, both convolutions ``3x3``; the
    shortcut is a strided ``1x1`` convolution + BN when the shape changes, else the identity.

    ``body[0]``, ``body[1]``, ``body[3]``, ``body[4]`` are torchvision's ``conv1``, ``bn1``,
    ``conv2``, ``bn2``; ``shortcut[0]``, ``shortcut[1]`` its ``downsample.0``, ``downsample.1``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))
