"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import GramianWeighting, check_gramian
from mtlkit.methods.registry import METHODS

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def min_norm_weights(gramian: Tensor, tol: float = 1e-12, max_iter: int = 1000) -> Tensor:
    """``argmin_{w ∈ Δ} wᵀ G w``: the weights of the min-norm point of the convex hull of the rows
    of ``J`` where ``G = J Jᵀ``.

    Wolfe's (1976) min-norm-point algorithm, a primal active-set method, run on the Gramian: the
    support ``S`` (the "corral") always holds affinely independent gradients and ``w`` the affine
    minimiser on it; a major step adds the index ``j`` minimising ``(G w)_j`` while
    ``(G w)_j < wᵀGw - tol``; minor steps move towards the affine minimiser of ``S`` and drop the
    indices whose weight reaches zero. The affine minimiser solves ``(G_SS + 11ᵀ) u = 1`` (any
    solution; a pseudo-inverse, so that a singular Gramian is fine) and is ``u / Σu``.

    The result satisfies the KKT conditions ``w ≥ 0``, ``Σw = 1``, ``(G w)_i ≥ wᵀGw - tol·s`` for
    all ``i``, with equality (to rounding) on the support, where ``s = max_i G_ii``; then
    ``|d - d*| ≤ sqrt(tol·s)`` for the direction ``d = wᵀJ`` and the exact min-norm point ``d*``.
    ``tol`` is raised to ``4 eps`` of the Gramian's dtype (its own rounding). The solve runs in
    float64 NumPy on the CPU (the Gramian is only ``m × m``; a few microseconds per step instead of
    a device launch per scalar); the result has the Gramian's dtype and device. When all gradients
    are zero every ``w`` is optimal and the uniform one is returned.

    Args:
        gramian: ``[m, m]`` positive semi-definite.
        tol: tolerance on the KKT conditions, relative to the largest squared gradient norm.
        max_iter: bound on the number of major steps (each adds one index); a ``RuntimeWarning``
            is issued if it is reached.

    Raises:
        NonFiniteError: if the Gramian has NaN or infinite entries.
    """
    check_gramian(gramian)
    if not bool(torch.isfinite(gramian).all()):
        raise NonFiniteError("MGDA got a Gramian with NaN or infinite entries")
    m = gramian.shape[0]
    work = gramian.detach().to("cpu", torch.float64).numpy()
    scale = work.diagonal().max()
    if m == 1 or scale <= 0:
        return torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
    work = work / scale
    tol = max(tol, 4 * torch.finfo(gramian.dtype).eps)  # below the rounding of G itself

    support = [int(work.diagonal().argmin())]
    weights = _embed(np.ones(1), support, m)
    best, best_value = weights, math.inf
    for _ in range(max_iter):
        grad = work @ weights
        value = float(weights @ grad)
        if value >= best_value:  # Wolfe's steps strictly decrease |d|: this is rounding
            weights = best
            break
        best, best_value = weights, value
        entering = int(grad.argmin())
        if entering in support or float(grad[entering]) >= value - tol:
            break
        support.append(entering)
        weights, support = _minor_cycle(work, weights, support)
    else:
        warnings.warn(
            f"MGDA's min-norm solver reached max_iter={max_iter}", RuntimeWarning, stacklevel=2
        )
    return torch.from_numpy(weights).to(gramian.device, gramian.dtype)


def _minor_cycle(
    gramian: np.ndarray, weights: np.ndarray, support: list[int]
) -> tuple[np.ndarray, list[int]]:
    """From ``weights`` (positive on ``support`` but for the index that just entered), move towards
    the affine minimiser of the support, dropping the indices whose weight reaches zero, until the
    affine minimiser has positive weights; return it and its support."""
    m = gramian.shape[0]
    while True:
        target = _affine_minimizer(gramian[np.ix_(support, support)])
        if bool((target > 0).all()):
            return _embed(target, support, m), support
        current = weights[support]
        ratios = current / np.maximum(current - target, np.finfo(np.float64).tiny)
        ratios = np.where(target <= 0, ratios, np.inf)
        first = int(ratios.argmin())
        step = current + ratios[first] * (target - current)
        step[first] = 0
        keep = step > 0
        support = [i for i, k in zip(support, keep.tolist()) if k]
        weights = _embed(step[keep] / step[keep].sum(), support, m)


def _embed(values: np.ndarray, support: list[int], size: int) -> np.ndarray:
    """The ``[size]`` vector equal to ``values`` on ``support`` and zero elsewhere."""
    out = np.zeros(size)
    out[support] = values
    return out


def _affine_minimizer(gramian: np.ndarray) -> np.ndarray:
    """The weights ``v`` (``Σv = 1``) of the min-norm point of the affine hull of the gradients."""
    solution = np.linalg.pinv(gramian + 1.0, hermitian=True) @ np.ones(gramian.shape[0])
    return solution / solution.sum()


@METHODS.register("mgda")
class MGDA(GramianWeighting):
    """Multiple-gradient descent (Désidéri 2012; Sener & Koltun, NeurIPS 2018).

    The direction is the min-norm point of the convex hull of the task gradients ``g_i``
    (the rows of ``J``)::

        w* = argmin_{w ∈ Δ} |Σ_i w_i ĝ_i|²,   ĝ_i = g_i / c_i,   d = Σ_i w*_i ĝ_i,

    solved exactly (to ``tol``) by :func:`min_norm_weights`. ``d`` does not conflict with any
    task: ``ĝ_i · d ≥ |d|²``; it is zero at a Pareto-stationary point. The scales ``c_i`` follow
    the paper's code and LibMTL: ``1`` (``"none"``), ``|g_i|`` (``"l2"``), ``L_i`` (``"loss"``) or
    ``L_i |g_i|`` (``"loss+"``); a zero ``c_i`` (a zero gradient) is replaced by ``1``. The
    returned weights are those on the original gradients, ``w*_i / c_i``, so that the direction
    is ``weights @ J``.

    The loss normalisations need the (positive) task losses, which ``mtlkit.backward`` passes
    to ``forward``/``weights``; ``needs_losses`` tells whether they are needed.

    Args:
        normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.
        tol: tolerance of the min-norm solver, relative to the largest squared gradient norm.
        max_iter: bound on the solver's major steps.
    """

    def __init__(
        self, normalization: Normalization = "none", tol: float = 1e-12, max_iter: int = 1000
    ) -> None:
        super().__init__()
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}"
            )
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.normalization = normalization
        self.tol = float(tol)
        self.max_iter = int(max_iter)

    @property
    def needs_losses(self) -> bool:
        """Whether the normalisation uses the task losses."""
        return self.normalization in ("loss", "loss+")

    def hparams(self) -> dict[str, object]:
        return {"normalization": self.normalization, "tol": self.tol, "max_iter": self.max_iter}

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The weights ``w*_i / c_i`` on the original gradients (see the class docstring).

        Args:
            gramian: ``[m, m]``, ``J Jᵀ``.
            losses: ``[m]`` task losses, for the loss normalisations.
        """
        check_gramian(gramian)
        gramian = gramian.detach()
        scales = self._scales(gramian, losses)
        normalized = gramian / (scales[:, None] * scales[None, :])
        weights = min_norm_weights(normalized, self.tol, self.max_iter) / scales
        return weights

    def _scales(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        """The ``c_i`` by which gradient ``i`` is divided before the min-norm solve."""
        scales = torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        if self.normalization in ("l2", "loss+"):
            scales = gramian.diagonal().clamp_min(0).sqrt()
        if self.needs_losses:
            if losses is None:
                raise ValueError(
                    f"MGDA(normalization={self.normalization!r}) needs the task losses: pass "
                    "losses= to weights/forward"
                )
            losses = losses.detach().to(gramian)
            if losses.shape != scales.shape:
                raise ValueError(
                    f"MGDA got {tuple(losses.shape)} losses for a {tuple(gramian.shape)} Gramian"
                )
            if not bool(torch.isfinite(losses).all()):
                raise NonFiniteError("MGDA got NaN or infinite task losses")
            if not bool((losses > 0).all()):
                raise ValueError(
                    f"MGDA(normalization={self.normalization!r}) needs positive losses, "
                    f"got {losses.tolist()}"
                )
            scales = scales * losses
        return torch.where(scales > 0, scales, torch.ones_like(scales))
