"""Mixed precision: autocast around the forward pass, and a loss scaler for per-task gradients.

``amp="bf16"`` (CPU and CUDA) or ``amp="fp16"`` (CUDA only) runs the model's forward pass under
``torch.autocast``; the task outputs are cast back to float32 before the losses are computed, so
losses, Jacobians w.r.t. the (float32) parameters and the methods all work in float32.

fp16 has a narrow exponent range: small gradients underflow to zero in the half-precision
backward. As with ``torch.amp.GradScaler``, the gradient flowing out of every task loss is
multiplied by a scale ``S`` (a power of two), and the scale adapts: it is halved (``backoff``)
whenever the scaled gradients hold an inf or NaN, and that optimizer step is skipped; it is doubled
(``growth``) after ``growth_interval`` steps in a row without one. bf16 has float32's exponent
range and needs no scaler (``amp="bf16"`` uses none unless one is given).

Why not ``GradScaler`` itself: a gradient aggregator must see the *unscaled* per-task Jacobian
(most methods are not scale-invariant: MGDA's normalisation, Nash-MTL, FAMO's logs), and the
direction it returns joins gradients that are still scaled (the heads'); GradScaler only unscales
an optimizer's ``.grad`` and keeps its inf bookkeeping private per optimizer, which fits neither
the Jacobian nor several optimizers per batch (alternating strategy) nor a skip decision that
every process must take together (DDP). :class:`LossScaler` is the same state machine, with the
unscaling exposed:

* the losses keep their values and only their gradient is scaled (:meth:`LossScaler.scale_loss`),
  so a method sees the true losses;
* the engine unscales the Jacobian before the method runs and returns the direction scaled
  again (:class:`mtlkit.parallel.ddp.Reducer`), so every model ``.grad`` carries the factor ``S``;
* before the optimizer step the model's gradients are unscaled, checked, and the step is taken or
  skipped (:meth:`LossScaler.unscale_`, :meth:`LossScaler.update`). A method's own parameters
  (UW's log-variances) get their gradient from the loss values, not through the scaled model
  backward, and are never scaled.

A loss that is itself inf or NaN (an overflow in the *forward* pass) is not a scaling problem
(a smaller scale would not help): the engine raises :class:`~mtlkit.errors.NonFiniteError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.errors import ConfigError

AmpMode = Literal["none", "bf16", "fp16"]
AMP_MODES: tuple[str, ...] = ("none", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class LossScaler:
    """Dynamic loss scaling with ``torch.amp.GradScaler``'s rules, for per-task gradients.

    Args:
        init_scale: the first scale ``S`` (a power of two; 2**16 as GradScaler).
        growth_factor: ``S`` is multiplied by it after ``growth_interval`` clean steps (2).
        backoff_factor: ``S`` is multiplied by it after a step with inf/NaN gradients (0.5).
        growth_interval: clean steps in a row before ``S`` grows (2000).

    Attributes:
        scale: the current ``S``.
        skipped: how many optimizer steps were skipped for inf/NaN gradients.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be > 0 and finite, got {init_scale}")
        if not growth_factor > 1:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.scale = self.init_scale
        self.growth_tracker = 0
        self.skipped = 0

    def __repr__(self) -> str:
        return (
            f"LossScaler(scale={self.scale:g}, growth_factor={self.growth_factor:g}, "
            f"backoff_factor={self.backoff_factor:g}, growth_interval={self.growth_interval})"
        )

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` with the same value, whose gradient is multiplied by the scale."""
        return _ScaleGradient.apply(loss, self.scale)

    def unscale_(self, tensors: Iterable[Tensor]) -> bool:
        """Divide the ``.grad`` of ``tensors`` by the scale, in place; return whether any of them
        holds an inf or NaN (checked before unscaling)."""
        found = False
        inverse = 1.0 / self.scale
        for tensor in tensors:
            if tensor.grad is None:
                continue
            if not found and not bool(torch.isfinite(tensor.grad).all()):
                found = True
            tensor.grad.mul_(inverse)
        return found

    def update(self, found_inf: bool) -> None:
        """After an optimizer step (taken or skipped): back off on inf/NaN, grow after
        ``growth_interval`` clean steps."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.skipped = int(state["skipped"])


class Precision:
    """The precision of a training run: autocast mode and, for fp16, the loss scaler.

    Args:
        mode: ``"none"`` (float32 as given), ``"bf16"`` or ``"fp16"`` (CUDA only).
        device: where the model runs.
        scaler: a :class:`LossScaler`, ``True`` (a default one), ``False`` (none) or ``None``:
            one for fp16, none otherwise.

    Raises:
        ConfigError: for an unknown mode, or fp16 on a device other than CUDA.
    """

    def __init__(
        self,
        mode: str = "none",
        device: str | torch.device = "cpu",
        scaler: LossScaler | bool | None = None,
    ) -> None:
        if mode not in AMP_MODES:
            raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}; got {mode!r}")
        self.device = torch.device(device)
        if mode == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                f"amp=fp16 needs a CUDA device (autocast to float16 on {self.device.type} is not "
                "supported here); use amp=bf16 on the CPU"
            )
        self.mode = mode
        if scaler is None:
            scaler = mode == "fp16"
        if scaler is True:
            scaler = LossScaler()
        self.scaler: LossScaler | None = scaler or None

    def __repr__(self) -> str:
        return f"Precision({self.mode!r}, scaler={self.scaler!r})"

    @property
    def enabled(self) -> bool:
        """Whether anything differs from plain float32 training."""
        return self.mode != "none" or self.scaler is not None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context for the forward pass: ``torch.autocast`` (or nothing for ``"none"``)."""
        if self.mode == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.mode])

    def outputs(self, outputs: Any) -> Any:
        """The model's outputs with low-precision floating tensors cast to float32 (nested
        dicts, lists and tuples), so that losses are computed in float32."""
        if self.mode == "none":
            return outputs
        return _to_float32(outputs)

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` (as float32 or wider) whose gradient carries the scaler's factor."""
        if self.mode != "none" and loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        return loss if self.scaler is None else self.scaler.scale_loss(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


def _to_float32(value: Any) -> Any:
    if isinstance(value, Tensor):
        low = value.dtype in (torch.float16, torch.bfloat16)
        return value.float() if low else value
    if isinstance(value, Mapping):
        return {k: _to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value
