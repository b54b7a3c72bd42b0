"""MultiLeNet, the MultiMNIST / MultiFashion model of Sener & Koltun ("Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018; their code: ``multi_task/models/multi_lenet.py``,
``MultiLeNetR`` shared and ``MultiLeNetO`` per task).

Shared encoder (the ``lenet`` backbone, three stages), for a ``1 x 28 x 28`` input::

    conv 1->10 k5 -> max-pool 2 -> ReLU                      [10, 12, 12]
    conv 10->20 k5 -> channel dropout -> max-pool 2 -> ReLU  [20, 4, 4]
    flatten -> fc 320->50 -> ReLU                            [50]

and per task ``fc 50->50 -> ReLU -> dropout -> fc 50->10`` (logits; their ``log_softmax`` +
NLL is mtlkit's cross-entropy). Parameters: conv1 260, conv2 5,020, fc 16,050 (shared 21,330);
each head 2,550 + 510 = 3,060; two tasks 27,450 in all.

Differences from their code, both in how dropout is drawn (p = 0.5 in both places, as theirs):

* theirs multiplies by a 0/1 mask and does not rescale, so the activations at evaluation are
  twice their expected training value; here dropout is PyTorch's inverted dropout (kept units
  scaled by 2 in training, nothing at evaluation), the same model up to that factor;
* their channel mask after conv2 is one mask for the whole batch (shape ``[1, 20, 1, 1]``), drawn
  once per step and reused by MGDA's extra passes; here ``nn.Dropout2d`` draws one per sample.

``dropout=0`` gives the network without dropout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from mtlkit.architectures.backbones import BACKBONES, Backbone, check_widths, image_shape
from mtlkit.architectures.base import ARCHITECTURES
from mtlkit.architectures.hps import HPS

__all__ = ["lenet_stages", "multi_lenet", "multi_lenet_head"]

KERNEL = 5


def _check_dropout(dropout: float) -> float:
    if isinstance(dropout, bool) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


@BACKBONES.register("lenet")
def lenet_stages(
    input_shape: Sequence[int], widths: Sequence[int] = (10, 20, 50), dropout: float = 0.5
) -> list[nn.Module]:
    """Sener & Koltun's shared LeNet (``MultiLeNetR``): ``widths`` = (conv1 channels, conv2
    channels, fc units), default (10, 20, 50); ``dropout``: the channel dropout after conv2.

    Raises:
        ValueError: on widths that are not three positive numbers, or an image too small for
            two 5x5 convolutions and two poolings (at least 16 x 16).
    """
    widths = check_widths("lenet", widths)
    if len(widths) != 3:
        raise ValueError(
            f"backbone 'lenet' takes 3 widths (conv1, conv2, fc), got {len(widths)}: {widths}"
        )
    dropout = _check_dropout(dropout)
    c, h, w = image_shape("lenet", input_shape)
    if min(h, w) < 16:
        raise ValueError(f"backbone 'lenet' needs images of at least 16 x 16, got {h} x {w}")
    conv1, conv2, fc = widths
    side_h, side_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    second: list[nn.Module] = [nn.Conv2d(conv1, conv2, KERNEL)]
    if dropout:
        second.append(nn.Dropout2d(dropout))
    return [
        nn.Sequential(nn.Conv2d(c, conv1, KERNEL), nn.MaxPool2d(2), nn.ReLU()),
        nn.Sequential(*second, nn.MaxPool2d(2), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(conv2 * side_h * side_w, fc), nn.ReLU()),
    ]


def multi_lenet_head(features: int, hidden: int, outputs: int, dropout: float) -> nn.Sequential:
    """``MultiLeNetO``: ``fc features->hidden -> ReLU -> dropout -> fc hidden->outputs``."""
    layers: list[nn.Module] = [nn.Linear(features, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, outputs))


@ARCHITECTURES.register("multi_lenet")
def multi_lenet(
    input_shape: Sequence[int],
    task_outputs: Mapping[str, int],
    multi_input: bool = False,
    widths: list[int] | None = None,
    head_width: int = 50,
    dropout: float = 0.5,
) -> HPS:
    """Sener & Koltun's MultiLeNet: the ``lenet`` backbone (``widths``, default [10, 20, 50])
    shared, and per task ``fc -> ReLU -> dropout -> fc`` with ``head_width`` hidden units.
    ``dropout`` (0.5 as in their code) applies in both places; see the module docstring."""
    dropout = _check_dropout(dropout)
    if isinstance(head_width, bool) or not isinstance(head_width, int) or head_width < 1:
        raise ValueError(f"head_width must be an integer >= 1, got {head_width!r}")
    stages = lenet_stages(input_shape, (10, 20, 50) if widths is None else widths, dropout)
    encoder = Backbone(stages, input_shape, name="lenet")
    features = encoder.out_shape[0]
    heads = {
        task: multi_lenet_head(features, head_width, int(n), dropout)
        for task, n in task_outputs.items()
    }
    if not heads:
        raise ValueError("an architecture needs at least one task")
    return HPS(encoder, heads, multi_input=multi_input)
