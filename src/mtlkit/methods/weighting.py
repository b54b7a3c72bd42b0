"""Static and learnable loss weightings: the update is the gradient of ``Σ_i w_i L_i (+ extra)``.

* static: :class:`EW` (equal), :class:`LS` (given weights);
* learnable, trained by the model's optimizer (``parameters()``): :class:`UW` (uncertainty),
  :class:`IMTLL` (IMTL-L loss scales);
* non-linear scalarisations, expressed by their gradient-equivalent weights ``w_i = ∂F/∂L_i``
  (detached, so ``Σ_i w_i L_i`` has exactly the gradient of ``F``): :class:`GLS` (geometric
  mean), :class:`SI` (sum of log losses).

Also the shared pieces of the stateful loss weightings (:class:`TaskStateWeighting`, and
:func:`checked_losses` / :func:`require_above` for the input checks); the history-based ones are
in :mod:`mtlkit.methods.history`, RLW in :mod:`mtlkit.methods.random_weighting`, STCH in
:mod:`mtlkit.methods.stch`, FAMO in :mod:`mtlkit.methods.famo`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.base import LossWeighting, WeightedLoss, check_losses
from mtlkit.methods.registry import METHODS


def checked_losses(losses: Tensor, method: object) -> Tensor:
    """``losses`` detached, after checking that it is a 1-D tensor of finite task losses.

    Raises:
        ValueError: if ``losses`` is not ``[m]`` with ``m ≥ 1``.
        NonFiniteError: naming the first task whose loss is NaN or infinite.
    """
    check_losses(losses)
    values = losses.detach()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise NonFiniteError(
            f"{type(method).__name__} got a non-finite loss for task {bad}: {float(values[bad])}"
        )
    return values


def require_above(values: Tensor, bound: Tensor | float, method: object, hint: str) -> None:
    """Raise :class:`~mtlkit.errors.ConfigError` (a ``ValueError``) naming the first task whose
    loss is not strictly above ``bound`` (a number or one per task); ``hint`` says what to do."""
    bound = torch.as_tensor(bound, dtype=values.dtype, device=values.device)
    bad = values <= bound
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        limit = float(bound.expand_as(values)[i])
        raise ConfigError(
            f"{type(method).__name__} needs every task loss > {limit:g}; task {i} has loss "
            f"{float(values[i]):g}. {hint}"
        )


def require_nonnegative(values: Tensor, method: object) -> None:
    """Raise :class:`~mtlkit.errors.ConfigError` naming the first task whose loss is negative:
    for the methods that learn a scale per task against a log term (UW, IMTL-L), whose
    objective then has no minimum (the scale runs off to infinity and the weight with it)."""
    bad = values < 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ConfigError(
            f"{type(method).__name__} needs task losses >= 0; task {i} has loss "
            f"{float(values[i]):g}, for which its objective is unbounded below (the learned "
            "scale of that task runs off to infinity). Use losses that are >= 0 (e.g. not a loss "
            "shifted by a constant), or another method."
        )


POSITIVE_HINT = (
    "It takes the log of the losses: use losses that are > 0 (e.g. not a loss shifted by a "
    "constant), or another method."
)


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

    def forward(self, losses: Tensor) -> WeightedLoss:
        check_losses(losses)
        value = 1.0 if self.reduction == "sum" else 1.0 / losses.numel()
        return WeightedLoss(torch.full_like(losses, value, requires_grad=False).detach())


@METHODS.register("ls")
class LS(LossWeighting):
    """Linear scalarisation with given weights: ``Σ_i c_i L_i``.

    The classic weighted-sum baseline (e.g. the "LS" of Navon et al., ICML 2022, and of Liu et
    al.'s FAMO code); with every ``c_i = 1`` it is :class:`EW`.

    Args:
        weights: ``c_i ≥ 0`` (finite, at least one positive), one per task; ``None`` means all
            ones. The number of tasks is checked against the losses (and by ``setup``).
    """

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if weights is not None:
            values = [float(w) for w in weights]
            if not values:
                raise ValueError("weights is empty: give one weight per task")
            if not all(math.isfinite(w) and w >= 0 for w in values) or not any(values):
                raise ValueError(
                    f"weights must be finite and >= 0 with at least one > 0, got {values}"
                )
            self.weights: list[float] | None = values
        else:
            self.weights = None

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self._check_count(num_tasks)

    def _check_count(self, num_tasks: int) -> None:
        if self.weights is not None and len(self.weights) != num_tasks:
            raise ValueError(f"LS has {len(self.weights)} weights for {num_tasks} tasks")

    def forward(self, losses: Tensor) -> WeightedLoss:
        check_losses(losses)
        self._check_count(losses.numel())
        if self.weights is None:
            return WeightedLoss(torch.ones_like(losses).detach())
        return WeightedLoss(torch.tensor(self.weights, dtype=losses.dtype, device=losses.device))


class TaskStateWeighting(LossWeighting):
    """Base of the loss weightings with one entry of state per task.

    The state is created by ``setup(m)`` (the strategies call it; a ``num_tasks`` constructor
    argument calls it at once) or, for the methods without learnable parameters (``lazy``), at
    the first call, on the device of the losses. Subclasses implement ``init_state(m)`` (register
    buffers and parameters at their initial values) and ``reset_state()`` (put them back in
    place, so that optimizers keep referring to the same parameters and the device is kept).
    ``size_key`` names a state tensor whose first dimension is ``m``: loading a state dict into a
    method that is not set up yet sets it up first.
    """

    size_key: ClassVar[str]
    lazy: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.num_tasks: int | None = None

    def setup(self, num_tasks: int) -> None:
        if self.num_tasks is not None:
            if num_tasks != self.num_tasks:
                raise ValueError(
                    f"{type(self).__name__} was set up for {self.num_tasks} tasks, now asked for "
                    f"{num_tasks}"
                )
            return
        super().setup(num_tasks)
        self.init_state(num_tasks)

    def init_state(self, num_tasks: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset_state(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        if self.num_tasks is not None:
            self.reset_state()

    def task_values(self, losses: Tensor) -> Tensor:
        """The checked, detached losses (see :func:`checked_losses`); sets the method up on first
        use when it is ``lazy`` and checks the number of tasks otherwise."""
        values = checked_losses(losses, self)
        m = values.numel()
        if self.num_tasks is None:
            if not self.lazy:
                raise RuntimeError(
                    f"{type(self).__name__} has learnable parameters, which must exist before the "
                    f"optimizer is built: pass num_tasks={m} or call setup({m}) first"
                )
            self.setup(m)
            self.to(values.device)
        elif m != self.num_tasks:
            raise ValueError(
                f"{type(self).__name__} was set up for {self.num_tasks} tasks, got {m} losses"
            )
        return values

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool, *args: Any
    ) -> None:
        key = prefix + self.size_key
        if self.num_tasks is None and key in state_dict:
            self.setup(int(state_dict[key].shape[0]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)


UncertaintyForm = Literal["regression", "classification"]


@METHODS.register("uw")
class UW(LossWeighting):
    """Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    Learns ``s_i = log σ_i²`` per task (initialised to ``init``) and minimises
    ``Σ_i c_i exp(-s_i) L_i + s_i / 2``, with ``c_i = 1/2`` for a regression task (Gaussian
    likelihood, eq. 7 of the paper: ``L/(2σ²) + log σ``) and ``c_i = 1`` for a classification
    task (softmax likelihood with temperature, eq. 10: ``L/σ² + log σ``). The weights
    ``w_i = c_i exp(-s_i)`` carry gradient to ``s``, which is trained by the same optimizer as the
    model (it is returned by ``parameters()``). For fixed losses the optimum is
    ``s_i = log(2 c_i L_i)``: ``log L_i`` (regression), ``log 2 L_i`` (classification).

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
        require_nonnegative(losses.detach(), self)
        log_vars = self.log_vars.to(losses.dtype)
        weights = self.scale.to(losses.dtype) * torch.exp(-log_vars)
        return WeightedLoss(weights, 0.5 * log_vars.sum())


@METHODS.register("imtl_l")
class IMTLL(TaskStateWeighting):
    """IMTL-L, the loss-balancing half of impartial multi-task learning (Liu et al., "Towards
    Impartial Multi-task Learning", ICLR 2021).

    Learns a scale ``s_i`` per task (initialised to ``init``) and minimises::

        Σ_i e^{s_i} L_i - s_i,

    so the effective weight is ``w_i = e^{s_i}`` (it carries gradient to ``s``). For fixed losses
    the optimum is ``e^{s_i} L_i = 1``, i.e. ``s_i = -log L_i``: every scaled loss is driven
    to 1, whatever the scale of the raw loss. ``s`` is trained by the model's optimizer (returned
    by ``parameters()``), as in the paper.

    Args:
        init: initial value of every ``s_i`` (0: weights 1).
        num_tasks: number of tasks; if ``None`` it is set by ``setup`` (the Trainer calls it).
    """

    size_key = "log_scales"
    lazy = False

    def __init__(self, init: float = 0.0, num_tasks: int | None = None) -> None:
        super().__init__()
        if not math.isfinite(init):
            raise ValueError(f"init must be finite, got {init}")
        self.init = float(init)
        if num_tasks is not None:
            self.setup(num_tasks)

    def init_state(self, num_tasks: int) -> None:
        self.log_scales = nn.Parameter(torch.full((num_tasks,), self.init))

    def reset_state(self) -> None:
        with torch.no_grad():
            self.log_scales.fill_(self.init)

    def forward(self, losses: Tensor) -> WeightedLoss:
        require_nonnegative(self.task_values(losses), self)
        scales = self.log_scales.to(losses.dtype)
        return WeightedLoss(torch.exp(scales), -scales.sum())


@METHODS.register("gls")
class GLS(LossWeighting):
    """Geometric loss strategy (Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation
    and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019).

    The objective is the geometric mean of the losses, ``F = (Π_i L_i)^{1/m}``, whose gradient
    is ``∇F = Σ_i F / (m L_i) ∇L_i``. The returned weights are these gradient-equivalent
    weights, detached::

        w_i = F / (m L_i),

    so ``Σ_i w_i L_i`` has exactly the gradient of ``F`` (and its value, ``F``). Computed in log
    space (``F = exp(mean_i log L_i)``), so that many tasks do not overflow the product.

    Raises:
        ConfigError: (a ``ValueError``) if a loss is ``≤ 0``, where the geometric mean has no
            gradient.
    """

    def forward(self, losses: Tensor) -> WeightedLoss:
        values = checked_losses(losses, self)
        require_above(values, 0.0, self, POSITIVE_HINT)
        logs = values.log()
        return WeightedLoss(torch.exp(logs.mean() - logs) / values.numel())


def log_loss_weights(values: Tensor) -> Tensor:
    """``1 / L_i``: the gradient-equivalent weights of ``Σ_i log L_i`` (``values > 0``)."""
    return values.reciprocal()


@METHODS.register("si")
class SI(LossWeighting):
    """Scale-invariant log losses: ``F = Σ_i log L_i`` (the "SI" baseline of Navon et al.,
    "Multi-Task Learning as a Bargaining Game", ICML 2022, and of LibMTL/FAMO).

    Multiplying a task's loss by a constant does not change the update. The returned weights
    are the gradient-equivalent ones, ``w_i = 1 / L_i`` (detached): ``Σ_i w_i L_i`` has the
    gradient of ``F`` (its value is ``m``, not ``F``).

    Raises:
        ConfigError: (a ``ValueError``) if a loss is ``≤ 0``.
    """

    def forward(self, losses: Tensor) -> WeightedLoss:
        values = checked_losses(losses, self)
        require_above(values, 0.0, self, POSITIVE_HINT)
        return WeightedLoss(log_loss_weights(values))
