"""Loss weightings: the update is the gradient of ``Σ_i w_i L_i (+ extra)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mtlkit.methods.base import LossWeighting, WeightedLoss, check_losses
from mtlkit.methods.registry import METHODS


@METHODS.register("ew")
class EW(LossWeighting):
    """Equal weighting: ``w_i = 1`` (``reduction="sum"``) or ``w_i = 1/m`` (``"mean"``).

    The averaged objective of Pascal et al. (2021), called SUS there; the usual MTL baseline.
    """

    def __init__(self, reduction: Literal["sum", "mean"] = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def hparams(self) -> dict[str, object]:
        return {"reduction": self.reduction}

    def forward(self, losses: Tensor) -> WeightedLoss:
        check_losses(losses)
        value = 1.0 if self.reduction == "sum" else 1.0 / losses.numel()
        return WeightedLoss(torch.full_like(losses, value, requires_grad=False).detach())


UncertaintyForm = Literal["regression", "classification"]


@METHODS.register("uw")
class UW(LossWeighting):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Learns ``s_i = log σ_i²`` per task (initialised to ``init``) and minimises
    ``Σ_i c_i exp(-s_i) L_i + s_i / 2``, with ``c_i = 1/2`` for a regression task (Gaussian
    likelihood, eq. 7 of the paper: ``L/(2σ²) + log σ``) and ``c_i = 1`` for a classification
    task (softmax likelihood with temperature, eq. 10: ``L/σ² + log σ``). The weights
    ``w_i = c_i exp(-s_i)`` carry gradient to ``s``, which is trained by the same optimizer as the
    model (it is returned by ``parameters()``).

    Args:
        num_tasks: number of tasks; if ``None`` it is set by ``setup`` (the Trainer calls it).
        forms: ``"regression"`` or ``"classification"``, for all tasks or one per task.
        init: initial value of every ``s_i``.
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        forms: UncertaintyForm | Sequence[UncertaintyForm] = "regression",
        init: float = 0.0,
    ) -> None:
        super().__init__()
        self.forms = forms
        self.init = float(init)
        self.log_vars: nn.Parameter | None = None
        if num_tasks is not None:
            self.setup(num_tasks)

    def hparams(self) -> dict[str, object]:
        return {"forms": self.forms, "init": self.init}

    def setup(self, num_tasks: int) -> None:
        if self.log_vars is not None:
            if self.log_vars.numel() != num_tasks:
                raise ValueError(
                    f"UW was set up for {self.log_vars.numel()} tasks, now asked for {num_tasks}"
                )
            return
        super().setup(num_tasks)
        forms = [self.forms] * num_tasks if isinstance(self.forms, str) else list(self.forms)
        if len(forms) != num_tasks:
            raise ValueError(f"UW got {len(forms)} forms for {num_tasks} tasks")
        bad = [f for f in forms if f not in ("regression", "classification")]
        if bad:
            raise ValueError(f"UW forms must be 'regression' or 'classification', got {bad}")
        scale = [0.5 if f == "regression" else 1.0 for f in forms]
        self.register_buffer("scale", torch.tensor(scale))
        self.log_vars = nn.Parameter(torch.full((num_tasks,), self.init))

    def reset(self) -> None:
        super().reset()
        if self.log_vars is not None:
            with torch.no_grad():
                self.log_vars.fill_(self.init)

    def forward(self, losses: Tensor) -> WeightedLoss:
        check_losses(losses)
        if self.log_vars is None:
            raise RuntimeError("UW needs num_tasks: pass UW(num_tasks=m) or call setup(m)")
        if losses.numel() != self.log_vars.numel():
            raise ValueError(
                f"UW was set up for {self.log_vars.numel()} tasks, got {losses.numel()} losses"
            )
        log_vars = self.log_vars.to(losses.dtype)
        weights = self.scale.to(losses.dtype) * torch.exp(-log_vars)
        return WeightedLoss(weights, 0.5 * log_vars.sum())
