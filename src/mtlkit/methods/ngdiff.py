"""NGDiff: normalized gradient difference for two objectives (retain / forget)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import GramianWeighting, StepProbe, check_gramian
from mtlkit.methods.registry import METHODS


@METHODS.register("ngdiff")
class NGDiff(GramianWeighting):
    """Normalized gradient difference (Bu, Jin, Vinzamuri, Ramakrishna, Chang, Cevher & Hong,
    "Unlearning as multi-task optimization: A normalized gradient difference approach with an
    adaptive learning rate", arXiv 2410.22086, 2024; NAACL 2025).

    Two objectives: task 0 is the loss to *minimise* (the retain loss ``L_R``), task 1 the loss
    to *maximise* (the forget loss ``L_F``, given as the ordinary, positive loss on the forget
    data, not negated). The direction, which the optimizer then descends, is::

        d = s · (g_R / |g_R| - g_F / |g_F|)

    i.e. weights ``w = s · (1/|g_R|, -1/|g_F|)``: descent on ``L_R`` and ascent on ``L_F``, each
    with a unit-norm gradient, so ``d`` has a positive projection on ``g_R`` and a negative one
    on ``g_F`` (it stays in the paper's "green area") whatever the loss scales. A zero gradient
    contributes nothing. Exactly two tasks; anything else raises.

    ``s`` is the adaptive learning-rate factor (1 unless ``adaptive_lr``). The paper sets the
    step size along ``d`` by GeN (Bu & Xu, "Gradient descent with generalized Newton's method",
    ICLR 2025), ``η* = ∇L · d / dᵀ ∇²L d``, the minimiser of a quadratic model of a loss along
    the step. mtlkit takes ``L = L_R``, the retain loss, since the forget loss is unbounded
    above and cannot set a step size (an assumption: not checked against the paper's text),
    estimated by finite differences from three losses::

        η* = η (L₊ - L₋) / (2 (L₊ - 2 L₀ + L₋)),   L± = L_R(θ ± η d),  L₀ = L_R(θ)

    with ``η`` the previous effective step. Since the step size belongs to the optimizer,
    mtlkit returns it as a scale of the direction: ``s = η* / lr`` with ``lr`` the optimizer's
    learning rate, so that an SGD step ``θ ← θ - lr · d`` moves by ``η*`` (with Adam-type
    optimizers a scale of the gradient has little effect: use plain SGD with ``adaptive_lr``).

    With ``adaptive_lr`` the method sets ``needs_probe``: before each step the strategy calls
    :meth:`prepare` with a :class:`~mtlkit.methods.base.StepProbe`; it computes ``d`` over
    ``probe.parameters`` (the two task gradients, one backward each), evaluates ``L_R`` at
    ``θ ± η d`` (two forward passes, the parameters restored exactly) and updates ``s``. When
    the model has task-specific parameters, that ``d`` is normalised over all of them, whereas
    the step's direction is normalised over the shared ones: GeN's step is then an
    approximation (in the paper's setting every parameter is shared). When the fit has no
    positive curvature or gives no positive step, ``s`` is kept and ``skipped`` counts it
    (with a ``RuntimeWarning``).

    Args:
        adaptive_lr: estimate ``s`` by GeN before each step (needs the probe hook).
    """

    def __init__(self, adaptive_lr: bool = False) -> None:
        super().__init__()
        self.adaptive_lr = bool(adaptive_lr)
        self.needs_probe = self.adaptive_lr  # type: ignore[misc]
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))
        self.skipped = 0

    def reset(self) -> None:
        super().reset()
        self.scale.fill_(1.0)
        self.skipped = 0

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """``s · (1/|g_R|, -1/|g_F|)`` (0 for a zero gradient)."""
        check_gramian(gramian)
        if gramian.shape[0] != 2:
            raise ValueError(
                f"NGDiff takes exactly two objectives (retain, forget), got {gramian.shape[0]}"
            )
        if not bool(torch.isfinite(gramian).all()):
            raise NonFiniteError("NGDiff got a Gramian with NaN or infinite entries")
        norms = gramian.detach().diagonal().clamp_min(0).sqrt()
        inverse = torch.where(norms > 0, 1 / torch.where(norms > 0, norms, 1.0), 0.0)
        signs = torch.tensor([1.0, -1.0], dtype=gramian.dtype, device=gramian.device)
        weights = self.scale.to(gramian.dtype) * signs * inverse
        return weights

    def prepare(self, probe: StepProbe) -> None:
        """Update the learning-rate factor ``s`` by GeN (see the class docstring)."""
        if not self.adaptive_lr:
            return
        params = list(probe.parameters)
        losses = probe.losses(probe.batch)
        if losses.dim() != 1 or losses.numel() != 2:
            raise ValueError(
                f"NGDiff takes exactly two objectives (retain, forget), got {losses.numel()}"
            )
        retain = torch.autograd.grad(losses[0], params, retain_graph=True, allow_unused=True)
        forget = torch.autograd.grad(losses[1], params, allow_unused=True)
        retain = [torch.zeros_like(p) if g is None else g for p, g in zip(params, retain)]
        forget = [torch.zeros_like(p) if g is None else g for p, g in zip(params, forget)]
        direction = _normalized(retain)
        direction = [r - f for r, f in zip(direction, _normalized(forget))]
        step = float(probe.learning_rate) * float(self.scale)
        if step <= 0 or not any(bool(d.any()) for d in direction):
            return
        base = float(losses[0].detach())
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(d, alpha=step)
                ahead = float(probe.losses(probe.batch)[0])
                for p, s, d in zip(params, saved, direction):
                    p.copy_(s).sub_(d, alpha=step)
                behind = float(probe.losses(probe.batch)[0])
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        self.update_scale(base, ahead, behind, step, float(probe.learning_rate))

    def update_scale(
        self, base: float, ahead: float, behind: float, step: float, learning_rate: float
    ) -> None:
        """Set ``s = η*/lr`` from ``L₀ = base``, ``L₊ = ahead``, ``L₋ = behind`` measured at
        ``θ ± step · d``, or keep it (counting a skip) when the fit is not usable."""
        curvature = ahead - 2 * base + behind
        optimum = step * (ahead - behind) / (2 * curvature) if curvature > 0 else float("nan")
        if not (optimum > 0 and optimum < float("inf")):
            self.skipped += 1
            warnings.warn(
                f"NGDiff: the GeN fit along the step gave no positive step (L- = {behind:g}, "
                f"L0 = {base:g}, L+ = {ahead:g}); the learning-rate factor stays "
                f"{float(self.scale):g}",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.scale.fill_(optimum / learning_rate)


def _normalized(gradients: list[Tensor]) -> list[Tensor]:
    """The gradient (a list of tensors) divided by its norm; zero stays zero."""
    norm = sum(g.detach().double().square().sum() for g in gradients) ** 0.5
    if norm <= 0:
        return [g.detach() for g in gradients]
    return [g.detach() / norm.to(g.dtype) for g in gradients]
