"""Stochastic multi-objective methods with double sampling: MoDo and SDMGrad.

Both update the task weights with the product of the Jacobians of two *independent*
mini-batches, ``C = J₁ J₂ᵀ``, an unbiased estimate of the Gramian (``J Jᵀ`` of one batch is
biased), and combine the Jacobian of a third batch (the one ``forward`` receives). They set
``extra_batches = 2``: before each ``forward`` the strategy, or a user's own loop, passes the
two extra Jacobians (same tasks, same shared parameters, two other batches) to
:meth:`~mtlkit.methods.base.GradientAggregator.observe_extra`::

    method.observe_extra([mtlkit.jacobian(losses_1, shared), mtlkit.jacobian(losses_2, shared)])
    mtlkit.backward(losses, shared, method)

Only ``C`` (``[m, m]``) is kept, so the combination is a Gramian weighting and the fast path
applies. It is used by one ``forward`` and then dropped; a ``forward`` without fresh extra
Jacobians raises. The Jacobians must be w.r.t. the shared parameters (the parameter route):
per-sample feature gradients of different batches do not refer to the same coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import GramianWeighting, check_gramian
from mtlkit.methods.registry import METHODS
from mtlkit.methods.simplex import project_simplex
from mtlkit.methods.state import LazyBuffers


class DoubleSampling(LazyBuffers, GramianWeighting):
    """Base class: receives two extra Jacobians per step and keeps their product ``J₁ J₂ᵀ``."""

    lazy_buffers: tuple[str, ...] = ("lambdas",)

    def __init__(self) -> None:
        super().__init__()
        self.extra_batches = 2
        self.register_buffer("lambdas", None)
        self.cross_gramian: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.clear_lazy_buffers()
        self.cross_gramian = None

    def observe_extra(self, jacobians: Sequence[Tensor]) -> None:
        """Keep ``J₁ J₂ᵀ`` (float64) for the next ``forward``.

        Args:
            jacobians: two Jacobians ``[m, n]`` of the same tasks w.r.t. the same shared
                parameters, on two mini-batches independent of each other and of the step's.
        """
        name = type(self).__name__
        jacobians = list(jacobians)
        if len(jacobians) != 2:
            raise ValueError(f"{name} needs exactly 2 extra Jacobians, got {len(jacobians)}")
        first, second = jacobians
        if first.dim() != 2 or first.shape != second.shape or first.shape[0] == 0:
            raise ValueError(
                f"{name} needs two Jacobians [m, n] of the same shape, got "
                f"{tuple(first.shape)} and {tuple(second.shape)}"
            )
        if not (bool(torch.isfinite(first).all()) and bool(torch.isfinite(second).all())):
            raise NonFiniteError(f"{name} got an extra Jacobian with NaN or infinite entries")
        self.cross_gramian = (first.detach() @ second.detach().T).to(torch.float64)

    def _take_cross_gramian(self, m: int) -> Tensor:
        """The stored ``J₁ J₂ᵀ`` for ``m`` tasks, consumed (the next step needs fresh ones)."""
        cross = self.cross_gramian
        name = type(self).__name__
        if cross is None:
            raise RuntimeError(
                f"{name} needs the Jacobians of 2 independent extra batches before each step: "
                f"call method.observe_extra([mtlkit.jacobian(losses_1, shared), "
                f"mtlkit.jacobian(losses_2, shared)]) before forward/backward (the Trainer does "
                f"it when extra_batches > 0)"
            )
        if cross.shape != (m, m):
            raise ValueError(
                f"{name} observed extra Jacobians of {cross.shape[0]} tasks, the step has {m}"
            )
        self.cross_gramian = None
        return cross

    def _lambdas(self, m: int, like: Tensor) -> Tensor:
        lambdas = self.lambdas
        if lambdas is None:
            return torch.full((m,), 1.0 / m, dtype=torch.float64, device=like.device)
        if lambdas.shape != (m,):
            raise ValueError(
                f"{type(self).__name__} has weights for {lambdas.numel()} tasks, got {m}; "
                "call reset() between problems"
            )
        return lambdas.to(device=like.device, dtype=torch.float64)


@METHODS.register("modo")
class MoDo(DoubleSampling):
    """MoDo: multi-objective gradient with double sampling (Chen, Fang, Xu, Chen & Chen,
    "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
    Conflict-Avoidance", NeurIPS 2023; JMLR 2024).

    With ``J₁``, ``J₂`` the Jacobians of two independent batches and ``J`` the step's::

        λ ← Π_Δ(λ - γ (J₁ J₂ᵀ λ + ρ λ)),     λ = 1/m at the start
        d = Jᵀ λ

    one stochastic projected-gradient step on ``½ λᵀ (J Jᵀ + ρ I) λ`` (MGDA's objective,
    regularised) per step, with the new ``λ`` (the decision's ``weights``). Defaults are LibMTL's
    (``γ = 1e-3``, ``ρ = 0.1``). ``λ`` is saved by ``state_dict``. See the module docstring
    for the extra Jacobians.

    Args:
        gamma: ``γ > 0``, the step size of ``λ``.
        rho: ``ρ ≥ 0``, the ℓ2 regularisation of ``λ``.
    """

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.gamma = float(gamma)
        self.rho = float(rho)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The updated ``λ`` (the step's own Gramian is not used: see the class docstring)."""
        check_gramian(gramian)
        m = gramian.shape[0]
        cross = self._take_cross_gramian(m).to(gramian.device)
        lambdas = self._lambdas(m, gramian)
        lambdas = project_simplex(lambdas - self.gamma * (cross @ lambdas + self.rho * lambdas))
        self.lambdas = lambdas
        weights = lambdas.to(gramian.dtype)
        return weights


@METHODS.register("sdmgrad")
class SDMGrad(DoubleSampling):
    """SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao, Ban & Ji,
    "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
    NeurIPS 2023).

    The direction is regularised towards the mean gradient ``g₀ = (1/m) Σ_i g_i``: the weights
    ``w`` minimise ``½ |Jᵀw + λ g₀|²`` on the simplex, whose gradient ``J Jᵀ (w + λ/m)`` is
    estimated without bias by ``C (w + λ/m)``, ``C = J₁ J₂ᵀ`` from two independent batches.
    Each step runs ``niter`` projected steps of SGD with momentum (the authors' code and
    LibMTL: learning rate 5, momentum 0.5, the momentum restarted every step, ``w`` carried
    over from the previous step; uniform at the start)::

        Ĉ = C / s²,  s = mean_i √max(C_ii, 0)        (normalize=True; s = 0: no scaling)
        b ← μ b + Ĉ (w + λ/m)    (b = the first gradient at the first iteration)
        w ← Π_Δ(w - η b)
        d = Jᵀ (w + λ/m) / (1 + λ)

    with ``J`` the step's own Jacobian (``weights = (w + λ/m) / (1 + λ)``). ``λ = 0``
    gives a stochastic MGDA, ``λ → ∞`` the mean. The paper's analysis uses one projected step
    per iteration (``niter=1, momentum=0``); the division by ``1 + λ`` is the authors' code's
    (a constant scale). ``w`` is saved by ``state_dict``. See the module docstring for the
    extra Jacobians.

    Args:
        lambda_reg: ``λ ≥ 0``, the pull towards the mean gradient.
        lr: ``η > 0``, the inner step size.
        momentum: ``μ ∈ [0, 1)``.
        niter: inner iterations per step.
        normalize: divide ``C`` by the squared mean gradient norm (the authors' code).
    """

    def __init__(
        self,
        lambda_reg: float = 0.3,
        lr: float = 5.0,
        momentum: float = 0.5,
        niter: int = 20,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not lambda_reg >= 0:
            raise ValueError(f"lambda_reg must be >= 0, got {lambda_reg}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if isinstance(niter, bool) or int(niter) < 1:
            raise ValueError(f"niter must be a positive integer, got {niter}")
        self.lambda_reg = float(lambda_reg)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.niter = int(niter)
        self.normalize = bool(normalize)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """``(w + λ/m) / (1 + λ)`` after the inner iterations on ``w``."""
        check_gramian(gramian)
        m = gramian.shape[0]
        cross = self._take_cross_gramian(m).to(gramian.device)
        if self.normalize:
            scale = cross.diagonal().clamp_min(0).sqrt().mean()
            if scale > 0:
                cross = cross / scale**2
        w = self._lambdas(m, gramian)
        pull = self.lambda_reg / m
        velocity: Tensor | None = None
        for _ in range(self.niter):
            gradient = cross @ (w + pull)
            velocity = gradient if velocity is None else self.momentum * velocity + gradient
            w = project_simplex(w - self.lr * velocity)
        self.lambdas = w
        weights = ((w + pull) / (1 + self.lambda_reg)).to(gramian.dtype)
        return weights
