"""Bilevel loss weightings: Auto-Lambda, MOML and FORUM.

The task weights are *upper-level* variables chosen so that the model, trained on the weighted
training loss (the *lower level*), does well on an auxiliary batch. Before each step the strategy
calls :meth:`~mtlkit.methods.base.Method.prepare` with a :class:`~mtlkit.methods.base.StepProbe`:
the training batch, ``extra_batches = 1`` auxiliary batch, the parameters the step updates
(shared + the step's heads), the model optimizer's learning rate, and ``losses(batch)`` at the
current parameters. The method takes virtual steps on those parameters in place, evaluates
losses there, restores the parameters bit-exactly (:class:`ParameterSnapshot`), and updates its
weights with its *own* optimizer; ``forward`` then returns them detached.

The auxiliary ("validation") batch comes from a separately shuffled stream over the *training*
split (the Trainer's ``BatchStream``), one per step. This is what Auto-Lambda's code does (a second
``DataLoader`` over the training set, ``shuffle=True``); MOML's and FORUM's code draw the lower-
and upper-level batches as two consecutive batches of the training loader and then train the
model on both (halving the steps per epoch), while here the model step uses the training batch
only and every step also consumes one auxiliary batch.

The probe's forward passes run in the model's current mode: batch-norm running statistics see
them (as in the papers' code); the two passes of a finite difference share their random numbers.

The upper-level variables are buffers (``upper``), not parameters: ``parameters()`` is empty, so
the model optimizer (built from ``model.parameters() + method.parameters()``) never sees them.
They and the own optimizer's state are saved by ``state_dict`` and cleared by ``reset``.

Shared math: :class:`ParameterSnapshot` (virtual parameters, exact restore), :func:`flat_gradient`,
:func:`shift_parameters` (a virtual SGD step), :func:`central_difference` (Auto-Lambda's
finite-difference Hessian-vector product), :func:`unrolled_hypergradient` (MOML's exact one-step
hypergradient from two Jacobians), :func:`softmax_jacobian`, :func:`solve_qp` (a small dense
convex QP) and :func:`forum_qp` (FORUM's constrained multi-gradient problem).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import LossWeighting, StepProbe, WeightedLoss, check_losses
from mtlkit.methods.mgda import min_norm_weights
from mtlkit.methods.registry import METHODS

# --------------------------------------------------------------------------------- shared math


class ParameterSnapshot:
    """The values of ``parameters`` at construction, to be copied back exactly.

    Use as a context manager around code that moves the parameters in place (virtual steps);
    the values are restored on exit, also after an exception, and by :meth:`restore` on demand.
    """

    def __init__(self, parameters: Sequence[Tensor]) -> None:
        self.parameters = list(parameters)
        with torch.no_grad():
            self.values = [p.detach().clone() for p in self.parameters]

    def restore(self) -> None:
        """Copy the saved values back (bit-exact)."""
        with torch.no_grad():
            for parameter, value in zip(self.parameters, self.values):
                parameter.copy_(value)

    def __enter__(self) -> ParameterSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def flat_gradient(loss: Tensor, parameters: Sequence[Tensor], retain_graph: bool = False) -> Tensor:
    """``∇ loss`` w.r.t. ``parameters``, flattened and concatenated (zeros where unused)."""
    grads = torch.autograd.grad(loss, parameters, retain_graph=retain_graph, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, parameters)
        ]
    )


def shift_parameters(parameters: Sequence[Tensor], direction: Tensor, scale: float) -> None:
    """``θ ← θ + scale · direction`` in place (``direction`` flat, as :func:`flat_gradient`);
    with ``scale = -lr`` and a gradient this is a virtual SGD step."""
    offset = 0
    with torch.no_grad():
        for p in parameters:
            size = p.numel()
            p.add_(direction[offset : offset + size].view_as(p).to(p.dtype), alpha=scale)
            offset += size


def _rng_devices(parameters: Sequence[Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in parameters if p.device.type == "cuda"})


def _rng_state(devices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """The global random state (CPU and the CUDA ``devices``), to replay random numbers."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple[Tensor, list[Tensor]], devices: Sequence[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in zip(devices, cuda):
        torch.cuda.set_rng_state(value, device)


def central_difference(
    probe: StepProbe, batch: Any, direction: Tensor, radius: float = 0.01
) -> Tensor:
    """The directional derivatives ``J d`` (``[m]``) of the task losses on ``batch`` along the
    flat ``direction`` ``d``, by the central difference::

        (L(θ + ε d) - L(θ - ε d)) / (2 ε),   ε = radius / |d|

    (Auto-Lambda's finite-difference Hessian-vector product: ``∂/∂λ ∇_θ(Σ λ_i L_i)·d = J d``).
    Two forward passes without graph; both see the same random numbers (dropout), and the global
    random state is left untouched; the parameters are restored exactly. ``d = 0`` gives zeros.
    """
    norm = float(direction.norm())
    if not math.isfinite(norm):
        raise NonFiniteError("the finite-difference direction has NaN or infinite entries")
    parameters = probe.parameters
    devices = _rng_devices(parameters)
    if norm == 0.0:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return torch.zeros_like(probe.losses(batch))
    eps = radius / norm
    with ParameterSnapshot(parameters) as snapshot, torch.no_grad():
        shift_parameters(parameters, direction, eps)
        with torch.random.fork_rng(devices=devices):
            plus = probe.losses(batch).detach()
        snapshot.restore()
        shift_parameters(parameters, direction, -eps)
        with torch.random.fork_rng(devices=devices):
            minus = probe.losses(batch).detach()
    return (plus - minus) / (2 * eps)


def unrolled_hypergradient(train_jacobian: Tensor, aux_jacobian: Tensor, lr: float) -> Tensor:
    """The exact hypergradient of one unrolled SGD step, ``[m_aux, m]``::

        θ'(λ) = θ - lr Σ_i λ_i ∇L_i^train(θ)
        ∂L_j^aux(θ')/∂λ_i = -lr ∇L_j^aux(θ') · ∇L_i^train(θ)

    (``θ'`` is linear in ``λ``, so no Hessian appears). ``train_jacobian`` is ``[m, n]`` at ``θ``,
    ``aux_jacobian`` ``[m_aux, n]`` at ``θ'``.
    """
    return -lr * aux_jacobian @ train_jacobian.T


def softmax_jacobian(probabilities: Tensor) -> Tensor:
    """``∂ softmax(α) / ∂α = diag(s) - s sᵀ`` (symmetric) at ``s = softmax(α)``."""
    return torch.diag(probabilities) - torch.outer(probabilities, probabilities)


def _max_step(v: np.ndarray, dv: np.ndarray) -> float:
    """The largest ``t ≤ 1`` with ``v + t dv ≥ 0`` (``v > 0``)."""
    negative = dv < 0
    if not negative.any():
        return 1.0
    return min(1.0, float((-v[negative] / dv[negative]).min()))


def solve_qp(
    hessian: np.ndarray,
    linear: np.ndarray,
    eq_matrix: np.ndarray,
    eq_value: np.ndarray,
    ineq_matrix: np.ndarray,
    ineq_value: np.ndarray,
    start: np.ndarray,
    tol: float = 1e-11,
    max_iter: int = 100,
) -> tuple[np.ndarray, bool]:
    """``min ½ xᵀ P x + pᵀ x  s.t.  A x = b,  G x ≥ h`` for a small dense convex QP (``P`` PSD,
    ``P + GᵀG`` positive definite): Mehrotra's primal-dual interior-point method
    (predictor-corrector) in float64 NumPy (the problems here have a few dozen variables).

    Returns:
        The solution and whether it converged (residuals and the duality measure below ``tol``
        relative to the problem's scale); otherwise the last iterate.
    """
    P, p, A, b, G, h = hessian, linear, eq_matrix, eq_value, ineq_matrix, ineq_value
    n, k, e = P.shape[0], G.shape[0], A.shape[0]
    x = start.astype(np.float64).copy()
    s = np.maximum(G @ x - h, 1.0)
    z = np.ones(k)
    y = np.zeros(e)
    scale = 1.0 + np.abs(P).max() + np.abs(p).max()
    kkt = np.zeros((n + e, n + e))
    kkt[:n, n:] = -A.T
    kkt[n:, :n] = A
    for _ in range(max_iter):
        r_dual = P @ x + p - A.T @ y - G.T @ z
        r_eq = A @ x - b
        r_ineq = G @ x - s - h
        mu = float(s @ z) / k
        residual = max(np.abs(r_dual).max(), np.abs(r_eq).max(), np.abs(r_ineq).max())
        if residual <= tol * scale and mu <= tol * scale:
            return x, True
        kkt[:n, :n] = P + G.T @ ((z / s)[:, None] * G)

        def newton(r_comp: np.ndarray, s=s, z=z, r_dual=r_dual, r_eq=r_eq, r_ineq=r_ineq):
            # slacks eliminated: z∘ds + s∘dz = -r_comp, ds = G dx + r_ineq
            rhs = np.concatenate([-r_dual - G.T @ ((r_comp + z * r_ineq) / s), -r_eq])
            try:
                solution = np.linalg.solve(kkt, rhs)
            except np.linalg.LinAlgError:  # numerically singular near the end
                solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
            dx, dy = solution[:n], solution[n:]
            ds = G @ dx + r_ineq
            return dx, dy, ds, -(r_comp + z * ds) / s

        dx, dy, ds, dz = newton(s * z)  # predictor (affine scaling)
        step = min(_max_step(s, ds), _max_step(z, dz))
        mu_affine = float((s + step * ds) @ (z + step * dz)) / k
        sigma = (mu_affine / mu) ** 3 if mu > 0 else 0.0
        dx, dy, ds, dz = newton(s * z + ds * dz - sigma * mu)  # corrector
        step = min(1.0, 0.99 * min(_max_step(s, ds), _max_step(z, dz)))
        x, y, s, z = x + step * dx, y + step * dy, s + step * ds, z + step * dz
    return x, False


FORUM_GUARD = 1e-8  # FORUM's code adds it to |∇q|² in π and in the constant ρ|∇q|²


def forum_qp(
    gram_upper: Tensor, cross: Tensor, constraint_sq_norm: float, rho: float
) -> tuple[Tensor, Tensor]:
    """FORUM's multi-gradient problem (problem (14) of the paper, as its code solves it).

    With ``g_i`` the (normalised) upper-level gradients, ``q`` the gradient of the value-function
    constraint and ``π_i = ρ - g_i·q / |q|²``::

        min_{λ ∈ Δ, ν ≥ 0, ν ≥ πᵀλ}  |Σ_i λ_i g_i + ν q|² - ν ρ |q|²

    At the optimum ``ν = max(0, πᵀλ)`` (for fixed ``λ`` the objective's unconstrained minimiser in
    ``ν`` is ``πᵀλ - ρ/2`` (up to the guard below), under the bound). Solved on the Gramian by
    :func:`solve_qp`; when ``q = 0`` (the constraint is inactive) it is MGDA's min-norm problem
    (:func:`~mtlkit.methods.mgda.min_norm_weights`). ``|q|²`` is guarded by ``+1e-8`` as in the
    paper's code.

    Args:
        gram_upper: ``[m, m]``, ``g_i · g_j``.
        cross: ``[m]``, ``g_i · q``.
        constraint_sq_norm: ``|q|²``.
        rho: FORUM's ``ρ ≥ 0``.

    Returns:
        ``λ`` (``[m]``, on the simplex) and ``π`` (``[m]``), as tensors like ``gram_upper``.
    """
    like = gram_upper.detach()
    m = like.shape[0]
    gram = like.cpu().double().numpy()
    cross_np = cross.detach().cpu().double().numpy()
    qq = float(constraint_sq_norm) + FORUM_GUARD
    pi = rho - cross_np / qq
    pi_tensor = torch.from_numpy(pi).to(like)
    if constraint_sq_norm <= 0.0:
        return min_norm_weights(like), pi_tensor
    full = np.zeros((m + 1, m + 1))
    full[:m, :m] = gram
    full[:m, m] = full[m, :m] = cross_np
    full[m, m] = float(constraint_sq_norm)
    scale = max(float(full.diagonal().max()), rho * qq, np.finfo(np.float64).tiny)
    linear = np.zeros(m + 1)
    linear[m] = -rho * qq / scale
    eq_matrix = np.zeros((1, m + 1))
    eq_matrix[0, :m] = 1.0
    ineq = np.zeros((m + 2, m + 1))
    ineq[: m + 1, : m + 1] = np.eye(m + 1)  # λ ≥ 0, ν ≥ 0
    ineq[m + 1, :m] = -pi  # ν - πᵀλ ≥ 0
    ineq[m + 1, m] = 1.0
    start = np.full(m + 1, 1.0 / m)
    start[m] = max(0.0, float(pi.mean())) + 1.0
    solution, converged = solve_qp(
        2 * full / scale, linear, eq_matrix, np.ones(1), ineq, np.zeros(m + 2), start
    )
    if not converged:
        warnings.warn(
            "FORUM's QP solver did not converge in 100 interior-point iterations; using its last "
            "iterate",
            RuntimeWarning,
            stacklevel=2,
        )
    weights = np.maximum(solution[:m], 0.0)
    weights = weights / weights.sum()
    return torch.from_numpy(weights).to(like), pi_tensor


# -------------------------------------------------------------------------------- the methods


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


class BilevelWeighting(LossWeighting):
    """Base of the bilevel weightings: upper-level variables ``upper`` (a buffer, ``[m]``) trained
    by an own Adam optimizer (built lazily, state saved through ``get_extra_state``), one
    auxiliary batch per step, and ``prepare(probe)`` to update them before each step.

    ``primary`` are the tasks whose auxiliary losses are the upper-level objectives: all tasks
    (``None``, the multi-task setting of the three papers) or a subset (auxiliary learning, as in
    Auto-Lambda's experiments, where e.g. a noise-prediction task is trained but not primary).

    Subclasses implement ``_initial_upper()`` (a float), ``task_weights()`` and ``prepare``.
    """

    needs_probe = True
    extra_batches = 1

    def __init__(self, meta_lr: float, primary: Sequence[int] | None = None) -> None:
        super().__init__()
        self.meta_lr = _check_positive("meta_lr", meta_lr)
        if primary is not None:
            primary = [int(i) for i in primary]
            if not primary or len(set(primary)) != len(primary) or min(primary) < 0:
                raise ValueError(
                    f"primary must be None or distinct task indices >= 0, got {primary}"
                )
        self.primary = primary
        self.upper: Tensor | None
        self.register_buffer("upper", None)
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self.last_hypergradient: Tensor | None = None  # the last gradient given to the optimizer

    def _initial_upper(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, num_tasks: int) -> None:
        """Create the upper-level variables for ``num_tasks`` tasks (again if the count changed:
        they are the method's own, no model optimizer holds them)."""
        if self.primary is not None and max(self.primary) >= num_tasks:
            raise ValueError(f"primary {self.primary} must be task indices < {num_tasks}")
        super().setup(num_tasks)
        if self.upper is None or self.upper.numel() != num_tasks:
            self.upper = torch.full((num_tasks,), self._initial_upper())
            self._optimizer, self._optimizer_state = None, None

    def reset(self) -> None:
        super().reset()
        if self.upper is not None:  # as at construction (in the default dtype, then cast)
            with torch.no_grad():
                self.upper.copy_(torch.full(self.upper.shape, self._initial_upper()))
        self._optimizer, self._optimizer_state = None, None
        self.last_hypergradient = None

    def task_weights(self) -> Tensor:  # pragma: no cover - abstract
        """The current task weights ``[m]`` (a function of ``upper``)."""
        raise NotImplementedError

    def _require_upper(self, m: int | None = None) -> Tensor:
        if self.upper is None:
            raise RuntimeError(
                f"{type(self).__name__} needs num_tasks: call setup(m) (the Trainer does)"
            )
        if m is not None and m != self.upper.numel():
            raise ValueError(
                f"{type(self).__name__} was set up for {self.upper.numel()} tasks, got {m} losses"
            )
        return self.upper

    def _meta_step(self, gradient: Tensor) -> None:
        """One step of the own optimizer on ``upper`` along ``gradient``."""
        upper = self._require_upper()
        if not bool(torch.isfinite(gradient).all()):
            raise NonFiniteError(
                f"{type(self).__name__}'s hypergradient has NaN or infinite entries: "
                f"{gradient.tolist()}"
            )
        optimizer = self._meta_optimizer()
        upper.grad = gradient.detach().to(upper)
        optimizer.step()
        upper.grad = None
        self.last_hypergradient = gradient.detach()

    def _meta_optimizer(self) -> torch.optim.Optimizer:
        upper = self._require_upper()
        if self._optimizer is not None and self._optimizer.param_groups[0]["params"][0] is upper:
            return self._optimizer
        # first use, or the module was moved (.to) and ``upper`` is a new tensor
        state = self._optimizer_state
        if self._optimizer is not None:
            state = self._optimizer.state_dict()
        self._optimizer = torch.optim.Adam([upper], lr=self.meta_lr)
        if state is not None:
            self._optimizer.load_state_dict(state)
        self._optimizer_state = None
        return self._optimizer

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a method loaded before ``setup`` takes its task count from the checkpoint
        for name, value in self._buffers.items():
            if value is None and prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        if self.upper is not None and not hasattr(self, "num_tasks"):
            self.num_tasks = self.upper.numel()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def get_extra_state(self) -> dict[str, Any]:
        state = self._optimizer_state
        if self._optimizer is not None:
            state = self._optimizer.state_dict()
        return {"optimizer": copy.deepcopy(state)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._optimizer = None
        self._optimizer_state = copy.deepcopy(state["optimizer"])

    def forward(self, losses: Tensor) -> WeightedLoss:
        check_losses(losses)
        self._require_upper(losses.numel())
        return WeightedLoss(self.task_weights().detach().to(losses))

    def _primary_losses(self, losses: Tensor) -> Tensor:
        """The primary tasks' entries of ``[m]`` task losses."""
        return losses if self.primary is None else losses[self.primary]

    def _primary_list(self, losses: list[Tensor]) -> list[Tensor]:
        """The primary tasks' entries of a list of task losses."""
        return losses if self.primary is None else [losses[i] for i in self.primary]

    def _aux_batch(self, probe: StepProbe) -> Any:
        if len(probe.extra) < 1:
            raise ValueError(
                f"{type(self).__name__} needs one auxiliary batch in probe.extra, got none"
            )
        return probe.extra[0]


@METHODS.register("auto_lambda")
class AutoLambda(BilevelWeighting):
    """Auto-Lambda (Liu, Johns & Davison, "Auto-Lambda: Disentangling Dynamic Task
    Relationships", TMLR 2022).

    The task weights ``λ`` (raw, unconstrained: they may become negative, as in the paper's code)
    minimise the primary tasks' loss after one virtual SGD step of the model::

        θ' = θ - lr ∇_θ Σ_i λ_i L_i(θ; batch)
        min_λ  L_up(θ') = Σ_{i ∈ primary} L_i(θ'; aux)
        ∂L_up/∂λ_i = -lr ∇L_i(θ; batch) · ∇L_up(θ')
                   ≈ -lr (L_i(θ⁺; batch) - L_i(θ⁻; batch)) / (2ε),
        θ± = θ ± ε ∇L_up(θ'),  ε = 0.01 / |∇L_up(θ')|

    (:func:`central_difference`: two forward passes instead of a Jacobian), then one Adam step on
    ``λ`` (lr ``meta_lr``); the model step uses ``Σ λ_i L_i`` (with ``init = 0.1`` the model's
    effective learning rate starts at a tenth of ``EW``'s, as in the paper's code). ``lr`` is the
    model optimizer's
    learning rate (``probe.learning_rate``, the scheduler's current value, as in the paper's
    code). ``primary`` = all tasks is the multi-task setting; a subset is auxiliary learning.

    Differences from the paper's code: the virtual step is plain SGD (its code adds the SGD
    optimizer's momentum buffer and weight decay; the probe does not expose optimizer state);
    the auxiliary batch is drawn from a separately shuffled stream over the training split, as
    there.

    Args:
        primary: indices of the primary tasks; ``None`` = all (multi-task learning).
        init: initial value of every ``λ_i`` (0.1 in the paper's code).
        meta_lr: Adam learning rate of ``λ`` (1e-4 for dense prediction, 3e-4 for CIFAR-100 in
            the paper's code).
        radius: ``ε |∇L_up|`` of the finite difference (0.01).
    """

    def __init__(
        self,
        primary: Sequence[int] | None = None,
        init: float = 0.1,
        meta_lr: float = 1e-4,
        radius: float = 0.01,
    ) -> None:
        super().__init__(meta_lr, primary)
        self.init = float(init)
        if not math.isfinite(self.init):
            raise ValueError(f"init must be finite, got {init}")
        self.radius = _check_positive("radius", radius)

    def hparams(self) -> dict[str, object]:
        return {
            "primary": self.primary,
            "init": self.init,
            "meta_lr": self.meta_lr,
            "radius": self.radius,
        }

    def _initial_upper(self) -> float:
        return self.init

    def task_weights(self) -> Tensor:
        return self._require_upper()

    def prepare(self, probe: StepProbe) -> None:
        aux = self._aux_batch(probe)
        lam = self._require_upper()
        params = probe.parameters
        lr = probe.learning_rate
        with ParameterSnapshot(params):
            losses = probe.losses(probe.batch)
            self._require_upper(losses.numel())
            gradient = flat_gradient((lam.to(losses) * losses).sum(), params)
            shift_parameters(params, gradient, -lr)  # θ'
            upper_loss = self._primary_losses(probe.losses(aux)).sum()
            upper_gradient = flat_gradient(upper_loss, params)
        products = central_difference(probe, probe.batch, upper_gradient, self.radius)
        self._meta_step(-lr * products)


def _softmax_upper(method: BilevelWeighting) -> Tensor:
    return torch.softmax(method._require_upper(), dim=0)


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
        self.inner_lr = None if inner_lr is None else _check_positive("inner_lr", inner_lr)
        if normalization not in ("l2", "none"):
            raise ValueError(f"normalization must be 'l2' or 'none', got {normalization!r}")
        self.normalization = normalization
        self.last_mgda_weights: Tensor | None = None
        self.last_unrolled: Tensor | None = None

    def hparams(self) -> dict[str, object]:
        return {
            "meta_lr": self.meta_lr,
            "inner_lr": self.inner_lr,
            "normalization": self.normalization,
            "primary": self.primary,
        }

    def _initial_upper(self) -> float:
        return 0.0  # any constant: softmax gives 1/m

    def task_weights(self) -> Tensor:
        return _softmax_upper(self)

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
        gramian = rows @ rows.T
        if self.normalization == "l2":
            norms = gramian.diagonal().clamp_min(0).sqrt()
            norms = torch.where(norms > 0, norms, torch.ones_like(norms))
            gramian = gramian / torch.outer(norms, norms)
        mgda = min_norm_weights(gramian)
        self.last_mgda_weights = mgda
        self.last_unrolled = hyper
        self._meta_step(mgda @ rows)


@METHODS.register("forum")
class FORUM(BilevelWeighting):
    """FORUM: a first-order multi-gradient method for multi-objective bilevel optimisation (Ye,
    Lin, Cao, Zhang & Tsang, "A First-Order Multi-Gradient Algorithm for Multi-Objective Bi-Level
    Optimization", ECAI 2024), in its multi-task form (as the paper's code).

    Upper variables ``α`` (task weights ``s = softmax(α)``, initially ``1/m``), lower variables
    ``ω`` (the model); ``f(α, ω) = Σ_i s_i L_i(ω; batch)``, upper objectives
    ``F_j(ω) = L_j(ω; aux)`` for the primary tasks ``j``. The value function
    ``f*(α) = min_ω f(α, ω)`` turns the bilevel problem into the constrained multi-objective
    problem ``min F(α, ω) s.t. q(α, ω) = f(α, ω) - f*(α) ≤ 0``, with ``f*(α) ≈ f(α, ω^T)``:
    ``T`` gradient steps on ``f(α, ·)`` from the current ``ω`` (all the step's parameters, the
    training batch, the current ``s``), each with a backtracking line search::

        ω^{t+1} = ω^t - η_t ∇_ω f(α, ω^t),   η_t = the first of η_{t-1}, η_{t-1}/2, ... with
        f(α, ω^{t+1}) ≤ f(α, ω^t) - η_t/2 |∇_ω f(α, ω^t)|²     (η_{-1} = η = ``inner_lr``)

    (the descent lemma's decrease, guaranteed for ``η_t ≤ 1/L`` when ``f(α, ·)`` is ``L``-smooth,
    the step sizes the paper's analysis assumes; ``L`` of a trained network is not known and
    grows during training). So ``f(α, ω^T) ≤ f(α, ω)`` and the estimate of ``q`` is never
    negative. At each step, with ``z = (α, ω)``::

        ∇q = (∇_α f(α, ω) - ∇_α f(α, ω^T),  ∇_ω f(α, ω))       (∇_α f = (diag(s) - ssᵀ) L)
        g_j = (0, ∇_ω F_j / |∇_ω F_j|),   π_j = ρ - g_j·∇q / |∇q|²
        λ̃ = argmin_{λ ∈ Δ, ν ≥ max(0, πᵀλ)} |Σ λ_j g_j + ν ∇q|² - ν ρ |∇q|²    (:func:`forum_qp`)
        λ ← λ + β_e (λ̃ - λ),   β_e = (e + 1)^(-ema_power)  (e: completed epochs; λ starts at 0)
        ν = max(0, πᵀλ),   d = Σ_j λ_j g_j + ν ∇q
        α ← Adam(α, d_α = ν ∇_α q);   ω ← model optimizer(ω, d_ω)

    ``d`` decreases the constraint at rate ``ρ``: ``d·∇q ≥ ρ |∇q|²``. ``ν`` grows as ``|∇q|``
    shrinks, but ``|g_j| ≤ 1`` bounds it by ``ρ + 1/|∇q|``, so ``|ν ∇q| ≤ 1 + ρ |∇q|``. The
    model direction ``d_ω = Σ_j λ_j ∇_ω F_j/|∇_ω F_j| + ν Σ_i s_i ∇L_i(ω; batch)`` reaches the
    model optimizer through this method's :class:`WeightedLoss`: weights ``ν s`` (with ``s``
    before the ``α`` step, as in the paper's code) on the training losses, and an ``extra`` term
    linear in the step's parameters whose gradient is the upper-level part (so the update is
    exact on either gradient route). So, as in FORUM, the model also descends the auxiliary
    batch's normalised gradients. The weights logged for a step are ``ν s``: the training losses'
    share of the update; the upper-level part has the weights ``upper_weights`` (``λ``, on the
    normalised auxiliary gradients) and ``ν`` is in ``last_multiplier``.

    ``forward`` must follow a ``prepare`` (it consumes the upper-level part computed there).

    Differences from the paper's code:

    * The inner steps: there, ``T`` SGD steps of the fixed size ``η``, stopped when the weighted
      loss exceeds 1e5. Fixed-size gradient descent diverges once the sharpness of ``f(α, ·)``
      (the Hessian's largest eigenvalue) exceeds ``2/η``, and training sharpens the model: on
      MultiDigits (HPS, MLP, Adam 1e-3) it exceeds ``2/0.1`` within the first 40 steps and
      reaches about 550 by epoch 7. Then ``f(α, ω^T)`` reaches 1e2-1e20 times ``f(α, ω)`` (a
      negative estimate of ``q``), ``∇_α q`` (the softmax Jacobian times ``L(ω) - L(ω^T)``)
      follows, ``|∇q|²`` overflows and the hypergradient is NaN. Here the line search keeps
      every step a descent step; it starts at ``η`` in each ``prepare``. It is the
      algorithm and does not warn; a search that finds no decrease down to
      ``η_{t-1}·2^-40`` (only for a direction that is not a descent direction) stops the inner
      steps with a ``RuntimeWarning``. The accepted step size and the values ``f(α, ω^t)`` of
      the last ``prepare`` are in ``last_inner_lr`` and ``last_inner_values``.
    * All evaluations of ``f(α, ·)`` in a ``prepare`` replay the random numbers of the first
      (the same dropout mask, so the line search compares like with like; there each inner step
      draws new ones); they leave the global random state as the first one leaves it.
    * The model is trained on the training batch and the auxiliary batch of the step (there:
      two consecutive batches of the loader, half as many steps per epoch).

    Args:
        meta_lr: Adam learning rate of ``α`` (1e-3 in the paper's code).
        inner_lr: ``η``, the first (largest) step size of the inner steps approximating ``f*``
            (0.1, as for NYUv2 and Office in the paper's code with a model learning rate of
            1e-4; its QM9 runs, with 1e-3, use 0.01).
        inner_steps: ``T`` (5).
        rho: ``ρ ≥ 0``, the required rate of decrease of the constraint (0.1).
        ema_power: ``β_e = (e + 1)^(-ema_power)`` (0.75; 0 = no averaging of ``λ``).
        primary: indices of the tasks whose auxiliary losses are the upper-level objectives;
            ``None`` = all (the paper's multi-task setting).
    """

    line_search_halvings = 40  # the smallest inner step size tried is η_{t-1}·2^-40

    def __init__(
        self,
        meta_lr: float = 1e-3,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        rho: float = 0.1,
        ema_power: float = 0.75,
        primary: Sequence[int] | None = None,
    ) -> None:
        super().__init__(meta_lr, primary)
        self.inner_lr = _check_positive("inner_lr", inner_lr)
        if int(inner_steps) != inner_steps or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps}")
        self.inner_steps = int(inner_steps)
        self.rho = float(rho)
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        self.ema_power = float(ema_power)
        if not (math.isfinite(self.ema_power) and self.ema_power >= 0):
            raise ValueError(f"ema_power must be a finite number >= 0, got {ema_power}")
        self.upper_weights: Tensor | None
        self.register_buffer("upper_weights", None)
        self.epochs_done = 0
        self._pending: tuple[Tensor, list[nn.Parameter], Tensor] | None = None
        self.last_multiplier: float | None = None
        self.last_inner_lr: float | None = None
        self.last_inner_values: list[float] | None = None

    def hparams(self) -> dict[str, object]:
        return {
            "meta_lr": self.meta_lr,
            "inner_lr": self.inner_lr,
            "inner_steps": self.inner_steps,
            "rho": self.rho,
            "ema_power": self.ema_power,
            "primary": self.primary,
        }

    def _initial_upper(self) -> float:
        return 0.0

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        count = num_tasks if self.primary is None else len(self.primary)
        if self.upper_weights is None or self.upper_weights.numel() != count:
            self.upper_weights = torch.zeros(count)

    def reset(self) -> None:
        super().reset()
        if self.upper_weights is not None:
            with torch.no_grad():
                self.upper_weights.zero_()
        self.epochs_done = 0
        self._pending = None
        self.last_multiplier = None
        self.last_inner_lr = None
        self.last_inner_values = None

    def on_epoch_end(self, epoch: int) -> None:
        self.epochs_done += 1

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "epochs_done": self.epochs_done}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.epochs_done = int(state["epochs_done"])

    def task_weights(self) -> Tensor:
        return _softmax_upper(self)

    def prepare(self, probe: StepProbe) -> None:
        from mtlkit.engine.jacobian import jacobian

        aux = self._aux_batch(probe)
        params = probe.parameters
        weights = self.task_weights()
        with ParameterSnapshot(params):
            rng = _rng_state(_rng_devices(params))  # the random numbers of every f(α, ·)
            losses = probe.losses(probe.batch)
            self._require_upper(losses.numel())
            s = weights.to(losses)
            start_losses = losses.detach()
            lower_gradient = flat_gradient((s * losses).sum(), params)  # ∇_ω f(α, ω)
            inner_losses = self._inner_descent(probe, s, start_losses, lower_gradient, rng)
        jac_s = softmax_jacobian(s)
        alpha_part = jac_s @ (start_losses - inner_losses)  # ∇_α q
        aux_losses = self._primary_list(probe.loss_list(aux))
        upper_jacobian = jacobian(aux_losses, params, retain_graph=False)
        norms = upper_jacobian.norm(dim=1, keepdim=True)
        upper_jacobian = upper_jacobian / (norms + FORUM_GUARD)
        qq = float(lower_gradient @ lower_gradient + alpha_part @ alpha_part)
        cross = upper_jacobian @ lower_gradient
        solution, pi = forum_qp(upper_jacobian @ upper_jacobian.T, cross, qq, self.rho)
        lam = self._update_upper_weights(solution)
        nu = max(float(lam.to(pi) @ pi), 0.0)
        self.last_multiplier = nu
        model_weights = (nu * s).detach()
        upper_part = lam.to(upper_jacobian) @ upper_jacobian
        self._pending = (model_weights, list(params), upper_part.detach())
        self._meta_step(nu * alpha_part)

    def _inner_descent(
        self,
        probe: StepProbe,
        s: Tensor,
        losses: Tensor,
        gradient: Tensor,
        rng: tuple[Tensor, list[Tensor]],
    ) -> Tensor:
        """``T`` line-searched gradient steps on ``f(α, ·) = Σ s_i L_i(·; batch)`` from the
        current parameters (``losses`` and ``gradient`` there); returns the task losses at
        ``ω^T`` and leaves the parameters there (the caller restores them). Every evaluation
        replays the random state ``rng``; the global random state is left as it was."""
        params = probe.parameters
        devices = _rng_devices(params)
        value = float((s * losses).sum())
        if not math.isfinite(value):
            raise NonFiniteError(f"FORUM's weighted training loss is {value}")
        slack = 4 * torch.finfo(losses.dtype).eps  # rounding of the loss, relative
        lr = self.inner_lr
        values = [value]
        current: Tensor = losses.detach()
        with torch.random.fork_rng(devices=devices):
            for step in range(self.inner_steps):
                if not bool(torch.isfinite(gradient).all()):
                    raise NonFiniteError(
                        f"FORUM's lower-level gradient has NaN or infinite entries at inner "
                        f"step {step}"
                    )
                sq_norm = float(gradient @ gradient)
                origin = ParameterSnapshot(params)
                graph = step + 1 < self.inner_steps  # the next step needs the gradient
                accepted = False
                for halving in range(self.line_search_halvings + 1):
                    if halving:
                        origin.restore()
                        lr /= 2
                    shift_parameters(params, gradient, -lr)
                    _set_rng_state(rng, devices)
                    with torch.set_grad_enabled(graph):
                        trial = probe.losses(probe.batch)
                    trial_value = float((s * trial.detach()).sum())
                    # NaN compares False: rejected
                    if trial_value <= value - 0.5 * lr * sq_norm + slack * abs(value):
                        accepted = True
                        break
                if not accepted:
                    origin.restore()
                    warnings.warn(
                        f"FORUM's inner line search found no decrease of the weighted training "
                        f"loss {value:.6g} down to the step size {lr:.3g} at inner step {step}; "
                        f"f* is approximated after {step} inner steps",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    break
                value, current = trial_value, trial.detach()
                values.append(value)
                if graph:
                    gradient = flat_gradient((s * trial).sum(), params)
        self.last_inner_lr = lr
        self.last_inner_values = values
        return current

    def _update_upper_weights(self, solution: Tensor) -> Tensor:
        if self.upper_weights is None:  # pragma: no cover - setup creates it
            raise RuntimeError("FORUM needs setup(m)")
        beta = (self.epochs_done + 1.0) ** (-self.ema_power)
        with torch.no_grad():
            self.upper_weights.add_(beta * (solution.to(self.upper_weights) - self.upper_weights))
        return self.upper_weights.detach().clone()

    def forward(self, losses: Tensor) -> WeightedLoss:
        check_losses(losses)
        self._require_upper(losses.numel())
        if self._pending is None:
            raise RuntimeError(
                "FORUM's update is decided by prepare(probe) before each step (the Trainer's "
                "strategies call it); forward was called without a new prepare"
            )
        weights, params, direction = self._pending
        self._pending = None
        extra = None
        offset = 0
        for p in params:
            piece = direction[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            term = (p * piece).sum()
            extra = term if extra is None else extra + term
        return WeightedLoss(weights.to(losses), extra)
