"""Aligned-MTL: independent component alignment of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlkit.methods.base import GramianWeighting
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solvers import eigen_range, gramian_to_numpy, to_weights

ScaleMode = Literal["min", "median", "rmse"]
_SCALE_MODES = ("min", "median", "rmse")


def balance_transformation(gramian: np.ndarray, scale_mode: ScaleMode, eps: float) -> np.ndarray:
    """``B`` (``[m, m]``) such that the aligned gradients ``Ĵᵀ = Jᵀ B`` have equal singular values.

    With ``G = V Λ Vᵀ`` restricted to its numerical rank ``r`` (eigenvalues above
    ``λ_max · m · eps``, the rule of the paper's code, where ``eps`` is the rounding unit of the
    gradients' dtype), ``B = σ V_r Λ_r^{-1/2} V_rᵀ`` and ``Jᵀ B = σ W_r V_rᵀ`` (``W_r`` the left
    singular vectors of ``Jᵀ``): ``r`` singular values equal to ``σ`` and ``m - r`` zeros. ``σ²``
    is the smallest kept eigenvalue (``"min"``, the paper's default), their lower median
    (``"median"``, as ``torch.median``) or their mean (``"rmse"``). A zero Gramian gives
    ``B = I``.
    """
    eigenvalues, vectors = eigen_range(gramian, eps)
    if eigenvalues.size == 0:
        return np.eye(gramian.shape[0])
    if scale_mode == "min":
        target = eigenvalues[-1]
    elif scale_mode == "median":
        target = np.sort(eigenvalues)[(eigenvalues.size - 1) // 2]
    else:
        target = eigenvalues.mean()
    return np.sqrt(target) * (vectors / np.sqrt(eigenvalues)) @ vectors.T


@METHODS.register("aligned_mtl")
class AlignedMTL(GramianWeighting):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023, Algorithm 1).

    The task gradients are replaced by the closest (Procrustes) matrix with orthogonal, equally
    long columns, i.e. a condition number of 1: ``Ĵᵀ = Jᵀ B`` with ``B`` from
    :func:`balance_transformation` on the eigen-decomposition of ``G = J Jᵀ``; the update is
    ``Ĵᵀ ω = Jᵀ (B ω)`` with the pre-defined task weights ``ω``, so the weights are ``B ω``. The
    paper's code sums the aligned gradients: ``ω = 1`` by default (torchjd uses ``1/m``).

    Rank-deficient gradients (``m > n``, collinear or zero rows) are handled as in the paper's
    code: eigenvalues below ``λ_max · m · eps`` are dropped (``eps`` of the Gramian's dtype, which
    is what the paper's ``torch.finfo()`` gives for float32 gradients), the scale comes from the
    smallest kept one, and the dropped directions get no weight. The weights do not change when
    all gradients are scaled by one factor (the direction scales with it); permuting the tasks
    (and ``ω``) permutes them.

    Deviation: the paper's code gives the task-specific parameters the gradient of the unweighted
    losses (unless ``scale_decoder_grad``); ``mtlkit.backward`` gives them that of ``Σ w_i L_i``.

    Args:
        scale_mode: ``"min"`` (paper), ``"median"`` or ``"rmse"`` (see
            :func:`balance_transformation`).
        task_weights: ``ω``, one value per task; ``None``: all ones.
    """

    def __init__(
        self, scale_mode: ScaleMode = "min", task_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        if task_weights is not None:
            task_weights = tuple(float(v) for v in task_weights)
            if not task_weights or not all(np.isfinite(task_weights)):
                raise ValueError(
                    f"task_weights must be a non-empty list of finite numbers, got {task_weights}"
                )
        self.task_weights = task_weights

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        work, _ = gramian_to_numpy(gramian, "AlignedMTL")
        m = work.shape[0]
        if self.task_weights is None:
            omega = np.ones(m)
        elif len(self.task_weights) != m:
            raise ValueError(f"AlignedMTL has {len(self.task_weights)} task_weights for {m} tasks")
        else:
            omega = np.asarray(self.task_weights)
        eps = float(torch.finfo(gramian.dtype).eps)
        weights = to_weights(balance_transformation(work, self.scale_mode, eps) @ omega, gramian)
        return weights
