"""Smoothing of the weights of any Gramian weighting across steps (CR-MOGM).

With stochastic mini-batch gradients, weights computed from the current gradients alone (MGDA,
PCGrad, CAGrad, ...) are correlated with the noise of those gradients, which biases the update;
averaging the weights over past steps removes that correlation. :class:`Smoothed` wraps any
:class:`~mtlkit.methods.base.GramianWeighting` and is one itself (the Gramian fast path stays).

(PCD, priority-constrained descent, keeps a moving average too, but of the gradients' squared
norms, to normalise them; it is a method of its own: :class:`mtlkit.methods.pcd.PCD`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.methods.base import GramianWeighting, check_gramian
from mtlkit.methods.float64_gramian import Float64GramianWeighting
from mtlkit.methods.registry import METHODS

SmoothingInit = Literal["first", "uniform"]


@METHODS.register("smoothed")
class Smoothed(Float64GramianWeighting):
    """Exponential moving average of the weights of an inner Gramian weighting: the
    correlation-reduced multi-objective gradient manipulation (CR-MOGM) of Zhou, Zhang, Jiang,
    Zhong, Gu & Zhu, "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
    Beyond", NeurIPS 2022.

    With ``λ̂_k = inner.weights(G_k)`` the inner method's weights at step ``k``::

        λ_k = β λ_{k-1} + (1 - β) λ̂_k,   d_k = Σ_i λ_{k,i} g_{k,i},

    started from ``λ_1 = λ̂_1`` (``init="first"``) or from ``λ_0 = (1/m, ..., 1/m)``
    (``init="uniform"``, torchjd's ``CRMOGMWeighting``). ``β = 0`` is the inner method itself.
    The paper's analysis lets the coefficient vary with the step; ``method.beta`` may be set
    between steps to follow such a schedule. The state (``λ_{k-1}`` and the step
    count) is saved by ``state_dict`` and cleared by ``reset`` (with the inner method's).

    Args:
        inner: the registered name of a Gramian weighting (``"mgda"``, ``"pcgrad"``, ...) or an
            instance of one.
        beta: ``β ∈ [0, 1)``, the weight of the past.
        inner_args: keyword arguments for the inner method when ``inner`` is a name.
        init: ``"first"`` or ``"uniform"``, see above.

    Example:
        ``Smoothed(MGDA(), beta=0.9)``, or ``methods.get("cr_mogm", inner="pcgrad",
        inner_args={"generator": 0})``.
    """

    def __init__(
        self,
        inner: str | GramianWeighting = "mgda",
        beta: float = 0.9,
        inner_args: Mapping[str, Any] | None = None,
        init: SmoothingInit = "first",
    ) -> None:
        super().__init__()
        if isinstance(inner, str):
            self.inner_name: str | None = inner
            inner = METHODS.get(inner, **dict(inner_args or {}))
        else:
            if inner_args:
                raise ValueError("inner_args is only for an inner method given by name")
            self.inner_name = None
        if not isinstance(inner, GramianWeighting):
            raise ValueError(
                f"the inner method must be a Gramian weighting (its direction w @ J with w from "
                f"the Gramian), got {type(inner).__name__}"
            )
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if init not in ("first", "uniform"):
            raise ValueError(f"init must be 'first' or 'uniform', got {init!r}")
        self.inner = inner
        self.beta = float(beta)
        self.inner_args = dict(inner_args or {})
        self.init = init
        self.extra_batches = inner.extra_batches
        self.needs_losses_after = inner.needs_losses_after  # type: ignore[misc]
        self.needs_probe = bool(getattr(inner, "needs_probe", False))  # type: ignore[misc]
        self.smoothed: Tensor | None = None
        self.steps = 0

    def hparam(self, name: str) -> object:
        if name == "inner":
            return self.inner_name if self.inner_name is not None else self.inner
        if name == "inner_args":
            return self.inner_args or None
        return super().hparam(name)

    @property
    def needs_losses(self) -> bool:
        """Whether the inner method uses the task losses."""
        return bool(getattr(self.inner, "needs_losses", False))

    def protocol(self) -> tuple[str, ...]:
        """The inner method's: the hooks here only forward to it."""
        return self.inner.protocol()

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.inner.setup(num_tasks)

    def before_step(self, step: int) -> None:
        self.inner.before_step(step)

    def prepare(self, probe: Any) -> None:
        self.inner.prepare(probe)

    def after_step(self, losses_after: Tensor | None) -> None:
        self.inner.after_step(losses_after)

    def on_epoch_end(self, epoch: int) -> None:
        self.inner.on_epoch_end(epoch)

    def observe_extra(self, jacobians: Sequence[Tensor]) -> None:
        self.inner.observe_extra(jacobians)

    def reset(self) -> None:
        super().reset()  # resets the inner method
        self.smoothed = None
        self.steps = 0

    def get_extra_state(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed, "steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.smoothed = state["smoothed"]
        self.steps = int(state["steps"])

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        check_gramian(gramian)
        current = self.inner.weights(gramian, losses).detach()
        previous = self.smoothed
        if previous is not None and previous.shape != current.shape:
            raise ValueError(
                f"Smoothed was averaging weights of {previous.numel()} tasks, got "
                f"{current.numel()}; call reset() between problems"
            )
        if previous is None and self.init == "uniform":
            m = current.numel()
            previous = torch.full((m,), 1.0 / m, dtype=torch.float64, device=current.device)
        if previous is None:
            smoothed = current.to(torch.float64)
        else:
            previous = previous.to(device=current.device)
            smoothed = self.beta * previous + (1.0 - self.beta) * current.to(torch.float64)
        self.smoothed = smoothed
        self.steps += 1
        weights = smoothed.to(gramian.dtype)
        return weights


@METHODS.register("cr_mogm")
class CRMOGM(Smoothed):
    """CR-MOGM (Zhou et al., NeurIPS 2022): the paper's name for :class:`Smoothed`, the same
    method (an exponential moving average of an inner Gramian weighting's weights)."""
