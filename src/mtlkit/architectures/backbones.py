"""Backbones written here (no torchvision): an ordered list of *stages* with known output shapes.

A :class:`Backbone` is the unit the stage-wise architectures work on: Cross-stitch puts a unit
between consecutive stages of one column per task, MTAN attaches a task attention module to every
stage, PLE makes its extraction levels out of groups of stages, Learning-to-Branch grows a tree
whose layers are stages, Maximum Roaming masks the units (channels or neurons) at the output of
every stage, and MMoE-style models share the first stages as a stem and copy the rest as experts.
Each stage maps one tensor to one tensor; ``shapes[j]`` is the output shape of stage ``j``
(without the batch dimension), traced once at construction.

Registered backbones (``build_backbone(name, input_shape, widths, weights)``):

* ``mlp``: flatten, then one ``Linear -> ReLU`` stage per width (default ``(256, 128)``).
* ``cnn``: one ``Conv3x3 -> ReLU -> MaxPool2`` stage per channel count (default ``(32, 64)``;
  the pooling stops once the map is 2 pixels wide); the last stage ends with global average
  pooling, so the output is a vector.
* ``resnet``: a small ResNet (He et al., 2016) of basic blocks: stage ``j`` holds two basic
  blocks of ``widths[j]`` channels (default ``(16, 32, 64)``), the first stage after a
  ``Conv3x3-BN-ReLU`` stem, the later ones starting with a stride-2 block (while the map is more
  than 2 pixels wide); global average pooling at the end.
* ``segnet``: an encoder-decoder for dense prediction in the style of SegNet (Badrinarayanan et
  al., 2017): one encoder stage per width (``(Conv3x3-BN-ReLU) x 2 -> MaxPool2``, default
  ``(16, 32)``), then mirrored decoder stages (``Upsample x2 -> (Conv3x3-BN-ReLU) x 2``) back to
  the input resolution with ``widths[0]`` channels. There are no pooling indices or skip
  connections between stages, so that every stage stays a tensor-to-tensor map that all
  stage-wise architectures can use; heads on it predict per-pixel maps
  (:func:`make_head` gives a ``1x1`` convolution).

* ``resnet18``, ``resnet34``: torchvision's ResNets without the classifier (7x7 stride-2 stem,
  max pooling, 2-2-2-2 or 3-4-6-3 basic blocks of 64-128-256-512 channels), four stages.
* ``lenet`` (Sener & Koltun's MultiLeNet encoder, :mod:`mtlkit.architectures.lenet`) and
  ``vgg_segnet`` (MTAN's SegNet as one stage, :mod:`mtlkit.architectures.segnet`).

Pretrained weights are never downloaded: ``weights=<path>`` loads, with
``torch.load(weights_only=True)``, a ``state_dict`` of the backbone (as saved by
``torch.save(backbone.state_dict(), path)``) or of a torchvision ResNet (the ImageNet ``.pth``
files, renamed onto ``resnet18``/``resnet34``): :mod:`mtlkit.architectures.pretrained`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlkit.architectures.pretrained import load_weights_file
from mtlkit.architectures.residual import BasicBlock
from mtlkit.registry import Registry

Shape = tuple[int, ...]
StageBuilder = Callable[[Sequence[int], Sequence[int]], "list[nn.Module]"]


class Backbone(nn.Module):
    """An ordered list of stages and their output shapes.

    Args:
        stages: modules applied in order, each mapping one tensor to one tensor.
        input_shape: the shape of one input, without the batch dimension.
        flattens_input: the first stage flattens its input (an MLP); MMoE-style gates may then
            read the flattened input itself.
        name: a label for messages.

    Attributes:
        shapes: ``shapes[j]`` is the output shape of stage ``j`` (traced with a dry run).
        pretrained: weights were loaded from a file (copies then keep them instead of being
            re-initialised; see :meth:`copy_stages`).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        input_shape: Sequence[int],
        *,
        flattens_input: bool = False,
        name: str = "custom",
    ) -> None:
        super().__init__()
        if not stages:
            raise ValueError(f"backbone {name!r} needs at least one stage")
        self.stages = nn.ModuleList(stages)
        self.input_shape: Shape = tuple(int(s) for s in input_shape)
        self.flattens_input = flattens_input
        self.name = name
        self.pretrained = False
        self.shapes: list[Shape] = trace_shapes(self.stages, self.input_shape)

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def out_shape(self) -> Shape:
        """The output shape of the last stage."""
        return self.shapes[-1]

    @property
    def out_features(self) -> int | None:
        """The width of a vector output; ``None`` for a dense (map) output."""
        return self.out_shape[0] if len(self.out_shape) == 1 else None

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def copy_stages(self, start: int = 0, stop: int | None = None) -> nn.ModuleList:
        """Independent copies of ``stages[start:stop]``: re-initialised, unless the backbone
        holds loaded weights (then every copy starts from them, as Misra et al. initialise every
        Cross-stitch column from the same pretrained network)."""
        copies = copy.deepcopy(self.stages[start:stop])
        if not self.pretrained:
            reset_parameters(copies)
        return copies

    def load_weights(self, path: str | Path) -> None:
        """Load weights from ``path`` (``torch.load(weights_only=True)``): a ``state_dict`` of
        this backbone, or of a torchvision ResNet; see :mod:`mtlkit.architectures.pretrained`.

        Raises:
            ValueError: naming the file and what does not fit (missing or unexpected keys,
                shapes).
        """
        load_weights_file(self, path)


def trace_shapes(stages: Sequence[nn.Module], input_shape: Shape) -> list[Shape]:
    """The output shape of each stage, from a dry run on zeros (eval mode, no gradient: batch
    norm statistics are not touched)."""
    modes = [m.training for m in stages]
    params = [p for s in stages for p in s.parameters()]
    dtype = params[0].dtype if params else torch.get_default_dtype()
    shapes: list[Shape] = []
    try:
        for stage in stages:
            stage.eval()
        with torch.no_grad():
            x = torch.zeros(2, *input_shape, dtype=dtype)
            for i, stage in enumerate(stages):
                try:
                    x = stage(x)
                except RuntimeError as error:
                    raise ValueError(
                        f"stage {i} cannot take an input of shape {tuple(x.shape[1:])}: {error}"
                    ) from error
                shapes.append(tuple(x.shape[1:]))
    finally:
        for stage, mode in zip(stages, modes):
            stage.train(mode)
    return shapes


def reset_parameters(module: nn.Module) -> None:
    """Re-initialise every submodule that can (``reset_parameters``)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def make_head(shape: Sequence[int], outputs: int) -> nn.Module:
    """A task head on features of ``shape``: a linear layer on a vector ``[C]``, a ``1x1``
    convolution (per-pixel outputs) on a map ``[C, H, W]``."""
    if outputs < 1:
        raise ValueError(f"a task head needs at least 1 output, got {outputs}")
    if len(shape) == 1:
        return nn.Linear(shape[0], outputs)
    if len(shape) == 3:
        return nn.Conv2d(shape[0], outputs, kernel_size=1)
    raise ValueError(f"no task head for features of shape {tuple(shape)}; expected [C] or [C,H,W]")


def pool_to_vector(x: Tensor) -> Tensor:
    """``[B, C]`` as is; ``[B, C, ...]`` averaged over the trailing (spatial) dimensions."""
    return x if x.dim() == 2 else x.flatten(2).mean(dim=2)


def resize_map(x: Tensor, size: Sequence[int]) -> Tensor:
    """Resize a ``[B, C, H, W]`` map to ``size``: average pooling down, nearest upsampling up."""
    size = tuple(size)
    if tuple(x.shape[2:]) == size:
        return x
    if x.shape[2] >= size[0] and x.shape[3] >= size[1]:
        return nn.functional.adaptive_avg_pool2d(x, size)
    return nn.functional.interpolate(x, size=size, mode="nearest")


# ---------------------------------------------------------------------------- stage builders
BACKBONES: Registry[list[nn.Module]] = Registry("backbone")


def image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image input shape; a ``ValueError`` naming backbone ``name``
    otherwise."""
    if len(input_shape) != 3:
        raise ValueError(
            f"backbone {name!r} needs a [C, H, W] input shape, got {tuple(input_shape)}"
        )
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def check_widths(name: str, widths: Sequence[int]) -> list[int]:
    """``widths`` as a list of positive ints; a ``ValueError`` naming backbone ``name``
    otherwise."""
    widths = [int(w) for w in widths]
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"backbone {name!r} needs positive widths, got {widths}")
    return widths


@BACKBONES.register("mlp")
def mlp_stages(input_shape: Sequence[int], widths: Sequence[int] = (256, 128)) -> list[nn.Module]:
    """``Flatten`` then one ``Linear -> ReLU`` stage per width."""
    widths = check_widths("mlp", widths)
    stages: list[nn.Module] = []
    width = math.prod(input_shape)
    for i, out in enumerate(widths):
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        stages.append(nn.Sequential(*layers, nn.Linear(width, out), nn.ReLU()))
        width = out
    return stages


@BACKBONES.register("cnn")
def cnn_stages(input_shape: Sequence[int], widths: Sequence[int] = (32, 64)) -> list[nn.Module]:
    """One ``Conv3x3 -> ReLU (-> MaxPool2 while the map is wider than 2)`` stage per channel
    count; global average pooling closes the last stage."""
    widths = check_widths("cnn", widths)
    c, h, w = image_shape("cnn", input_shape)
    stages: list[nn.Module] = []
    for i, out in enumerate(widths):
        layers: list[nn.Module] = [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        if min(h, w) > 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        if i == len(widths) - 1:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        stages.append(nn.Sequential(*layers))
        c = out
    return stages


@BACKBONES.register("resnet")
def resnet_stages(
    input_shape: Sequence[int], widths: Sequence[int] = (16, 32, 64)
) -> list[nn.Module]:
    """Stages of two basic blocks each; a ``Conv3x3-BN-ReLU`` stem opens the first stage, later
    stages start with a stride-2 block while the map is wider than 2 pixels."""
    widths = check_widths("resnet", widths)
    c, h, w = image_shape("resnet", input_shape)
    stages: list[nn.Module] = []
    for i, out in enumerate(widths):
        layers: list[nn.Module] = []
        stride = 1
        if i == 0:
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        elif min(h, w) > 2:
            stride = 2
            h, w = (h + 1) // 2, (w + 1) // 2
        layers += [BasicBlock(c, out, stride), BasicBlock(out, out)]
        if i == len(widths) - 1:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        stages.append(nn.Sequential(*layers))
        c = out
    return stages


IMAGENET_WIDTHS = (64, 128, 256, 512)


def imagenet_resnet_stages(
    name: str, input_shape: Sequence[int], widths: Sequence[int], blocks: Sequence[int]
) -> list[nn.Module]:
    """torchvision's ResNet of basic blocks without its classifier, as four stages: the stem
    (``Conv7x7/2-BN-ReLU-MaxPool3x3/2``) and ``layer1`` in stage 0, ``layer2..4`` (each opened
    by a stride-2 block) in stages 1-3, global average pooling closing stage 3. Weights as
    torchvision initialises them (Kaiming-normal, fan-out; batch norm at 1, 0)."""
    widths = check_widths(name, widths)
    if len(widths) != len(blocks):
        raise ValueError(
            f"backbone {name!r} has {len(blocks)} stages: widths takes {len(blocks)} numbers "
            f"(default {list(IMAGENET_WIDTHS)}), got {widths}"
        )
    c, _, _ = image_shape(name, input_shape)
    stem: list[nn.Module] = [
        nn.Conv2d(c, widths[0], 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    stages: list[nn.Module] = []
    c = widths[0]
    for i, (out, count) in enumerate(zip(widths, blocks, strict=True)):
        layers = [*stem] if i == 0 else []
        layers.append(BasicBlock(c, out, 1 if i == 0 else 2))
        layers += [BasicBlock(out, out) for _ in range(count - 1)]
        if i == len(widths) - 1:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        stages.append(nn.Sequential(*layers))
        c = out
    for stage in stages:
        for m in stage.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return stages


@BACKBONES.register("resnet18")
def resnet18_stages(
    input_shape: Sequence[int], widths: Sequence[int] = IMAGENET_WIDTHS
) -> list[nn.Module]:
    """ResNet-18 (He et al., 2016) in torchvision's layout: 2-2-2-2 basic blocks of 64-128-256-512
    channels after a 7x7 stride-2 stem and max pooling; 11,176,512 parameters (torchvision's
    11,689,512 less the 1000-class ``fc``). Takes torchvision's ImageNet weights
    (``weights=FILE``, see :mod:`mtlkit.architectures.pretrained`)."""
    return imagenet_resnet_stages("resnet18", input_shape, widths, (2, 2, 2, 2))


@BACKBONES.register("resnet34")
def resnet34_stages(
    input_shape: Sequence[int], widths: Sequence[int] = IMAGENET_WIDTHS
) -> list[nn.Module]:
    """ResNet-34 in torchvision's layout (3-4-6-3 basic blocks); 21,284,672 parameters without
    the ``fc``. Takes torchvision's ImageNet weights."""
    return imagenet_resnet_stages("resnet34", input_shape, widths, (3, 4, 6, 3))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


@BACKBONES.register("segnet")
def segnet_stages(input_shape: Sequence[int], widths: Sequence[int] = (16, 32)) -> list[nn.Module]:
    """Encoder stages ``(Conv3x3-BN-ReLU) x 2 -> MaxPool2``, then mirrored decoder stages
    ``Upsample x2 -> (Conv3x3-BN-ReLU) x 2`` back to the input resolution (``widths[0]``
    channels). ``H`` and ``W`` must be divisible by ``2 ** len(widths)``."""
    widths = check_widths("segnet", widths)
    c, h, w = image_shape("segnet", input_shape)
    factor = 2 ** len(widths)
    if h % factor or w % factor:
        raise ValueError(
            f"backbone 'segnet' with {len(widths)} levels needs H and W divisible by {factor}, "
            f"got {h}x{w}; use fewer widths"
        )
    stages: list[nn.Module] = []
    for out in widths:
        stages.append(
            nn.Sequential(*_conv_bn_relu(c, out), *_conv_bn_relu(out, out), nn.MaxPool2d(2))
        )
        c = out
    for level in reversed(range(len(widths))):
        out = widths[max(level - 1, 0)]
        stages.append(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                *_conv_bn_relu(c, out),
                *_conv_bn_relu(out, out),
            )
        )
        c = out
    return stages


def build_backbone(
    name: str,
    input_shape: Sequence[int],
    widths: Sequence[int] | None = None,
    weights: str | Path | None = None,
) -> Backbone:
    """The registered backbone ``name`` (``BACKBONES.available()``) for inputs of
    ``input_shape``, with its default widths unless ``widths`` is given, and the weights in the
    file ``weights`` if given."""
    factory = BACKBONES.factory(name)
    stages = factory(input_shape) if widths is None else factory(input_shape, widths)
    key = name.strip().lower().replace("-", "_")
    backbone = Backbone(stages, input_shape, flattens_input=key == "mlp", name=key)
    if weights is not None:
        backbone.load_weights(weights)
    return backbone


# -------------------------------------------------------------- the original encoder classes
class MLPEncoder(Backbone):
    """The ``mlp`` backbone: ``Flatten``, then ``Linear -> ReLU`` for each hidden width."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__(
            mlp_stages(input_shape, hidden), input_shape, flattens_input=True, name="mlp"
        )


class CNNEncoder(Backbone):
    """The ``cnn`` backbone: ``Conv3x3 -> ReLU (-> MaxPool2)`` blocks, global average pooling."""

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64)) -> None:
        super().__init__(cnn_stages(input_shape, channels), input_shape, name="cnn")


def build_encoder(
    name: str, input_shape: Sequence[int], widths: Sequence[int] | None = None
) -> Backbone:
    """``build_backbone`` without weights (kept for existing callers)."""
    return build_backbone(name, input_shape, widths)


def encoder_output_features(encoder: nn.Module, input_shape: Sequence[int]) -> int:
    """The width of the encoder's flat output, read from ``out_features`` or by a dry run."""
    width = getattr(encoder, "out_features", None)
    if isinstance(width, int):
        return width
    with torch.no_grad():
        return int(encoder(torch.zeros(1, *input_shape)).reshape(1, -1).shape[1])
