"""Multi-task architectures, by registered name.

A registered architecture is a builder ``(input_shape, task_outputs, multi_input, **args) ->
nn.Module``; the model maps inputs to ``{task: output}`` and offers ``shared_parameters()`` and
``task_parameters(task)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mtlkit.architectures.backbones import (
    CNNEncoder,
    MLPEncoder,
    build_encoder,
    encoder_output_features,
)
from mtlkit.architectures.hps import HPS
from mtlkit.registry import Registry

ARCHITECTURES: Registry[nn.Module] = Registry("architecture")


@ARCHITECTURES.register("hps")
def hps(
    input_shape: Sequence[int],
    task_outputs: Mapping[str, int],
    multi_input: bool = False,
    backbone: str = "mlp",
    widths: list[int] | None = None,
) -> HPS:
    """Hard parameter sharing: a ``backbone`` encoder (``mlp`` or ``cnn``, hidden ``widths``)
    and one linear head per task with ``task_outputs[task]`` outputs."""
    encoder = build_encoder(backbone, input_shape, widths)
    width = encoder_output_features(encoder, input_shape)
    heads = {task: nn.Linear(width, size) for task, size in task_outputs.items()}
    return HPS(encoder, heads, multi_input=multi_input)


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
    "HPS",
    "CNNEncoder",
    "MLPEncoder",
    "build",
    "build_encoder",
    "hps",
]
