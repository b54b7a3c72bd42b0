"""Multi-task methods: loss weightings and gradient aggregators, by registered name.

>>> from mtlkit import methods
>>> methods.get("uw").kind
'loss'
"""

from __future__ import annotations

from typing import Any

from mtlkit.methods.aligned import AlignedMTL
from mtlkit.methods.base import (
    Decision,
    GradientAggregator,
    GramianWeighting,
    LossWeighting,
    Method,
    Seeded,
    WeightedLoss,
)
from mtlkit.methods.basic import RGW, Constant, Mean, Random, Sum
from mtlkit.methods.bilevel import FORUM, MOML, AutoLambda
from mtlkit.methods.cagrad import CAGrad
from mtlkit.methods.conditioning import PreferenceChannel
from mtlkit.methods.config_grad import ConFIG
from mtlkit.methods.cosmos import COSMOS
from mtlkit.methods.dual_cone import DualProj, UPGrad
from mtlkit.methods.epo import EPO
from mtlkit.methods.excess import ExcessMTL
from mtlkit.methods.famo import FAMO
from mtlkit.methods.graddrop import GradDrop
from mtlkit.methods.gradnorm import GradNorm
from mtlkit.methods.gradvac import GradVac
from mtlkit.methods.history import DWA, SLAW
from mtlkit.methods.imtl import IMTL, IMTLG
from mtlkit.methods.mgda import MGDA
from mtlkit.methods.nash import FairGrad, NashMTL
from mtlkit.methods.ngdiff import NGDiff
from mtlkit.methods.pcd import PCD
from mtlkit.methods.preference import PBI, Tchebycheff
from mtlkit.methods.projection import PCGrad
from mtlkit.methods.random_weighting import RLW
from mtlkit.methods.registry import METHODS
from mtlkit.methods.robust import Krum, TrimmedMean
from mtlkit.methods.smoothing import CRMOGM, Smoothed
from mtlkit.methods.stch import STCH
from mtlkit.methods.stochastic_mo import MoDo, SDMGrad
from mtlkit.methods.tracking import DBMTL, MoCo
from mtlkit.methods.weighting import EW, GLS, IMTLL, LS, SI, UW


def get(name: str, **kwargs: Any) -> Method:
    """Build the method registered as ``name`` (hyphens accepted) with keyword arguments."""
    return METHODS.get(name, **kwargs)


def available() -> list[str]:
    """The registered method names, sorted."""
    return METHODS.available()


__all__ = [
    "COSMOS",
    "CRMOGM",
    "DBMTL",
    "DWA",
    "EPO",
    "EW",
    "FAMO",
    "FORUM",
    "GLS",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "LS",
    "METHODS",
    "MGDA",
    "MOML",
    "PBI",
    "PCD",
    "RGW",
    "RLW",
    "SI",
    "SLAW",
    "STCH",
    "UW",
    "AlignedMTL",
    "AutoLambda",
    "CAGrad",
    "ConFIG",
    "Constant",
    "Decision",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientAggregator",
    "GramianWeighting",
    "Krum",
    "LossWeighting",
    "Mean",
    "Method",
    "MoCo",
    "MoDo",
    "NGDiff",
    "NashMTL",
    "PCGrad",
    "PreferenceChannel",
    "Random",
    "SDMGrad",
    "Seeded",
    "Smoothed",
    "Sum",
    "Tchebycheff",
    "TrimmedMean",
    "UPGrad",
    "WeightedLoss",
    "available",
    "get",
]
