"""Preference-conditioned models: the input conditioning of COSMOS.

Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective Learning" (ICDM
2021, Section 4): the preference ray ``r`` (``[m]``, one per batch) is appended to every input,
so that one network represents the solutions for every ray. Tabular inputs ``[B, D]`` get ``r``
as ``m`` more features (``[B, D + m]``). Images ``[B, C, H, W]`` get ``m`` more channels made
from ``r`` by the authors' small transposed-CNN upsampler (``ConvTranspose2d(m, m, 4)``, ReLU,
``ConvTranspose2d(m, m, 6, stride=2, padding=1)``, ReLU, nearest upsampling to ``H x W``; no
biases), trained with the model. The ray comes from a
:class:`~mtlkit.methods.conditioning.PreferenceChannel` shared with the method that draws it
(:class:`~mtlkit.methods.cosmos.COSMOS`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.methods.conditioning import PreferenceChannel


def conditioned_input_shape(input_shape: Sequence[int], num_tasks: int) -> tuple[int, ...]:
    """The input shape of the model inside the conditioning: ``(D + m,)`` or ``(C + m, H, W)``.

    Raises:
        ConfigError: for an input that is neither a vector nor an image.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (1, 3):
        raise ConfigError(
            f"preference conditioning (COSMOS) appends the ray to a vector input [D] or to an "
            f"image [C, H, W] as channels; this problem's input has shape {list(shape)}"
        )
    return (shape[0] + num_tasks, *shape[1:])


class PreferenceConditioned(nn.Module):
    """A multi-task model whose input is extended by the current preference ray.

    Args:
        model: the multi-task model, built for :func:`conditioned_input_shape` (``forward(x,
            task=None, return_features=False)``, ``shared_parameters()``,
            ``task_parameters(task)``).
        channel: where the ray is read (:meth:`PreferenceChannel.current`, given the model's
            training mode).
        input_shape: the problem's input shape (without the ray).

    The upsampler of image inputs is shared: it is part of ``shared_parameters()``.
    """

    def __init__(
        self, model: nn.Module, channel: PreferenceChannel, input_shape: Sequence[int]
    ) -> None:
        super().__init__()
        if getattr(model, "multi_input", False):
            raise ConfigError(
                "preference conditioning (COSMOS) needs a single-input problem: one ray for "
                "the batch every task reads"
            )
        m = channel.num_tasks
        conditioned_input_shape(input_shape, m)
        self.model = model
        self.channel = channel
        self.input_shape = tuple(int(s) for s in input_shape)
        self.multi_input = False
        self.upsampler: nn.Module | None = None
        if len(self.input_shape) == 3:
            self.upsampler = nn.Sequential(
                nn.ConvTranspose2d(m, m, kernel_size=4, stride=1, padding=0, bias=False),
                nn.ReLU(),
                nn.ConvTranspose2d(m, m, kernel_size=6, stride=2, padding=1, bias=False),
                nn.ReLU(),
                nn.Upsample(size=self.input_shape[1:]),
            )

    @property
    def has_shared_representation(self) -> bool:
        return bool(getattr(self.model, "has_shared_representation", False))

    @property
    def task_names(self) -> list[str]:
        return list(self.model.task_names)

    def condition(self, x: Tensor) -> Tensor:
        """``x`` with the current ray appended (as features or channels)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected inputs of shape [B, {', '.join(map(str, self.input_shape))}], got "
                f"{list(x.shape)}"
            )
        ray = self.channel.current(self.training).to(dtype=x.dtype, device=x.device)
        rays = ray.expand(x.shape[0], -1)
        if self.upsampler is None:
            return torch.cat([x, rays], dim=1)
        planes = self.upsampler(rays.reshape(x.shape[0], -1, 1, 1))
        return torch.cat([x, planes], dim=1)

    def forward(self, x: Tensor, task: str | None = None, return_features: bool = False) -> Any:
        return self.model(self.condition(x), task=task, return_features=return_features)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        own = self.upsampler.parameters() if self.upsampler is not None else iter(())
        return chain(own, self.model.shared_parameters())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.model.task_parameters(task)

    # The optional hooks the Trainer calls on its model, passed on to the wrapped one (LTB's
    # and Maximum Roaming's schedules, DSelect-k's gate regularisers), or None without them.
    def auxiliary_losses(self) -> Any:
        return self._inner_hook("auxiliary_losses")

    def on_train_step(self, step: int) -> Any:
        return self._inner_hook("on_train_step", step)

    def on_epoch_end(self, epoch: int) -> Any:
        return self._inner_hook("on_epoch_end", epoch)

    def _inner_hook(self, name: str, *args: Any) -> Any:
        hook = getattr(self.model, name, None)
        return hook(*args) if callable(hook) else None
