"""Impartial multi-task learning: IMTL-G and the IMTL hybrid (IMTL-G on IMTL-L's scaled losses)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from mtlkit.methods.base import GramianWeighting
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solvers import eigen_range, gramian_to_numpy, to_weights
from mtlkit.methods.weighting import IMTLL


def imtl_g_weights(gramian: np.ndarray, eps: float | None = None) -> np.ndarray:
    """The IMTL-G weights ``α = G⁺ s / (1ᵀ G⁺ s)`` with ``s_i = |g_i| = sqrt(G_ii)``.

    ``d = Jᵀα`` has ``Σα = 1`` and equal projections ``d · g_i / |g_i| = (Gα)_i / s_i`` on every
    unit task gradient: this is the closed form of Liu et al. (ICLR 2021), which solves
    ``α_{2:m} = g_1 Uᵀ (D Uᵀ)^{-1}`` with ``D``/``U`` the differences of the gradients / unit
    gradients to the first one, written on the Gramian. ``G⁺`` is the pseudo-inverse on the
    eigenvalues above ``m · eps · λ_max`` (torchjd's generalisation to linearly dependent rows:
    zero gradients get ``α_i = 0``; for dependent rows the equal-projection equations may have no
    solution, and this is their least-squares solution). All gradients zero: uniform weights.
    ``1ᵀG⁺s = 0`` (e.g. two opposite gradients of equal norm): no direction has equal
    non-zero projections; zero weights and a ``RuntimeWarning``.

    Args:
        gramian: ``[m, m]``, normalised (``max G_ii = 1``).
        eps: the rounding unit of the Gramian's entries (float64 by default).
    """
    m = gramian.shape[0]
    eigenvalues, vectors = eigen_range(gramian, eps)
    if eigenvalues.size == 0:
        return np.full(m, 1.0 / m)
    norms = np.sqrt(np.clip(gramian.diagonal(), 0.0, None))
    solution = vectors @ ((vectors.T @ norms) / eigenvalues)
    total = float(solution.sum())
    if abs(total) <= 1e-12 * float(np.abs(solution).sum()):
        warnings.warn(
            "IMTL-G: 1ᵀG⁺s = 0, no combination of the task gradients has equal non-zero "
            "projections on all of them (e.g. opposite gradients); using zero weights",
            RuntimeWarning,
            stacklevel=3,
        )
        return np.zeros(m)
    return solution / total


def _eps(tensor: Tensor) -> float:
    """The rounding unit of a floating-point tensor's dtype."""
    return float(torch.finfo(tensor.dtype).eps)


@METHODS.register("imtl_g")
class IMTLG(GramianWeighting):
    """IMTL-G, the gradient balancing of "Towards Impartial Multi-task Learning" (Liu et al.,
    ICLR 2021).

    The direction ``d = Σ α_i g_i`` with ``Σ α_i = 1`` has the same projection on every unit
    task gradient, ``d · g_i / |g_i|``, so no task is favoured by its gradient's norm; in closed
    form ``α = G⁺s / 1ᵀG⁺s`` with ``s_i = |g_i|`` (:func:`imtl_g_weights`). The direction's
    orientation does not depend on the scales of the task gradients (multiplying ``g_i`` by
    ``c_i > 0`` changes ``d`` only by a factor); permuting the tasks permutes ``α``. For ``m ≥ 3``
    the common projection can be negative: the paper's constraint ``Σ α = 1`` fixes the sign.
    """

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        work, _ = gramian_to_numpy(gramian, "IMTLG")
        weights = to_weights(imtl_g_weights(work, _eps(gramian)), gramian)
        return weights


@METHODS.register("imtl")
class IMTL(GramianWeighting):
    """The IMTL hybrid (Liu et al., ICLR 2021, Algorithm 1): IMTL-G on the gradients of the
    losses scaled by IMTL-L.

    IMTL-L (:class:`~mtlkit.methods.weighting.IMTLL`, held as ``scaling``) learns ``s_i`` per
    task and scales the losses to ``e^{s_i} L_i - s_i``, whose minimum over ``s_i`` is at
    ``e^{s_i} L_i = 1`` (all tasks at the same scale). The shared parameters get the IMTL-G
    combination of the scaled losses' gradients ``e^{s_i} g_i``: on the Gramian,
    ``α = imtl_g(E G E)`` with ``E = diag(e^s)``, and the weights on the raw gradients are
    ``w = E α``.

    The scales are learnt by the model's optimizer (they are ``parameters()``): each call of
    ``weights``/``forward`` under grad mode *accumulates* the gradient of
    ``Σ_i e^{s_i} L_i - s_i`` (the losses detached) into ``scaling.log_scales.grad``, i.e.
    ``e^{s_i} L_i - 1``, as a backward would: the gradient engine has no other path to an
    aggregator's own parameters. So call it once per step, as ``mtlkit.backward`` does.

    Deviation from the paper: there the task-specific parameters get the gradient of
    ``e^{s_i} L_i`` itself; ``mtlkit.backward`` gives every non-shared parameter the gradient of
    ``Σ_i w_i L_i`` with the method's weights, i.e. of ``α_i e^{s_i} L_i``.

    Args:
        num_tasks: number of tasks; if ``None``, set by ``setup`` (the Trainer calls it).
        init: initial value of every ``s_i`` (paper: 0).
    """

    needs_losses = True

    def __init__(self, num_tasks: int | None = None, init: float = 0.0) -> None:
        super().__init__()
        self.scaling = IMTLL(init=init, num_tasks=num_tasks)

    def hparams(self) -> dict[str, object]:
        return {"init": self.scaling.init}

    def setup(self, num_tasks: int) -> None:
        self.scaling.setup(num_tasks)
        super().setup(num_tasks)

    def reset(self) -> None:
        super().reset()

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        work, _ = gramian_to_numpy(gramian, "IMTL")
        m = work.shape[0]
        if losses is None:
            raise ValueError("IMTL needs the task losses (to train its scales): pass losses=")
        losses = losses.detach()
        if losses.shape != (m,):
            raise ValueError(f"IMTL got {tuple(losses.shape)} losses for a {m}x{m} Gramian")
        decision = self.scaling(losses)  # checks the losses and the number of tasks
        scales = decision.weights.detach().to("cpu", torch.float64).numpy()
        scaled = work * scales[:, None] * scales[None, :]
        top = float(scaled.diagonal().max())
        alpha = imtl_g_weights(scaled / top if top > 0 else scaled, _eps(gramian))
        weights = to_weights(scales * alpha, gramian)
        if torch.is_grad_enabled() and decision.weights.requires_grad:
            decision.total(losses.to(decision.weights.dtype)).backward()
        return weights
