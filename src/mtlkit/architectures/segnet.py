"""The SegNet of MTAN's code and the two models built on it: ``segnet_split`` and ``segnet_mtan``.

Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention" (CVPR 2019; code:
``im2im_pred/model_segnet_*.py``), reused as is by Nash-MTL (Navon et al., ICML 2022;
``experiments/nyuv2/models.py``) and, for Cityscapes, by Pascal et al. (Maximum Roaming, AAAI
2021; ``cityscapes/train_MTL.py``). With filters ``f = [64, 128, 256, 512, 512]``:

* **SegNet** (Badrinarayanan et al., 2017, VGG-16 encoder): five encoder levels of 2, 2, 3, 3, 3
  ``Conv3x3-BN-ReLU`` layers (``f[i]`` channels), each followed by a 2x2 max-pool that keeps its
  indices; five decoder levels that max-unpool with those indices and apply 3, 3, 3, 2, 2
  ``Conv3x3-BN-ReLU`` layers, the first bringing level ``L`` from ``f[L]`` to ``f[L-1]``
  channels (``f[0]`` at the last level). Output: ``f[0]`` channels at the input resolution, so
  ``H`` and ``W`` must be divisible by 32. Convolutions have biases.
* **Prediction layer** of each task: ``Conv3x3(f0 -> f0) -> Conv1x1(f0 -> outputs)``, no
  activation between (MTAN's ``pred=True`` block). Their ``log_softmax`` on segmentation and unit
  normalisation of normals are left to mtlkit's losses, which apply the same maps.
* **segnet_split** (MTAN's "Split, Standard" baseline): the SegNet shared, one prediction layer
  per task. 25,055,185 parameters with NYUv2's heads (13 + 1 + 3 outputs).
* **segnet_mtan**: the SegNet shared, plus per task and level an attention module
  ``Conv1x1-BN-ReLU-Conv1x1-BN-Sigmoid``. In encoder level ``i`` the mask is computed from the
  level's first layer output ``a_i`` (with the task's previous attended features ``p_{i-1}``
  concatenated, from level 1 on) and multiplies the level's last layer output ``b_i``; the
  result goes through a *shared* ``Conv3x3-BN-ReLU`` and a max-pool to give ``p_i``. In decoder
  level ``L`` the task's features are upsampled (bilinear, ``align_corners=True``), passed through
  a shared ``Conv3x3-BN-ReLU``, concatenated with the unpooled input of the level, and the mask
  multiplies the level's output. 44,229,073 parameters for NYUv2's three tasks (their script
  prints 44,229,076: it counts the 3 ``logsigma`` of uncertainty weighting, a method parameter
  here).

Initialisation as in their code: Xavier-normal convolution weights, zero biases; batch norms at
weight 1, bias 0. Ownership: task ``t`` owns its attention modules and its prediction layer;
everything else is shared (Nash-MTL's ``shared_parameters`` also lists the attention modules, so
its task weights scale them too; here every task's own parameters get that task's gradient).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.architectures.backbones import BACKBONES, Backbone, check_widths, image_shape
from mtlkit.architectures.base import ARCHITECTURES, MultiTaskArchitecture, Owned
from mtlkit.architectures.hps import HPS

__all__ = ["SegNet", "SegNetMTAN", "prediction_layer", "segnet_mtan", "segnet_split"]

FILTERS = (64, 128, 256, 512, 512)
ENCODER_LAYERS = (2, 2, 3, 3, 3)  # per level, VGG-16
LEVELS = len(FILTERS)


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    """MTAN's ``conv_layer``: ``Conv(kernel, bias) -> BN -> ReLU``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def attention_layer(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """MTAN's ``att_layer``: ``Conv1x1-BN-ReLU-Conv1x1-BN-Sigmoid``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 1),
        nn.BatchNorm2d(c_mid),
        nn.ReLU(),
        nn.Conv2d(c_mid, c_out, 1),
        nn.BatchNorm2d(c_out),
        nn.Sigmoid(),
    )


def prediction_layer(channels: int, outputs: int) -> nn.Sequential:
    """MTAN's task prediction layer: ``Conv3x3(channels -> channels) -> Conv1x1(-> outputs)``."""
    if outputs < 1:
        raise ValueError(f"a task head needs at least 1 output, got {outputs}")
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, outputs, 1)
    )


def init_like_mtan(module: nn.Module) -> None:
    """Xavier-normal convolution weights and zero biases; batch norm at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _filters(widths: Sequence[int] | None) -> list[int]:
    filters = check_widths("segnet", FILTERS if widths is None else widths)
    if len(filters) != LEVELS:
        raise ValueError(
            f"the VGG SegNet has {LEVELS} levels: widths takes {LEVELS} numbers (default "
            f"{list(FILTERS)}), got {filters}"
        )
    return filters


def _check_size(input_shape: Sequence[int]) -> int:
    c, h, w = image_shape("vgg_segnet", input_shape)
    factor = 2**LEVELS
    if h % factor or w % factor:
        raise ValueError(f"the VGG SegNet needs H and W divisible by {factor}, got {h}x{w}")
    return c


class SegNet(nn.Module):
    """The shared SegNet of MTAN's code (see the module docstring).

    Args:
        in_channels: input channels (3 for RGB).
        filters: the channels of the five levels.

    ``forward(x)`` returns the decoder output; :meth:`levels` also returns, per level, what the
    attention modules read (see :class:`SegNetMTAN`).
    """

    def __init__(self, in_channels: int = 3, filters: Sequence[int] = FILTERS) -> None:
        super().__init__()
        f = list(filters)
        self.filters = f
        self.encoder_first = nn.ModuleList(
            conv_bn_relu(in_channels if i == 0 else f[i - 1], f[i]) for i in range(LEVELS)
        )
        self.encoder_rest = nn.ModuleList(
            nn.Sequential(*(conv_bn_relu(f[i], f[i]) for _ in range(ENCODER_LAYERS[i] - 1)))
            for i in range(LEVELS)
        )
        # decoder level L: f[L] -> f[L-1] (f[0] at level 0), then as many layers as the encoder
        self.decoder_first = nn.ModuleList(
            conv_bn_relu(f[level], f[max(level - 1, 0)]) for level in range(LEVELS)
        )
        self.decoder_rest = nn.ModuleList(
            nn.Sequential(
                *(
                    conv_bn_relu(f[max(level - 1, 0)], f[max(level - 1, 0)])
                    for _ in range(ENCODER_LAYERS[level] - 1)
                )
            )
            for level in range(LEVELS)
        )
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)

    def levels(self, x: Tensor) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
        """``(encoder, decoder)``: for encoder level ``i`` the first layer's and the last layer's
        outputs ``(a_i, b_i)``; for the ``j``-th decoder level (deepest first) the unpooled input
        and the output ``(u_j, d_j)``."""
        encoder, decoder, indices = [], [], []
        h = x
        for i in range(LEVELS):
            a = self.encoder_first[i](h)
            b = self.encoder_rest[i](a)
            h, index = self.pool(b)
            encoder.append((a, b))
            indices.append(index)
        for level in reversed(range(LEVELS)):
            u = self.unpool(h, indices[level])
            h = self.decoder_rest[level](self.decoder_first[level](u))
            decoder.append((u, h))
        return encoder, decoder

    def forward(self, x: Tensor) -> Tensor:
        return self.levels(x)[1][-1][1]


@BACKBONES.register("vgg_segnet")
def vgg_segnet_stages(
    input_shape: Sequence[int], widths: Sequence[int] = FILTERS
) -> list[nn.Module]:
    """MTAN's SegNet as one stage (its pooling indices cross the encoder and the decoder, so it
    cannot be cut into tensor-to-tensor stages); ``widths``: the five levels' channels."""
    segnet = SegNet(_check_size(input_shape), _filters(widths))
    init_like_mtan(segnet)
    return [segnet]


@ARCHITECTURES.register("segnet_split")
def segnet_split(
    input_shape: Sequence[int],
    task_outputs: Mapping[str, int],
    multi_input: bool = False,
    widths: list[int] | None = None,
) -> HPS:
    """MTAN's "Split, Standard" model: their SegNet (filters ``widths``, default
    [64, 128, 256, 512, 512]) shared, one prediction layer per task."""
    filters = _filters(widths)
    encoder = Backbone(vgg_segnet_stages(input_shape, filters), input_shape, name="vgg_segnet")
    heads = {t: prediction_layer(filters[0], int(n)) for t, n in task_outputs.items()}
    if not heads:
        raise ValueError("an architecture needs at least one task")
    for head in heads.values():
        init_like_mtan(head)
    return HPS(encoder, heads, multi_input=multi_input)


class SegNetMTAN(MultiTaskArchitecture):
    """MTAN on MTAN's SegNet, as in their code (see the module docstring).

    Args:
        in_channels: input channels.
        task_outputs: output channels of each task's prediction layer.
        multi_input: each task has its own input (``forward`` needs ``task=``).
        filters: the channels of the five levels.
    """

    def __init__(
        self,
        in_channels: int,
        task_outputs: Mapping[str, int],
        multi_input: bool = False,
        filters: Sequence[int] = FILTERS,
    ) -> None:
        super().__init__(list(task_outputs), multi_input)
        f = list(filters)
        self.segnet = SegNet(in_channels, f)
        top = LEVELS - 1
        # shared: encoder level i, f[i] -> f[i+1] (f[4] at the top); decoder level L,
        # f[L] -> f[L-1] (f[0] at level 0, f[4] at the top)
        self.encoder_block = nn.ModuleList(
            conv_bn_relu(f[i], f[min(i + 1, top)]) for i in range(LEVELS)
        )

        def bridged(level: int) -> int:  # channels out of the shared decoder block
            return f[top] if level == top else f[max(level - 1, 0)]

        self.decoder_block = nn.ModuleList(
            conv_bn_relu(f[level], bridged(level)) for level in range(LEVELS)
        )

        def encoder_attention(i: int) -> nn.Module:
            c_in = f[0] if i == 0 else 2 * f[i]
            return attention_layer(c_in, f[i], f[i])

        def decoder_attention(level: int) -> nn.Module:
            out = f[max(level - 1, 0)]  # the channels of the level's output
            return attention_layer(f[level] + bridged(level), out, out)

        self.encoder_attention = nn.ModuleDict(
            {t: nn.ModuleList(encoder_attention(i) for i in range(LEVELS)) for t in task_outputs}
        )
        self.decoder_attention = nn.ModuleDict(
            {t: nn.ModuleList(decoder_attention(lv) for lv in range(LEVELS)) for t in task_outputs}
        )
        self.heads = nn.ModuleDict(
            {t: prediction_layer(f[0], int(n)) for t, n in task_outputs.items()}
        )
        init_like_mtan(self)

    def compute(self, x: Tensor, tasks: list[str]) -> dict[str, Tensor]:
        encoder, decoder = self.segnet.levels(x)
        outputs = {}
        for t in tasks:
            p = None
            for i, (a, b) in enumerate(encoder):
                mask = self.encoder_attention[t][i](a if p is None else torch.cat([a, p], dim=1))
                p = F.max_pool2d(self.encoder_block[i](mask * b), 2, 2)
            for j, (u, d) in enumerate(decoder):
                level = LEVELS - 1 - j
                up = F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=True)
                q = self.decoder_block[level](up)
                mask = self.decoder_attention[t][level](torch.cat([u, q], dim=1))
                p = mask * d
            outputs[t] = self.heads[t](p)
        return outputs

    def task_owned(self, task: str) -> list[Owned]:
        return [self.encoder_attention[task], self.decoder_attention[task], self.heads[task]]


@ARCHITECTURES.register("segnet_mtan")
def segnet_mtan(
    input_shape: Sequence[int],
    task_outputs: Mapping[str, int],
    multi_input: bool = False,
    widths: list[int] | None = None,
) -> SegNetMTAN:
    """MTAN (Liu et al., 2019) as in their code: their SegNet (filters ``widths``, default
    [64, 128, 256, 512, 512]) with a task attention module in every encoder and decoder level."""
    return SegNetMTAN(_check_size(input_shape), task_outputs, multi_input, _filters(widths))
