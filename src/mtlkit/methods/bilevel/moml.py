"""MOML (Ye et al., NeurIPS 2021): softmax task weights trained by MGDA on the exact
hypergradients of one unrolled SGD step, one per primary task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mtlkit.methods.base import StepProbe
from mtlkit.methods.bilevel.common import (
    BilevelWeighting,
    ParameterSnapshot,
    check_positive,
    shift_parameters,
    softmax_jacobian,
)
from mtlkit.methods.mgda import min_norm_weights
from mtlkit.methods.registry import METHODS


def unrolled_hypergradient(train_jacobian: Tensor, aux_jacobian: Tensor, lr: float) -> Tensor:
    """The exact hypergradient of one unrolled SGD step, ``[m_aux, m]``::

        θ'(λ) = θ - lr Σ_i λ_i ∇L_i^train(θ)
        ∂L_j^aux(θ')/∂λ_i = -lr ∇L_j^aux(θ') · ∇L_i^train(θ)

    (``θ'`` is linear in ``λ``, so no Hessian appears). ``train_jacobian`` is ``[m, n]`` at ``θ``,
    ``aux_jacobian`` ``[m_aux, n]`` at ``θ'``.
    """
    return -lr * aux_jacobian @ train_jacobian.T


MomlNormalization = Literal["l2", "none"]


@METHODS.register("moml")
class MOML(BilevelWeighting):
    """Multi-objective meta learning (Ye, Lin, Yue, Guo, Xiao, Zhang & Zhang, "Multi-Objective
    Meta Learning", NeurIPS 2021), in its multi-task form.

    The task weights are ``λ = softmax(α)`` (``α`` initialised equal, so ``λ_i = 1/m`` and
    ``Σλ = 1``: compare with ``EW("mean")``). The upper level is multi-objective: each primary
    task's auxiliary loss after one virtual SGD step (``j`` runs over the primary tasks)::

        θ' = θ - η Σ_i λ_i ∇L_i(θ; batch)
        H[j, i] = ∂L_j(θ'; aux)/∂λ_i = -η ∇L_j(θ'; aux) · ∇L_i(θ; batch)   (exact, two Jacobians)
        h_j = ∂L_j(θ'; aux)/∂α = H[j] (diag(λ) - λλᵀ)
        w = argmin_{w ∈ Δ} |Σ_j w_j h_j / |h_j||²   (MGDA, :func:`min_norm_weights`)
        α ← Adam(α, Σ_j w_j h_j)

    (:func:`unrolled_hypergradient`, :func:`softmax_jacobian`). The MGDA weights are computed on
    the ``l2``-normalised hypergradients and applied to the raw ones, as in the paper's code
    (``normalization="none"``: no normalisation, as in FORUM's re-implementation). The model
    step uses ``Σ λ_i L_i`` with the updated ``λ``.

    Differences from the papers' code: ``η`` defaults to the model optimizer's learning rate
    (``probe.learning_rate``; MOML's code used its model learning rate 1e-4, FORUM's
    re-implementation a separate ``η = 0.1``); the model is trained on the training batch only
    (their code also trains on the upper-level batch).

    Args:
        meta_lr: Adam learning rate of ``α`` (1e-3 in the paper's code).
        inner_lr: ``η`` of the virtual step; ``None`` = the model optimizer's learning rate.
        normalization: ``"l2"`` or ``"none"``, of the hypergradients before the MGDA solve.
        primary: indices of the tasks whose auxiliary losses are the upper-level objectives;
            ``None`` = all (the paper's multi-task setting).
    """

    def __init__(
        self,
        meta_lr: float = 1e-3,
        inner_lr: float | None = None,
        normalization: MomlNormalization = "l2",
        primary: Sequence[int] | None = None,
    ) -> None:
        super().__init__(meta_lr, primary)
        self.inner_lr = None if inner_lr is None else check_positive("inner_lr", inner_lr)
        if normalization not in ("l2", "none"):
            raise ValueError(f"normalization must be 'l2' or 'none', got {normalization!r}")
        self.normalization = normalization
        self.last_mgda_weights: Tensor | None = None
        self.last_unrolled: Tensor | None = None

    def _initial_upper(self) -> float:
        return 0.0  # any constant: softmax gives 1/m

    def task_weights(self) -> Tensor:
        return self._softmax_weights()

    def prepare(self, probe: StepProbe) -> None:
        from mtlkit.engine.jacobian import jacobian

        aux = self._aux_batch(probe)
        params = probe.parameters
        lr = probe.learning_rate if self.inner_lr is None else self.inner_lr
        weights = self.task_weights()
        with ParameterSnapshot(params):
            losses = probe.loss_list(probe.batch)
            self._require_upper(len(losses))
            train_jacobian = jacobian(losses, params, retain_graph=False)
            shift_parameters(params, weights.to(train_jacobian) @ train_jacobian, -lr)  # θ'
            aux_losses = self._primary_list(probe.loss_list(aux))
            aux_jacobian = jacobian(aux_losses, params, retain_graph=False)
        hyper = unrolled_hypergradient(train_jacobian, aux_jacobian, lr)
        rows = hyper @ softmax_jacobian(weights.to(hyper))
        wide = rows.double()  # in float32 a row of 3e19 (a virtual step that overshoots) overflows
        gramian = wide @ wide.T
        if self.normalization == "l2":
            norms = gramian.diagonal().clamp_min(0).sqrt()
            norms = torch.where(norms > 0, norms, torch.ones_like(norms))
            gramian = gramian / torch.outer(norms, norms)
        mgda = min_norm_weights(gramian).to(rows.dtype)
        self.last_mgda_weights = mgda
        self.last_unrolled = hyper
        self._meta_step(mgda @ rows)
