"""What the bilevel weightings share: :class:`BilevelWeighting` (upper-level variables trained
by an own Adam optimizer before each step), :class:`ParameterSnapshot` (virtual parameters,
restored bit-exactly), :func:`flat_gradient`, :func:`shift_parameters` (a virtual SGD step),
:func:`softmax_jacobian` and the random-state helpers that let several forward passes see the
same random numbers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import LossWeighting, StepProbe, WeightedLoss, check_losses


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


def rng_devices(parameters: Sequence[Tensor]) -> list[int]:
    """The CUDA device indices of ``parameters`` (whose random states a replay must restore)."""
    return sorted({p.device.index or 0 for p in parameters if p.device.type == "cuda"})


def rng_state(devices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """The global random state (CPU and the CUDA ``devices``), to replay random numbers."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def set_rng_state(state: tuple[Tensor, list[Tensor]], devices: Sequence[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in zip(devices, cuda):
        torch.cuda.set_rng_state(value, device)


def softmax_jacobian(probabilities: Tensor) -> Tensor:
    """``∂ softmax(α) / ∂α = diag(s) - s sᵀ`` (symmetric) at ``s = softmax(α)``."""
    return torch.diag(probabilities) - torch.outer(probabilities, probabilities)


def check_positive(name: str, value: float) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is finite and > 0."""
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
        self.meta_lr = check_positive("meta_lr", meta_lr)
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

    def _softmax_weights(self) -> Tensor:
        """``softmax(upper)``: task weights on the simplex (MOML, FORUM)."""
        return torch.softmax(self._require_upper(), dim=0)

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
