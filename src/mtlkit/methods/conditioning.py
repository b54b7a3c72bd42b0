"""The preference a preference-conditioned model is given: one value shared by a method and a
model.

A method that trains one model for a whole front (:class:`~mtlkit.methods.cosmos.COSMOS`) draws
a preference ray ``r`` (on the simplex) before each step and the model
(:class:`~mtlkit.architectures.conditioned.PreferenceConditioned`) reads it on its forward pass:
both hold the same :class:`PreferenceChannel`. At evaluation, :meth:`PreferenceChannel.fixed`
sets the ray the model is asked for, e.g. each of the front's test rays in turn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

F64 = torch.float64


class PreferenceChannel:
    """The current preference ray of a preference-conditioned model.

    What the model reads (:meth:`current`): the ray set by :meth:`fixed` while it is in effect;
    otherwise, in training mode, the ray the method drew for the step (:meth:`draw_for_step`);
    otherwise (evaluation, or before the first draw) the centre ``(1/m, ..., 1/m)``, so that the
    Trainer's per-epoch validation and model selection use one fixed ray.

    Args:
        num_tasks: ``m``, the length of every ray.
        test_rays: the rays of the front the model is evaluated at after training (each ``[m]``,
            on the simplex).
    """

    def __init__(self, num_tasks: int, test_rays: Sequence[Sequence[float]] = ()) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.test_rays = [self.checked(ray) for ray in test_rays]
        self._drawn: Tensor | None = None
        self._fixed: Tensor | None = None

    def checked(self, ray: Sequence[float] | Tensor) -> Tensor:
        """``ray`` as a float64 ``[m]`` tensor on the simplex (normalised to sum 1).

        Raises:
            ValueError: if it has another length than ``m``, or entries that are negative, not
                finite, or all 0.
        """
        values = torch.as_tensor(ray, dtype=F64).detach().cpu().flatten()
        if values.numel() != self.num_tasks:
            raise ValueError(
                f"a preference ray needs {self.num_tasks} entries (one per task), got "
                f"{values.tolist()}"
            )
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()) or values.sum() <= 0:
            raise ValueError(
                f"a preference ray needs finite entries >= 0, not all 0; got {values.tolist()}"
            )
        return values / values.sum()

    def centre(self) -> Tensor:
        """``(1/m, ..., 1/m)``."""
        return torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=F64)

    def draw_for_step(self, ray: Tensor) -> None:
        """Set the ray of the coming training step (the method's draw)."""
        self._drawn = self.checked(ray)

    def clear(self) -> None:
        """Forget the drawn ray (the model gets the centre until the next draw)."""
        self._drawn = None

    def current(self, training: bool) -> Tensor:
        """The ray the model is given now (float64 ``[m]``)."""
        if self._fixed is not None:
            return self._fixed
        if training and self._drawn is not None:
            return self._drawn
        return self.centre()

    @contextmanager
    def fixed(self, ray: Sequence[float] | Tensor) -> Iterator[Tensor]:
        """Within the block, the model (in any mode) and the method use ``ray``."""
        previous = self._fixed
        self._fixed = self.checked(ray)
        try:
            yield self._fixed
        finally:
            self._fixed = previous
