"""Optimizer factories: ``params -> (optimizer, scheduler or None)``.

Strategies may need several optimizer states (one per task group), so the Trainer takes a
factory, never an optimizer instance. Any callable with that signature works; :func:`optimizer`
builds one from names for the CLI and configs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtlkit.errors import ConfigError

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
SCHEDULERS = ("none", "step", "cosine")

OptimizerFactory = Callable[[list[nn.Parameter]], "tuple[torch.optim.Optimizer, Any]"]


def optimizer(
    name: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    scheduler: str = "none",
    step_size: int = 10,
    gamma: float = 0.5,
    epochs: int = 10,
) -> OptimizerFactory:
    """A factory for a ``torch.optim`` optimizer and an optional per-epoch LR scheduler.

    Args:
        name: one of ``adam``, ``adamw``, ``sgd``, ``rmsprop``.
        lr: learning rate (> 0).
        weight_decay: weight decay (>= 0).
        momentum: momentum of ``sgd`` and ``rmsprop`` (ignored by the others).
        scheduler: ``none``, ``step`` (``StepLR(step_size, gamma)``) or ``cosine``
            (``CosineAnnealingLR(T_max=epochs)``); schedulers step once per epoch.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    cls = OPTIMIZERS[key]
    extra = {"momentum": momentum} if key in ("sgd", "rmsprop") else {}

    def build(params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, Any]:
        opt = cls(params, lr=lr, weight_decay=weight_decay, **extra)
        if scheduler == "step":
            return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
        if scheduler == "cosine":
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        return opt, None

    return build
