"""ExcessMTL: robust task weights from estimated excess risks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.methods.base import Decision, GradientAggregator, check_jacobian
from mtlkit.methods.registry import METHODS
from mtlkit.methods.state import LazyBuffers


@METHODS.register("excess_mtl")
class ExcessMTL(LazyBuffers, GradientAggregator):
    """ExcessMTL (He, Zhou, Zhao & Wang, "Robust Multi-Task Learning with Excess Risks",
    ICML 2024).

    The weights follow the tasks' *excess* risks (distance to their own optimum) rather than
    their losses, so that a task with high irreducible noise does not take over. The excess
    risk ``L_i(θ) - L_i(θ_i*) ≈ ½ g_iᵀ H_i⁻¹ g_i`` is estimated with the diagonal AdaGrad
    approximation of the Hessian, and the weights are updated multiplicatively (exponentiated
    gradient ascent on the worst-case mixture). At step ``t``::

        s_i ← s_i + g_i ⊙ g_i                        (per coordinate, s_i = 0 at the start)
        e_i = g_iᵀ diag(√(s_i + ε))⁻¹ g_i
        w_i ← w_i exp(η e_i / e_i⁰),   w ← m w / Σ_j w_j        (w = 1 at the start)
        d   = Σ_i w_i g_i

    ``e_i⁰`` is task ``i``'s first positive estimate (the first step for every task with a
    nonzero gradient), which makes the update invariant to each task's loss scale; the weights
    are not changed at the step that sets it. This follows the authors' code and LibMTL
    (``robust_step_size`` ``η = 0.01``, ``ε = 1e-7``, weights summing to ``m``; the paper writes
    the weights on the simplex, i.e. divided by ``m``, which only rescales the step).

    ``s`` is ``[m, n]`` and refers to fixed coordinates: use the parameter route (on the
    features route the columns are per-sample feature gradients, which change from batch to
    batch). The direction is ``w @ J`` (the decision's ``weights = w``). State (``s``, ``w``,
    ``e⁰``) is saved by ``state_dict``.

    Args:
        robust_step_size: ``η > 0``.
        eps: ``ε > 0`` inside the square root.
    """

    lazy_buffers = ("accumulator", "task_weights", "reference")

    def __init__(self, robust_step_size: float = 1e-2, eps: float = 1e-7) -> None:
        super().__init__()
        if not robust_step_size > 0:
            raise ValueError(f"robust_step_size must be positive, got {robust_step_size}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.robust_step_size = float(robust_step_size)
        self.eps = float(eps)
        self.register_buffer("accumulator", None)  # s: [m, n]
        self.register_buffer("task_weights", None)  # w: [m]
        self.register_buffer("reference", None)  # e⁰: [m], 0 until set
        self.last_excess: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.clear_lazy_buffers()
        self.last_excess = None

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        check_jacobian(jacobian, self)
        jac = jacobian.detach()
        m = jac.shape[0]
        if self.accumulator is None:
            self.accumulator = torch.zeros_like(jac)
            self.task_weights = torch.ones(m, dtype=torch.float64, device=jac.device)
            self.reference = torch.zeros(m, dtype=torch.float64, device=jac.device)
        elif self.accumulator.shape != jac.shape:
            raise ValueError(
                f"ExcessMTL accumulates gradients of shape {tuple(self.accumulator.shape)}, got "
                f"a Jacobian {tuple(jac.shape)}; it needs the same tasks and shared parameters at "
                "every step (the parameter route); call reset() between problems"
            )
        accumulator = self.accumulator.to(jac) + jac.square()
        self.accumulator = accumulator
        excess = (jac.square() / (accumulator + self.eps).sqrt()).sum(dim=1).to(torch.float64)
        reference = self.reference
        known = reference > 0
        ratio = torch.where(known, excess / torch.where(known, reference, 1.0), 0.0)
        # w_i exp(η r_i) / Σ_j w_j exp(η r_j) as a softmax of log-weights: the same numbers, but
        # a reference taken on a plateau (a tiny first excess) gives ratios whose exp overflowed
        # to inf and the weights to inf / inf = NaN (the 2-D toy from (9, 9), step 2812)
        logits = self.task_weights.log() + self.robust_step_size * ratio.clamp(max=1e300)
        weights = m * torch.softmax(logits, dim=0)
        self.task_weights = weights
        self.reference = torch.where(known | (excess <= 0), reference, excess)
        self.last_excess = excess
        out = weights.to(jac.dtype)
        return Decision(weights=out, direction=out @ jac)
