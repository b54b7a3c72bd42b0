"""Multi-task methods: loss weightings and gradient aggregators, by registered name.

>>> from mtlkit import methods
>>> methods.get("uw").kind
'loss'
"""

from __future__ import annotations

from typing import Any

from mtlkit.methods.base import (
    GradientAggregator,
    GramianWeighting,
    LossWeighting,
    Method,
    WeightedLoss,
)
from mtlkit.methods.mgda import MGDA
from mtlkit.methods.projection import PCGrad
from mtlkit.methods.registry import METHODS
from mtlkit.methods.weighting import EW, UW


def get(name: str, **kwargs: Any) -> Method:
    """Build the method registered as ``name`` (hyphens accepted) with keyword arguments."""
    return METHODS.get(name, **kwargs)


def available() -> list[str]:
    """The registered method names, sorted."""
    return METHODS.available()


__all__ = [
    "EW",
    "METHODS",
    "MGDA",
    "UW",
    "GradientAggregator",
    "GramianWeighting",
    "LossWeighting",
    "Method",
    "PCGrad",
    "WeightedLoss",
    "available",
    "get",
]
