"""Shared tools for the architecture tests: tiny configurations of every registered
architecture (float64), their losses, and gradient bookkeeping."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.architectures import build

F64 = torch.float64
TASKS = {"a": 3, "b": 1, "c": 2}
IMAGE = (1, 4, 6)
VECTOR = (5,)

# name -> (input shape, builder arguments): small enough for a few ms per step
CONFIGS: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "hps": (VECTOR, {"widths": [6, 5]}),
    "hps-cnn": (IMAGE, {"backbone": "cnn", "widths": [3, 4]}),
    "cross_stitch": (VECTOR, {"widths": [6, 5]}),
    "cross_stitch-cnn": (IMAGE, {"backbone": "cnn", "widths": [3, 4], "per_channel": True}),
    "mmoe": (VECTOR, {"widths": [6, 5], "num_experts": 3}),
    "mmoe-cnn": (IMAGE, {"backbone": "cnn", "widths": [3, 4], "num_experts": 2}),
    "dselect_k": (VECTOR, {"widths": [6, 5], "num_experts": 4, "k": 2}),
    "dselect_k-3": (IMAGE, {"backbone": "cnn", "widths": [3, 4], "num_experts": 3, "k": 2}),
    "mtan": (VECTOR, {"widths": [6, 5]}),
    "mtan-cnn": (IMAGE, {"backbone": "cnn", "widths": [3, 4]}),
    "mtan-segnet": ((1, 4, 4), {"backbone": "segnet", "widths": [3]}),
    "mtan-nobn": (IMAGE, {"backbone": "cnn", "widths": [3, 4], "batch_norm": False}),
    "cgc": (VECTOR, {"widths": [6, 5], "task_experts": 2, "shared_experts": 1}),
    "ple": (VECTOR, {"widths": [6, 5, 4], "levels": 3}),
    "ple-cnn": (IMAGE, {"backbone": "cnn", "widths": [3, 4, 4], "shared_experts": 2}),
    "ltb": (VECTOR, {"widths": [6, 5], "hard": False}),
    "ltb-resnet": (IMAGE, {"backbone": "resnet", "widths": [2, 3], "hard": False}),
    "max_roaming": (VECTOR, {"widths": [6, 5], "p": 0.6}),
    "max_roaming-cnn": (IMAGE, {"backbone": "cnn", "widths": [3, 4], "p": 0.7}),
    "multi_lenet": ((1, 16, 16), {"widths": [2, 3, 4], "head_width": 3, "dropout": 0.0}),
}


def make(key: str, init_seed: int = 0, multi_input: bool = False, **extra: Any) -> nn.Module:
    """The tiny model ``key`` (registered name, optionally ``-variant``) in float64, initialised
    under ``torch.manual_seed(init_seed)``; ``extra`` overrides builder arguments."""
    shape, args = CONFIGS[key]
    torch.manual_seed(init_seed)
    model = build(key.split("-")[0], shape, TASKS, multi_input=multi_input, **{**args, **extra})
    return model.to(F64)


def batch(key: str, n: int = 8, seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    """Inputs for ``key`` and random regression targets of each task's output shape."""
    shape, _ = CONFIGS[key]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=F64)
    spatial = (4, 4) if key == "mtan-segnet" else ()
    targets = {t: torch.randn(n, k, *spatial, generator=gen, dtype=F64) for t, k in TASKS.items()}
    return x, targets


def losses(model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
    out = model(x)
    return {t: ((out[t] - y) ** 2).mean() for t, y in targets.items()}


def ids(params) -> set[int]:
    return {id(p) for p in params}


def nonzero(p: nn.Parameter) -> bool:
    """A gradient clearly above rounding noise (a bias before batch norm gets ~1e-17)."""
    return p.grad is not None and bool(p.grad.abs().max() > 1e-10)


def zero(p: nn.Parameter) -> bool:
    return p.grad is None or bool(p.grad.abs().sum() == 0)


def names_of(model: nn.Module, params) -> list[str]:
    lookup = {id(p): n for n, p in model.named_parameters()}
    return [lookup[id(p)] for p in params]
