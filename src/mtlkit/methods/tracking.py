"""Methods that track the task gradients across steps with a moving average: MoCo, DB-MTL.

Both keep ``Y`` (``[m, n]``), a moving average of (transformed) task gradients with a step
``β_k = β / k^σ`` at step ``k = 1, 2, ...``, and combine its rows. The state refers to fixed
coordinates (the shared parameters), so these methods are for the parameter route: on the
features route the columns are per-sample feature gradients, which change meaning from batch
to batch (LibMTL refuses that route for both). A Jacobian whose width changes raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import Decision, GradientAggregator, check_jacobian
from mtlkit.methods.registry import METHODS
from mtlkit.methods.simplex import project_simplex
from mtlkit.methods.state import LazyBuffers


class TrackedGradients(LazyBuffers, GradientAggregator):
    """Base class: the tracked matrix ``Y`` (``tracked``), the step count, shape checks."""

    lazy_buffers: tuple[str, ...] = ("tracked",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("tracked", None)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def reset(self) -> None:
        super().reset()
        self.clear_lazy_buffers()
        self.step.zero_()

    def _check(self, jacobian: Tensor) -> None:
        check_jacobian(jacobian, self)
        if self.tracked is not None and self.tracked.shape != jacobian.shape:
            raise ValueError(
                f"{type(self).__name__} tracks gradients of shape {tuple(self.tracked.shape)}, got "
                f"a Jacobian {tuple(jacobian.shape)}; it needs the same tasks and shared "
                "parameters at every step (the parameter route); call reset() between problems"
            )

    def _advance(self, new: Tensor, weight_on_new: float) -> Tensor:
        """``Y ← (1 - a) Y + a · new`` with ``Y = 0`` before the first step; returns ``Y``."""
        tracked = self.tracked
        if tracked is None:
            tracked = torch.zeros_like(new)
        tracked = tracked.to(new) + weight_on_new * (new - tracked.to(new))
        self.tracked = tracked
        return tracked


GradientNormalization = Literal["none", "loss"]
LambdaUpdate = Literal["projection", "softmax"]


@METHODS.register("moco")
class MoCo(TrackedGradients):
    """MoCo: multi-objective gradient with correction (Fernando, Shen, Liu, Chaudhury, Murugesan
    & Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
    Approach", ICLR 2023).

    At step ``k`` with task gradients ``h_i`` (the rows of ``J``)::

        y_i ← y_i - β_k (y_i - h_i),                 β_k = β / k^{β_σ},   y_i = 0 at the start
        λ  ← Π_Δ(λ - γ_k (Y Yᵀ + ρ I) λ),            γ_k = γ / k^{γ_σ},   λ = 1/m at the start
        d  = Yᵀ λ

    ``Y`` tracks the gradients, which removes the bias of MGDA-type weights computed from one
    stochastic Jacobian; ``λ`` takes one projected-gradient step on ``½ λᵀ(Y Yᵀ + ρ I) λ`` per
    step (the regulariser ``ρ`` makes it strongly convex). The defaults are LibMTL's. The
    paper's projection of ``y_i`` on a ball of radius ``L_i`` (a bound needed by its analysis
    only) is omitted, as in LibMTL and the authors' code.

    LibMTL (from the authors' code) differs in two places, both available as options:
    ``gradient_normalization="loss"`` uses ``h_i = L_i g_i / |g_i|`` (it needs the losses), and
    ``lambda_update="softmax"`` replaces ``Π_Δ`` by a softmax of the same argument.

    The direction is ``λ @ Y``, not a weighting of the current Jacobian, so the decision has no
    ``weights`` (non-shared parameters get ``Σ_i ∇L_i``, as in LibMTL); the weights are in
    ``lambdas``. State (``Y``, ``λ``, ``k``) is saved by ``state_dict``. Parameter route only
    (see the module docstring).

    Args:
        beta, beta_sigma: ``β``, ``β_σ`` (the step of the gradient tracking and its decay).
        gamma, gamma_sigma: ``γ``, ``γ_σ`` (the step of ``λ`` and its decay).
        rho: ``ρ ≥ 0``.
        gradient_normalization: ``"none"`` (the paper) or ``"loss"`` (LibMTL).
        lambda_update: ``"projection"`` (the paper) or ``"softmax"`` (LibMTL).
    """

    lazy_buffers = ("tracked", "lambdas")

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        gradient_normalization: GradientNormalization = "none",
        lambda_update: LambdaUpdate = "projection",
    ) -> None:
        super().__init__()
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if gradient_normalization not in ("none", "loss"):
            raise ValueError(
                f"gradient_normalization must be 'none' or 'loss', got {gradient_normalization!r}"
            )
        if lambda_update not in ("projection", "softmax"):
            raise ValueError(
                f"lambda_update must be 'projection' or 'softmax', got {lambda_update!r}"
            )
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho = float(rho)
        self.gradient_normalization = gradient_normalization
        self.lambda_update = lambda_update
        self.register_buffer("lambdas", None)

    @property
    def needs_losses(self) -> bool:
        """Whether the gradient normalisation uses the task losses."""
        return self.gradient_normalization == "loss"

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        self._check(jacobian)
        m = jacobian.shape[0]
        gradients = jacobian.detach()
        if self.gradient_normalization == "loss":
            gradients = (
                gradients
                * (_positive_losses(self, losses, m, gradients) / _norms(gradients))[:, None]
            )
        self.step += 1
        k = float(self.step)
        tracked = self._advance(gradients, self.beta / k**self.beta_sigma)
        lambdas = self.lambdas
        if lambdas is None:
            lambdas = torch.full((m,), 1.0 / m, dtype=torch.float64, device=gradients.device)
        gramian = (tracked @ tracked.T).to(torch.float64)
        gramian = gramian + self.rho * torch.eye(m, dtype=gramian.dtype, device=gramian.device)
        moved = lambdas - self.gamma / k**self.gamma_sigma * (gramian @ lambdas)
        lambdas = (
            project_simplex(moved) if self.lambda_update == "projection" else moved.softmax(-1)
        )
        self.lambdas = lambdas
        return Decision(direction=lambdas.to(tracked.dtype) @ tracked)


@METHODS.register("db_mtl")
class DBMTL(TrackedGradients):
    """DB-MTL: dual-balancing multi-task learning (Lin, Ye, Xu, Shi, Zhang & Kwok,
    "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023).

    Loss-scale balancing: each task loss is replaced by ``log L_i``, whose gradient is
    ``g_i / L_i`` (taken from the losses the engine passes; they must be positive). Gradient
    magnitude balancing, at step ``k``::

        ĝ_i ← g_i / L_i + β_k (ĝ_i - g_i / L_i),      β_k = β / k^σ,  ĝ_i = 0 at the start
        α_i = max_j |ĝ_j| / |ĝ_i|
        d   = Σ_i α_i ĝ_i

    so every tracked gradient enters with the largest norm. ``β`` is the weight of the past (the
    paper's and LibMTL's convention; defaults 0.9 and σ = 0). Zero tracked gradients get
    ``α = 0``. LibMTL differentiates ``log(L_i + 1e-8)`` and divides by ``|ĝ_i| + 1e-8``;
    here both are exact.

    The direction is not a weighting of the current Jacobian, so its decision has no ``weights``.
    The task heads get the gradient of ``Σ_i log L_i``, i.e. ``Σ_i ∇L_i / L_i``, as in the paper
    (and LibMTL): ``head_weights = 1 / L`` (with ``log_losses=False``, where the losses already
    are logs, ``Σ_i ∇L_i``). Parameter route only (see the module docstring).

    Args:
        beta: ``β ∈ [0, 1)``, the weight of the past.
        beta_sigma: ``σ ≥ 0``, its decay.
        log_losses: divide the gradients by the losses (``False`` when ``J`` already holds the
            gradients of ``log L_i``).
    """

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, log_losses: bool = True) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not beta_sigma >= 0:
            raise ValueError(f"beta_sigma must be >= 0, got {beta_sigma}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.log_losses = bool(log_losses)

    @property
    def needs_losses(self) -> bool:
        """Whether the log transformation uses the task losses."""
        return self.log_losses

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        self._check(jacobian)
        m = jacobian.shape[0]
        gradients = jacobian.detach()
        heads = None
        if self.log_losses:
            positive = _positive_losses(self, losses, m, gradients)
            gradients = gradients / positive[:, None]
            heads = 1.0 / positive  # the heads descend Σ_i log L_i
        self.step += 1
        k = float(self.step)
        tracked = self._advance(gradients, 1.0 - self.beta / k**self.beta_sigma)
        norms = tracked.norm(dim=1)
        scales = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1.0), 0.0)
        return Decision(direction=scales @ tracked, head_weights=heads)


def _positive_losses(
    method: GradientAggregator, losses: Tensor | None, m: int, like: Tensor
) -> Tensor:
    """The ``[m]`` task losses, checked finite and positive."""
    name = type(method).__name__
    if losses is None:
        raise ValueError(f"{name} needs the task losses: pass losses= to forward")
    losses = losses.detach().to(like)
    if losses.shape != (m,):
        raise ValueError(f"{name} got {tuple(losses.shape)} losses for {m} tasks")
    if not bool(torch.isfinite(losses).all()):
        raise NonFiniteError(f"{name} got NaN or infinite task losses")
    if not bool((losses > 0).all()):
        raise ValueError(f"{name} needs positive task losses, got {losses.tolist()}")
    return losses


def _norms(gradients: Tensor) -> Tensor:
    """Row norms, with 1 for zero rows (a zero gradient stays zero when divided)."""
    norms = gradients.norm(dim=1)
    return torch.where(norms > 0, norms, torch.ones_like(norms))
