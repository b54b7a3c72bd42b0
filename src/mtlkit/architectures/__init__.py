"""Multi-task architectures, by registered name.

A registered architecture is a builder ``(input_shape, task_outputs, multi_input, **args) ->
nn.Module``; most take ``backbone`` (``mlp``, ``cnn``, ``resnet``, ``segnet``: see
:mod:`mtlkit.architectures.backbones`), its ``widths`` and an optional ``weights`` file.

Registered: ``hps`` (hard parameter sharing), ``cross_stitch``, ``mmoe``, ``dselect_k``,
``mtan``, ``cgc``, ``ple``, ``ltb`` (Learning to Branch) and ``max_roaming`` (Maximum
Roaming); each module's docstring names its paper and says what is shared.

The model contract (what the Trainer, the strategies and :func:`mtlkit.backward` rely on):

* ``forward(x, task=None, return_features=False)`` returns ``{task: output}`` for every task;
  multi-input models (``multi_input = True``: one input per task) need ``task=`` and return
  that task's output only.
* ``shared_parameters()`` and ``task_parameters(task)`` partition the parameters: a task's
  parameters are those only its output depends on, so its loss never reaches another task's.
* ``has_shared_representation``: true when one tensor ``z`` feeds every head (only ``hps``
  here); only such models accept ``return_features=True`` (returning ``(outputs, z)``) and can
  be trained on the features route (``rep_grad``); the others raise a clear error, and the
  Trainer refuses ``rep_grad`` for them before training.

Optional hooks, called by the Trainer when a model defines them (no architecture-specific code
in the Trainer):

* ``auxiliary_losses() -> dict[str, Tensor]``: after each training forward pass, extra scalar
  terms per task that the Trainer adds to those tasks' losses (``dselect_k``: the entropy
  regulariser of each task's gate). Returned once, then forgotten by the model.
* ``on_train_step(step: int)``: after each optimizer step (``step`` counts them from 1);
  ``ltb`` anneals its Gumbel-softmax temperature, ``max_roaming`` updates its masks.
* ``on_epoch_end(epoch: int)``: after each epoch (``max_roaming`` with
  ``interval_unit="epochs"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mtlkit.architectures.backbones import (
    BACKBONES,
    Backbone,
    CNNEncoder,
    MLPEncoder,
    build_backbone,
    build_encoder,
    encoder_output_features,
)
from mtlkit.architectures.base import ARCHITECTURES, MultiTaskArchitecture, make_heads
from mtlkit.architectures.cross_stitch import CrossStitch
from mtlkit.architectures.hps import HPS
from mtlkit.architectures.lenet import multi_lenet
from mtlkit.architectures.ltb import LearningToBranch
from mtlkit.architectures.max_roaming import MaximumRoaming
from mtlkit.architectures.moe import DSelectK, MMoE
from mtlkit.architectures.mpnn import MPNNEncoder
from mtlkit.architectures.mtan import MTAN
from mtlkit.architectures.ple import PLE
from mtlkit.architectures.segnet import SegNet, SegNetMTAN


@ARCHITECTURES.register("hps")
def hps(
    input_shape: Sequence[int],
    task_outputs: Mapping[str, int],
    multi_input: bool = False,
    backbone: str = "mlp",
    widths: list[int] | None = None,
    weights: str | None = None,
) -> HPS:
    """Hard parameter sharing: a ``backbone`` encoder (hidden ``widths``, optional ``weights``
    file) and one head per task with ``task_outputs[task]`` outputs."""
    encoder = build_backbone(backbone, input_shape, widths, weights)
    return HPS(encoder, make_heads(encoder.out_shape, task_outputs), multi_input=multi_input)


def build(
    name: str,
    input_shape: Sequence[int],
    task_outputs: Mapping[str, int],
    multi_input: bool = False,
    **args: Any,
) -> nn.Module:
    """Build the architecture ``name`` for a problem (input shape, outputs per task)."""
    return ARCHITECTURES.get(
        name, input_shape=input_shape, task_outputs=task_outputs, multi_input=multi_input, **args
    )


__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "HPS",
    "MTAN",
    "PLE",
    "Backbone",
    "CNNEncoder",
    "CrossStitch",
    "DSelectK",
    "LearningToBranch",
    "MLPEncoder",
    "MMoE",
    "MPNNEncoder",
    "MaximumRoaming",
    "MultiTaskArchitecture",
    "SegNet",
    "SegNetMTAN",
    "build",
    "build_backbone",
    "build_encoder",
    "encoder_output_features",
    "hps",
    "multi_lenet",
]
