"""Weights files for backbones, read without running code and without torchvision.

:func:`load_weights_file` (what ``Backbone.load_weights`` and ``weights=FILE`` call) reads a file
with ``torch.load(weights_only=True)`` and takes either

* a ``state_dict`` of the backbone itself (``torch.save(backbone.state_dict(), path)``), or
* a torchvision ResNet ``state_dict`` (the ImageNet ``.pth`` files users have, e.g.
  ``resnet18-f37072fd.pth``, or ``torch.save(torchvision_model.state_dict(), path)``), whose keys
  are renamed onto the ``resnet18``/``resnet34`` backbones (:func:`torchvision_resnet_names`);
  the 1000-class ``fc`` is left out.

Every key of the file must have its place in the backbone with the same shape, and every
parameter and buffer of the (ResNet part of the) backbone must be in the file (batch-norm
``num_batches_tracked`` counters may be absent); otherwise one ``ValueError`` names the file and
the missing keys, unexpected keys and shape mismatches. The backbones live in
:mod:`mtlkit.architectures.backbones`; functions here take a ``Backbone`` (anything with
``stages``, ``name`` and ``pretrained``) so that that module can import this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlkit.architectures.residual import BasicBlock

__all__ = [
    "TORCHVISION_CLASSIFIER",
    "is_torchvision_resnet",
    "load_torchvision_resnet",
    "load_weights_file",
    "read_state_dict",
    "resnet_layout",
    "torchvision_resnet_names",
]

TORCHVISION_CLASSIFIER = ("fc.weight", "fc.bias")
"""The keys of torchvision's classifier, which a backbone has no place for."""

SHOWN = 5
"""How many keys of each kind an error message lists."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict`` saved in ``path``, read with ``weights_only=True`` (no code runs).

    Raises:
        ValueError: if the file does not exist, cannot be read, or holds something else than a
            mapping from names to tensors (a checkpoint with a ``state_dict`` entry is named as
            such).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"backbone weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip errors come in many types; re-raised with the file
        raise ValueError(f"cannot read backbone weights {str(path)!r}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(
            f"backbone weights {str(path)!r} hold a {type(state).__name__}, expected a "
            "state_dict (a mapping from parameter names to tensors)"
        )
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        hint = (
            "; it looks like a training checkpoint: save its 'state_dict' entry alone"
            if "state_dict" in state
            else ""
        )
        raise ValueError(
            f"backbone weights {str(path)!r} are not a state_dict: entries "
            f"{not_tensors[:SHOWN]} are not tensors{hint}"
        )
    return state


def load_weights_file(backbone: nn.Module, path: str | Path) -> None:
    """Load the weights in ``path`` into ``backbone``: its own ``state_dict`` or a torchvision
    ResNet's (see the module docstring). Marks the backbone ``pretrained``.

    Raises:
        ValueError: naming the file and what does not fit.
    """
    state = read_state_dict(path)
    if is_torchvision_resnet(state):
        load_torchvision_resnet(backbone, state, source=str(path))
        return
    own = {key: key for key in backbone.state_dict()}
    _load_renamed(backbone, state, own, str(path))


def is_torchvision_resnet(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` is laid out like a torchvision ResNet's ``state_dict`` (a ``conv1``
    stem and ``layer1`` blocks); a backbone's own keys start with ``stages.``."""
    return "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


def torchvision_resnet_names(backbone: nn.Module) -> dict[str, str]:
    """``{torchvision name: backbone name}`` for every parameter and buffer of a ResNet backbone
    of :class:`BasicBlock` stages (``resnet18``, ``resnet34``; also the small ``resnet``, whose
    3x3 stem then does not fit): the convolution and batch norm before stage 0's first block are
    ``conv1`` and ``bn1``; block ``b`` of stage ``j`` is ``layer{j+1}.{b}`` with ``conv1``,
    ``bn1``, ``conv2``, ``bn2`` and, if it changes the shape, ``downsample.0`` and ``.1``.
    Modules that are no part of the ResNet (say a neck) get no name.

    Raises:
        ValueError: if the backbone has no basic blocks, or its stem is not one convolution and
            one batch norm.
    """
    conv1, bn1 = _stem(backbone)
    pairs: list[tuple[str, nn.Module]] = [("conv1", conv1), ("bn1", bn1)]
    for j, stage in enumerate(backbone.stages):
        blocks = [m for m in stage.modules() if isinstance(m, BasicBlock)]
        for b, block in enumerate(blocks):
            prefix = f"layer{j + 1}.{b}"
            pairs += [
                (f"{prefix}.conv1", block.body[0]),
                (f"{prefix}.bn1", block.body[1]),
                (f"{prefix}.conv2", block.body[3]),
                (f"{prefix}.bn2", block.body[4]),
            ]
            if isinstance(block.shortcut, nn.Sequential):
                pairs += [
                    (f"{prefix}.downsample.0", block.shortcut[0]),
                    (f"{prefix}.downsample.1", block.shortcut[1]),
                ]
    where = {id(m): name for name, m in backbone.named_modules()}
    return {
        f"{tv}.{key}": f"{where[id(module)]}.{key}"
        for tv, module in pairs
        for key in module.state_dict()
    }


def _stem(backbone: nn.Module) -> list[nn.Module]:
    """The ``[Conv2d, BatchNorm2d]`` before the first basic block of stage 0."""
    stem: list[nn.Module] = []
    has_blocks = any(isinstance(m, BasicBlock) for m in backbone.modules())
    for m in backbone.stages[0].modules():
        if isinstance(m, BasicBlock):
            break
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d):
            stem.append(m)
    if not has_blocks or [type(m) for m in stem] != [nn.Conv2d, nn.BatchNorm2d]:
        what = "no conv1 + bn1 stem" if has_blocks else "no basic blocks"
        raise ValueError(
            f"torchvision ResNet weights need a ResNet backbone of basic blocks (resnet18, "
            f"resnet34); the {backbone.name!r} backbone has {what}"
        )
    return stem


def load_torchvision_resnet(
    backbone: nn.Module, weights: str | Path | Mapping[str, Tensor], source: str | None = None
) -> None:
    """Load a torchvision ResNet ``state_dict`` (a file or a mapping) into ``backbone`` by
    renaming its keys (:func:`torchvision_resnet_names`), leaving out the ``fc`` classifier.
    Marks the backbone ``pretrained``.

    Raises:
        ValueError: naming the missing and unexpected keys and the shape mismatches: a
            ResNet-50 file has unexpected ``conv3``/``bn3`` keys and ``1x1`` ``conv1`` kernels;
            a ResNet-34 file in ``resnet18`` has unexpected ``layer1.2`` ... keys.
    """
    if isinstance(weights, Mapping):
        state, source = dict(weights), source or "<state_dict>"
    else:
        state, source = read_state_dict(weights), source or str(weights)
    given = {k: v for k, v in state.items() if k not in TORCHVISION_CLASSIFIER}
    names = torchvision_resnet_names(backbone)
    theirs, ours = resnet_layout(given), resnet_layout(names)
    hint = "" if theirs == ours else f" (the file is a ResNet of {theirs}, the backbone of {ours})"
    _load_renamed(backbone, given, names, source, hint)


def resnet_layout(keys: Iterable[str]) -> str:
    """``"basic blocks 2-2-2-2"`` or ``"bottleneck blocks 3-4-6-3"`` (ResNet-50) from the keys
    of a torchvision-layout ``state_dict``: blocks per ``layerN``, bottleneck if any has a
    ``conv3``."""
    counts: dict[int, int] = {}
    bottleneck = False
    for key in keys:
        parts = key.split(".")
        if len(parts) > 2 and parts[0].startswith("layer") and parts[0][5:].isdigit():
            layer, block = int(parts[0][5:]), parts[1]
            if block.isdigit():
                counts[layer] = max(counts.get(layer, 0), int(block) + 1)
            bottleneck = bottleneck or parts[2] == "conv3"
    kind = "bottleneck blocks" if bottleneck else "basic blocks"
    return f"{kind} " + "-".join(str(counts[layer]) for layer in sorted(counts))


def _load_renamed(
    backbone: nn.Module,
    given: Mapping[str, Tensor],
    names: Mapping[str, str],
    source: str,
    hint: str = "",
) -> None:
    """Load ``given[key]`` into the backbone's ``names[key]`` after checking that the keys
    match both ways (counters excepted) and every shape fits."""
    target = backbone.state_dict()
    missing = sorted(
        key for key in names if key not in given and not key.endswith(".num_batches_tracked")
    )
    unexpected = sorted(key for key in given if key not in names)
    shapes = [
        f"{key}: file {list(value.shape)} vs backbone {list(target[names[key]].shape)}"
        for key, value in given.items()
        if key in names and value.shape != target[names[key]].shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            problems.append(f"{len(items)} {label} {items[:SHOWN]}{more}")
    if problems:
        raise ValueError(
            f"backbone weights {source!r} do not fit the {backbone.name!r} backbone{hint}: "
            + "; ".join(problems)
        )
    # checked above: every key has its place and fits, so strict=False only spares what the
    # file need not hold (counters, stages that are no part of a ResNet)
    backbone.load_state_dict({names[k]: v for k, v in given.items()}, strict=False)
    backbone.pretrained = True
