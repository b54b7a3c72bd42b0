"""GradNorm: learnable task weights that equalise the tasks' gradient norms and training rates."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import Decision, GramianWeighting, check_blocks, check_gramian
from mtlkit.methods.registry import METHODS
from mtlkit.methods.state import LazyBuffers


@METHODS.register("gradnorm")
class GradNorm(LazyBuffers, GramianWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

    Task weights ``w`` (``Σ w_i = m``, ones at the start) scale the task gradients; at step ``t``
    the direction is ``d = Σ_i w_i(t) g_i`` and then the weights take one gradient step of their
    own on::

        G_i = |w_i ∇_W L_i|,   Ḡ = mean_i G_i,   r_i = (L_i(t)/L_i(0)) / mean_j (L_j(t)/L_j(0))
        L_grad = Σ_i |G_i - Ḡ r_i^α|                (the targets Ḡ r_i^α held constant)
        w ← w - lr ∇_w L_grad,  then  w ← m w / Σ_j w_j

    which pulls each gradient norm towards the mean norm, scaled up for the tasks that train
    slower (``α`` sets the strength). The step is task by task: ``w_i`` moves by
    ``lr |∇_W L_i|`` towards its own target, then all weights are rescaled. Only for ``α = 1``
    do the targets average to ``Ḡ`` (the ``r_i`` average to 1); otherwise all tasks can lie
    below (``α > 1``) or above (``α < 1``) their targets, all weights then move the same way,
    and a ratio ``G_i / G_j`` can move away from ``(r_i / r_j)^α`` in one step (LibMTL's
    ``w = m softmax(s)`` does too); this is the paper's rule, kept as is.

    As in the paper (Algorithm 1) the weights have their own update, kept inside the method:
    ``w`` is a buffer, not a parameter, so the model's optimizer never sees it;
    ``∇_{w_i} L_grad = sign(G_i - Ḡ r_i^α) |∇_W L_i|``. ``L_i(0)`` are the losses at the first
    call (they must be positive; the paper uses ``t = 0``, LibMTL the first epoch's mean). A
    weight that the step would make non-positive is set to ``1e-6`` of the mean weight, with a
    ``RuntimeWarning`` (``lr`` is too large for the gradient scale); ``clamped`` counts those
    events. Later losses must be non-negative (``r_i^α`` of a negative ratio is undefined).

    ``W`` is, in the paper, the last shared layer (cheap, and the layer closest to the heads).
    Here the norms come from the Jacobian the method is given: by default all its columns,
    i.e. all shared parameters on the parameter route, or the shared representation ``z`` on
    the features route (LibMTL's ``rep_grad``: ``|∇_z L_i|``, the per-sample gradients of the
    whole batch flattened). Those norms differ from the last layer's, but ``L_grad`` only sees
    their ratios: e.g. for a last layer ``z = W h`` and one sample, ``|∇_W L_i| = |∇_z L_i| |h|``
    for every task, so the weight updates agree up to the constant factor ``|h|`` in the step.
    ``last_blocks = k`` restricts the norms to the last ``k`` blocks of the Jacobian (on the
    parameter route the last ``k`` shared parameter tensors, e.g. 2 for the weight and bias of
    the last ``nn.Linear``): the paper's choice. That needs the Jacobian, so ``weights(G)`` (the
    Gramian-only path) refuses it; with ``last_blocks=None`` GradNorm is a Gramian weighting.

    Args:
        alpha: ``α ≥ 0``, the restoring force (paper: 1.5 for NYUv2).
        lr: the learning rate of the weights' gradient step.
        last_blocks: ``None`` (all columns) or the number of trailing blocks to measure.
    """

    lazy_buffers = ("task_weights", "initial_losses")
    needs_losses = True  # the training rates L_i(t) / L_i(0)

    def __init__(
        self, alpha: float = 1.5, lr: float = 0.025, last_blocks: int | None = None
    ) -> None:
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if last_blocks is not None and (isinstance(last_blocks, bool) or int(last_blocks) < 1):
            raise ValueError(f"last_blocks must be None or a positive integer, got {last_blocks}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.last_blocks = None if last_blocks is None else int(last_blocks)
        self.register_buffer("task_weights", None)
        self.register_buffer("initial_losses", None)
        self.clamped = 0
        self.last_norms: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.clear_lazy_buffers()
        self.clamped = 0
        self.last_norms = None

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        if self.last_blocks is None:
            return super().aggregate(jacobian, losses, blocks)
        if jacobian.dim() != 2 or jacobian.shape[0] == 0:
            raise ValueError(f"expected a Jacobian [m, n], got shape {tuple(jacobian.shape)}")
        sizes = check_blocks(blocks, jacobian.shape[1])
        if self.last_blocks > len(sizes):
            raise ValueError(
                f"GradNorm(last_blocks={self.last_blocks}) needs that many blocks, the Jacobian "
                f"has {len(sizes)}: {sizes}"
            )
        measured = jacobian.detach()[:, jacobian.shape[1] - sum(sizes[-self.last_blocks :]) :]
        weights = self._step(measured.square().sum(dim=1), losses)
        return Decision(weights=weights, direction=weights @ jacobian)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The current weights ``w(t)`` (then updated to ``w(t+1)``), from the norms on the
        Gramian's diagonal; only without ``last_blocks``."""
        check_gramian(gramian)
        if self.last_blocks is not None:
            raise ValueError(
                f"GradNorm(last_blocks={self.last_blocks}) measures the norms on the last blocks "
                "of the Jacobian, which the Gramian does not give; call it on the Jacobian"
            )
        return self._step(gramian.detach().diagonal(), losses)

    def _step(self, squared_norms: Tensor, losses: Tensor | None) -> Tensor:
        """Return ``w(t)`` and update the weights with the norms ``|∇_W L_i|``."""
        if not bool(torch.isfinite(squared_norms).all()):
            raise NonFiniteError("GradNorm got NaN or infinite gradient norms")
        m = squared_norms.shape[0]
        if losses is None:
            raise ValueError("GradNorm needs the task losses: pass losses= to forward/weights")
        losses = losses.detach().to(device=squared_norms.device, dtype=torch.float64)
        if losses.shape != (m,):
            raise ValueError(f"GradNorm got {tuple(losses.shape)} losses for {m} tasks")
        if not bool(torch.isfinite(losses).all()):
            raise NonFiniteError("GradNorm got NaN or infinite task losses")
        if not bool((losses >= 0).all()):
            raise ValueError(f"GradNorm needs non-negative task losses, got {losses.tolist()}")
        if self.task_weights is None:
            if not bool((losses > 0).all()):
                raise ValueError(
                    f"GradNorm needs positive initial losses L_i(0), got {losses.tolist()}"
                )
            self.task_weights = torch.ones(m, dtype=torch.float64, device=losses.device)
            self.initial_losses = losses.clone()
        elif self.task_weights.shape != (m,):
            raise ValueError(
                f"GradNorm has weights for {self.task_weights.numel()} tasks, got {m}; "
                "call reset() between problems"
            )
        current = self.task_weights.clone()
        norms = squared_norms.to(torch.float64).clamp_min(0).sqrt()
        scaled = current * norms
        ratios = losses / self.initial_losses
        mean_ratio = ratios.mean()
        rates = ratios / mean_ratio if mean_ratio > 0 else torch.ones_like(ratios)
        targets = scaled.mean() * rates**self.alpha
        gradient = torch.sign(scaled - targets) * norms
        updated = current - self.lr * gradient
        floor = 1e-6 * float(current.mean())
        if bool((updated <= 0).any()):
            self.clamped += 1
            warnings.warn(
                f"GradNorm: the weight step (lr={self.lr}) made weights non-positive "
                f"{updated.tolist()}; they are set to {floor:g}",
                RuntimeWarning,
                stacklevel=3,
            )
            updated = updated.clamp_min(floor)
        self.task_weights = m * updated / updated.sum()
        self.last_norms = norms
        weights = current.to(squared_norms.dtype)
        return weights
