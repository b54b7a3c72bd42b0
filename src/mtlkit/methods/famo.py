"""FAMO: fast adaptive multitask optimisation, a log-loss weighting updated after each step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.methods.base import WeightedLoss
from mtlkit.methods.registry import METHODS
from mtlkit.methods.weighting import TaskStateWeighting, checked_losses, require_above

F64 = torch.float64


@METHODS.register("famo")
class FAMO(TaskStateWeighting):
    """Fast adaptive multitask optimisation (Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive
    Multitask Optimization", NeurIPS 2023; official code ``Cranial-XIX/FAMO``).

    Task logits ``ξ`` (0 at the start) give ``z = softmax(ξ)``. With ``D_i = L_i - ℓ_i + ε``,
    where ``ℓ_i`` is a known lower bound of task ``i``'s loss (``min_loss``), the model takes a
    step on ``Σ_i z_i log D_i / c`` with ``c = Σ_i z_i / D_i`` (a constant), whose
    gradient-equivalent weights are returned (detached, on the simplex)::

        w_i = (z_i / D_i) / Σ_j (z_j / D_j).

    After the step, from the losses ``L'`` recomputed on the same batch (``after_step``; the
    strategies do this because ``needs_losses_after`` is true), the logits move against the
    tasks whose log loss fell the most::

        δ_i = log D_i - log D'_i,    g = (diag(z) - z zᵀ) δ  (= ∂z/∂ξᵀ δ),

    and ``g`` is the gradient of one step of the method's own Adam optimiser on ``ξ``, with
    learning rate ``lr`` and (L2) weight decay ``weight_decay`` (the paper's ``β`` and ``γ``).
    ``ξ``, the Adam state and the losses awaiting ``after_step`` are saved by ``state_dict``;
    ``ξ`` is not returned by ``parameters()`` (the model's optimizer never sees it).

    Losses that can be ``≤ 0``: FAMO works on ``log(L - ℓ)``, which needs every loss above its
    lower bound. Give the bound as ``min_loss`` (the paper assumes 0, the default); a loss
    ``≤ min_loss`` raises a :class:`~mtlkit.errors.ConfigError` (a ``ValueError``) naming the
    task, instead of silently producing NaN or infinite weights. The official code's gradient
    clipping (``max_norm=1``) belongs to the training loop, not to the weighting, and is not done
    here.

    Args:
        lr: learning rate of the logits' Adam (0.025 in the paper).
        weight_decay: its weight decay ``γ`` (1e-3 here; the paper tunes it per benchmark).
        min_loss: the lower bound ``ℓ`` of the losses, one number or one per task.
        eps: ``ε ≥ 0`` added inside the logs (1e-8, as in the official code).
        num_tasks: number of tasks; if ``None``, set by ``setup`` or by the first call.
    """

    needs_losses_after = True
    size_key = "logits"

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_loss: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
            if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
                bound = "> 0" if name == "lr" else ">= 0"
                raise ValueError(f"{name} must be {bound} and finite, got {value}")
        bounds = [min_loss] if isinstance(min_loss, (int, float)) else list(min_loss)
        if not bounds or not all(math.isfinite(float(b)) for b in bounds):
            raise ValueError(f"min_loss must be a finite number or one per task, got {min_loss!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.min_loss: float | list[float] = (
            float(min_loss) if isinstance(min_loss, (int, float)) else [float(b) for b in bounds]
        )
        self.eps = float(eps)
        self._optimizer: torch.optim.Adam | None = None
        if num_tasks is not None:
            self.setup(num_tasks)

    # ------------------------------------------------------------------ state
    def init_state(self, num_tasks: int) -> None:
        if isinstance(self.min_loss, list) and len(self.min_loss) != num_tasks:
            raise ValueError(f"FAMO got {len(self.min_loss)} min_loss values for {num_tasks} tasks")
        bounds = torch.as_tensor(self.min_loss, dtype=F64).expand(num_tasks).clone()
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("lower_bounds", bounds)
        self.register_buffer("previous", torch.zeros(num_tasks, dtype=F64))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self._optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Adam:
        return torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.weight_decay)

    def reset_state(self) -> None:
        self.logits.zero_()
        self.previous.zero_()
        self.has_previous.fill_(False)
        self._optimizer = self._make_optimizer()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FAMO:
        """Moving or casting the module replaces the logits tensor: rebuild the optimizer on the
        new one, with its state carried over (``Adam.load_state_dict`` casts it)."""
        saved = None if self._optimizer is None else self._optimizer.state_dict()
        super()._apply(fn, recurse)
        if saved is not None:
            self._optimizer = self._make_optimizer()
            self._optimizer.load_state_dict(saved)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": None if self._optimizer is None else self._optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["optimizer"] is not None:
            if self._optimizer is None:
                raise RuntimeError("FAMO: load a state dict with its logits, or call setup first")
            self._optimizer.load_state_dict(state["optimizer"])

    # ------------------------------------------------------------------ update
    def _log_gaps(self, values: Tensor) -> Tensor:
        """``log(L - ℓ + ε)`` in float64, after checking ``L > ℓ``."""
        values = values.to(F64)
        bounds = self.lower_bounds.to(values.device)
        require_above(
            values,
            bounds,
            self,
            "FAMO takes log(L - min_loss): set min_loss to a lower bound of the losses (for a "
            "loss that can be 0 or negative, a value below its minimum).",
        )
        return (values - bounds + self.eps).log()

    def probabilities(self) -> Tensor:
        """``z = softmax(ξ)`` (float64)."""
        return torch.softmax(self.logits.to(F64), dim=0)

    def forward(self, losses: Tensor) -> WeightedLoss:
        values = self.task_values(losses)
        ratio = self.probabilities() / self._log_gaps(values).exp()
        self.previous.copy_(values)
        self.has_previous.fill_(True)
        return WeightedLoss((ratio / ratio.sum()).to(losses.dtype))

    def after_step(self, losses_after: Tensor | None) -> None:
        if losses_after is None:
            raise ValueError(
                "FAMO updates its logits from the losses after the step: call "
                "after_step(losses_after) with the task losses recomputed on the same batch "
                "(the strategies do, since needs_losses_after is true)"
            )
        if self.num_tasks is None or not bool(self.has_previous):
            raise RuntimeError("FAMO.after_step needs a forward call on the step's losses first")
        after = checked_losses(losses_after, self)
        if after.numel() != self.num_tasks:
            raise ValueError(f"FAMO was set up for {self.num_tasks} tasks, got {after.numel()}")
        decrease = self._log_gaps(self.previous) - self._log_gaps(after)
        z = self.probabilities()
        gradient = z * (decrease - (z * decrease).sum())
        assert self._optimizer is not None
        self.logits.grad = gradient.to(self.logits.dtype)
        self._optimizer.step()
        self.logits.grad = None
        self.has_previous.fill_(False)
