"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import Decision, check_gramian
from mtlkit.methods.float64_gramian import Float64GramianWeighting
from mtlkit.methods.registry import METHODS
from mtlkit.methods.solver_report import ReportsSolver, SolverStatus

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@dataclass
class MinNormSolve:
    """The result of :func:`min_norm_solve`: the weights, Wolfe's major steps, the KKT residual
    ``max_j (wᵀGw - (G w)_j - |g_j| r) / (|g_j| |d|)``: the violation beyond the rounding ``r``
    of ``g_j · d`` (see :func:`min_norm_solve`), relative to ``|d|`` (``0`` when there is none,
    ``inf`` when there is one and ``|d|²`` is below rounding), and whether it is within the
    tolerance (``converged`` is ``residual <= tol``)."""

    weights: np.ndarray
    iterations: int
    residual: float
    converged: bool


def min_norm_solve(
    gramian: np.ndarray, tol: float = 1e-12, max_iter: int = 1000, eps: float | None = None
) -> MinNormSolve:
    """``argmin_{w ∈ Δ} wᵀ G w``: the weights of the min-norm point ``d = Jᵀw`` of the convex hull
    of the rows ``g_i`` of ``J`` where ``G = J Jᵀ`` (float64 NumPy, any positive scale).

    Wolfe's (1976) min-norm-point algorithm, a primal active-set method: the support ``S`` (the
    "corral") holds affinely independent gradients and ``w`` the affine minimiser on it; a major
    step adds the task ``j`` with the largest relative violation ``(wᵀGw - (G w)_j) / |g_j|`` while
    one exceeds the tolerance; minor steps move towards the affine minimiser of ``S`` and drop the
    indices whose weight reaches zero.

    Stopping rule (KKT, relative to the problem's own scale): ``g_j · d ≥ |d|² - |g_j| (tol |d|
    + r)`` for every ``j``, with ``r = 8 m eps Σ_k w_k |g_k|`` the rounding error of ``g_j · d``
    computed from ``G`` (``eps``: the Gramian's rounding unit). A tolerance relative to
    ``max_i G_ii`` instead let gradients 1e6 times smaller than the largest conflict with ``d``:
    ``|d|²`` ended 1.6% above the optimum with rows scaled by ``logspace(-3, 3, 7)``.

    Progress: Wolfe's steps strictly decrease ``|d|²``, so an iterate that does not is rounding
    and the search returns the best one. ``|d|²`` computed from ``G`` is only known to
    ``r Σ_k w_k |g_k|``, though: near a Pareto-stationary point (``|d| ~ 1e-9 |g|``, ``|d|²`` far
    below that) its computed value is noise while ``g_j · d`` still resolves a conflict. Wolfe's
    steps go on there while ``|d|²`` stays within that rounding of the best and each support is
    new (in exact arithmetic none comes back); the search returns the iterate of that level with
    the smallest KKT violation relative to its allowance. (``|d|²`` 1.537e-19 on the support
    {0, 1} against 1.531e-19 with ``w_2 = 9.4e-12``, computed as -4.8e-19 and -9.0e-20, used to
    stop at the first, with a violation 1947 times the tolerance.)

    The affine minimiser of ``S`` is solved on the cosine matrix ``C = D⁻¹ G D⁻¹`` (``D`` the
    gradient norms, so ``C_ii = 1``): with ``u = D v``, ``G v = μ 1`` is ``C u = μ a`` for
    ``a = D⁻¹ 1``, i.e. ``u ∝ (C + a aᵀ)⁺ a`` (least squares: a singular ``C`` is fine), instead of
    on ``G`` itself, whose entries span the squared ratio of the norms.

    A zero gradient (``G_ii = 0``) is a min-norm point: it gets all the weight. Raises nothing;
    ``max_iter`` major steps end the search with ``converged=False``.
    """
    m = gramian.shape[0]
    unit = np.finfo(np.float64).eps if eps is None else eps
    norms = np.sqrt(np.clip(gramian.diagonal(), 0.0, None))
    if m == 1 or not norms.any():
        return MinNormSolve(np.full(m, 1.0 / m), 0, 0.0, True)
    if (norms == 0).any():
        return MinNormSolve(_embed(np.ones(1), [int(norms.argmin())], m), 0, 0.0, True)
    cosines = gramian / np.outer(norms, norms)

    def violations(weights: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """The relative violations ``(wᵀGw - (G w)_j) / |g_j|``, ``wᵀGw``, the rounding ``r``
        of ``(G w)_j / |g_j|`` and that of ``wᵀGw`` (``r Σ_k w_k |g_k|``)."""
        grad = gramian @ weights
        value = float(weights @ grad)
        spread = float(weights @ norms)
        rounding = 8 * m * unit * spread
        return (value - grad) / norms, value, rounding, rounding * spread

    def excess(relative: np.ndarray, value: float, rounding: float) -> float:
        """The largest violation over its allowance ``tol |d| + r`` (``≤ 1``: converged)."""
        allowed = tol * math.sqrt(max(value, 0.0)) + rounding
        worst = float(relative.max(initial=0.0))
        if worst <= allowed:
            return 0.0 if worst <= 0 else worst / allowed
        return worst / allowed if allowed > 0 else math.inf

    support = [int(norms.argmin())]
    weights = _embed(np.ones(1), support, m)
    best, best_value, best_excess, iterations = weights, math.inf, math.inf, 0
    level: set[frozenset[int]] = set()  # the supports visited at the best |d|² to rounding
    while True:
        relative, value, rounding, value_rounding = violations(weights)
        ratio = excess(relative, value, rounding)
        if value < best_value - value_rounding:  # a measurable decrease: Wolfe's progress
            best, best_value, best_excess, level = weights, value, ratio, set()
        elif value <= best_value + value_rounding and frozenset(support) not in level:
            if ratio < best_excess:  # |d|² is noise here: the KKT conditions tell
                best, best_excess = weights, ratio
            best_value = min(best_value, value)
        else:  # |d|² increased, or a support came back: rounding
            break
        level.add(frozenset(support))
        entering = int(relative.argmax())
        if entering in support or ratio <= 1:
            break
        if iterations == max_iter:
            break
        iterations += 1
        support.append(entering)
        weights, support = _minor_cycle(cosines, norms, weights, support)
    weights = best
    relative, value, rounding, _ = violations(weights)
    beyond = float(relative.max(initial=0.0)) - rounding
    if beyond <= 0:
        residual = 0.0
    else:
        residual = beyond / math.sqrt(value) if value > 0 else math.inf
    return MinNormSolve(weights, iterations, residual, excess(relative, value, rounding) <= 1)


def min_norm_weights(gramian: Tensor, tol: float = 1e-12, max_iter: int = 1000) -> Tensor:
    """:func:`min_norm_solve` of a Gramian tensor: the weights in its dtype and on its device
    (the solve runs in float64 NumPy on the CPU: the Gramian is only ``m × m``). The rounding unit
    is the Gramian's dtype's. When all gradients are zero every ``w`` is optimal and the uniform
    one is returned. A solve that stops before its tolerance warns (``RuntimeWarning``).

    Args:
        gramian: ``[m, m]`` positive semi-definite.
        tol: tolerance of the KKT conditions, relative to ``|g_j| |d|`` (see
            :func:`min_norm_solve`).
        max_iter: bound on the number of major steps (each adds one index).

    Raises:
        NonFiniteError: if the Gramian has NaN or infinite entries.
    """
    solve = _checked_solve(gramian, tol, max_iter)
    if not solve.converged:
        warnings.warn(_not_converged(solve, max_iter), RuntimeWarning, stacklevel=2)
    return torch.from_numpy(solve.weights).to(gramian.device, gramian.dtype)


def _checked_solve(gramian: Tensor, tol: float, max_iter: int) -> MinNormSolve:
    check_gramian(gramian)
    if not bool(torch.isfinite(gramian).all()):
        raise NonFiniteError("MGDA got a Gramian with NaN or infinite entries")
    work = gramian.detach().to("cpu", torch.float64).numpy()
    work = 0.5 * (work + work.T)
    scale = float(work.diagonal().max()) if work.size else 0.0
    work = work / scale if scale > 0 else work
    return min_norm_solve(work, tol, max_iter, float(torch.finfo(gramian.dtype).eps))


def _reason(solve: MinNormSolve, max_iter: int) -> str:
    """Why a solve stopped above its tolerance, in a few stable words (a solver status)."""
    if solve.iterations >= max_iter:
        return f"reached max_iter={max_iter} major steps"
    return "stopped at rounding level"


def _not_converged(solve: MinNormSolve, max_iter: int) -> str:
    return (
        f"MGDA's min-norm solver {_reason(solve, max_iter)} after {solve.iterations} major "
        f"steps with a KKT residual of {solve.residual:.2e} (max_j (|d|² - g_j·d) / "
        "(|g_j| |d|))"
    )


def _minor_cycle(
    cosines: np.ndarray, norms: np.ndarray, weights: np.ndarray, support: list[int]
) -> tuple[np.ndarray, list[int]]:
    """From ``weights`` (positive on ``support`` but for the index that just entered), move towards
    the affine minimiser of the support, dropping the indices whose weight reaches zero, until the
    affine minimiser has positive weights; return it and its support."""
    m = cosines.shape[0]
    while True:
        target = _affine_minimizer(cosines[np.ix_(support, support)], norms[support])
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


def _affine_minimizer(cosines: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """The weights ``v`` (``Σv = 1``) of the min-norm point of the affine hull of the gradients
    with cosine matrix ``cosines`` and norms ``norms`` (see :func:`min_norm_solve`), with one step
    of iterative refinement: near a Pareto-stationary point the least-squares solve alone left
    ``(G v)_j / |g_j|`` 1.4 times its rounding apart on the support."""
    inverse = 1.0 / norms
    inverse = inverse / np.linalg.norm(inverse)
    system = cosines + np.outer(inverse, inverse)
    scaled = np.linalg.lstsq(system, inverse, rcond=None)[0]
    scaled = scaled + np.linalg.lstsq(system, inverse - system @ scaled, rcond=None)[0]
    solution = scaled / norms
    return solution / solution.sum()


@METHODS.register("mgda")
class MGDA(ReportsSolver, Float64GramianWeighting):
    """Multiple-gradient descent (Désidéri 2012; Sener & Koltun, NeurIPS 2018).

    The direction is the min-norm point of the convex hull of the task gradients ``g_i``
    (the rows of ``J``)::

        w* = argmin_{w ∈ Δ} |Σ_i w_i ĝ_i|²,   ĝ_i = g_i / c_i,   d = Σ_i w*_i ĝ_i,

    solved exactly by :func:`min_norm_solve` (its KKT conditions to ``tol`` relative to
    ``|ĝ_j| |d|``, from the float64 Gramian of ``J``). ``d`` does not conflict with any task:
    ``ĝ_i · d ≥ |d|²``; it is zero at a Pareto-stationary point. The decision's ``status`` says
    how the solve ended; one that stops above its tolerance is warned about once per run. The
    scales ``c_i`` follow the paper's code and LibMTL: ``1`` (``"none"``), ``|g_i|``
    (``"l2"``), ``L_i`` (``"loss"``) or ``L_i |g_i|`` (``"loss+"``); a zero ``c_i`` (a zero
    gradient) is replaced by ``1``. The returned weights are those on the original gradients,
    ``w*_i / c_i``, so that the direction is ``weights @ J``.

    The loss normalisations need the (positive) task losses, which ``mtlkit.backward`` passes
    to ``forward``/``weights``; ``needs_losses`` tells whether they are needed.

    Args:
        normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.
        tol: tolerance of the min-norm solver's KKT conditions, relative to ``|ĝ_j| |d|``.
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
        return self.decide(gramian, losses).weights

    def decide(self, gramian: Tensor, losses: Tensor | None = None) -> Decision:
        """The weights of :meth:`weights` and the solver's status."""
        check_gramian(gramian)
        gramian = gramian.detach()
        scales = self._scales(gramian, losses)
        solve = _checked_solve(
            gramian / (scales[:, None] * scales[None, :]), self.tol, self.max_iter
        )
        message = "" if solve.converged else _reason(solve, self.max_iter)
        if message:
            self.warn_once("wolfe", _not_converged(solve, self.max_iter))
        weights = torch.from_numpy(solve.weights).to(gramian) / scales
        status = SolverStatus("wolfe", solve.converged, solve.iterations, solve.residual, message)
        return Decision(weights=weights, status=status)

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
