"""mtlkit: multi-task learning on PyTorch.

The public API: the per-task gradient engine (:func:`jacobian`, :func:`gramian`,
:func:`backward`), the step driver for your own loop (:class:`Step`), methods
(:mod:`mtlkit.methods`), architectures, update strategies, the :class:`Trainer`, tasks and
metrics.
"""

from mtlkit import methods
from mtlkit.architectures import HPS
from mtlkit.engine.backward import backward
from mtlkit.engine.jacobian import gramian, jacobian
from mtlkit.engine.layer_capture import LayerCapture
from mtlkit.errors import ConfigError, MtlkitError, NonFiniteError, UnknownNameError
from mtlkit.metrics import Accuracy, MeanAbsoluteError, MeanSquaredError, Metric, delta_m, delta_p
from mtlkit.tasks import Task
from mtlkit.training.affinity import AffinityOptions
from mtlkit.training.forward import ForwardResult
from mtlkit.training.group_selection import AffinityGroups
from mtlkit.training.groups import RandomGroups
from mtlkit.training.optim import optimizer
from mtlkit.training.step import Step, StepResult
from mtlkit.training.strategies import (
    Alternating,
    Joint,
    StepReport,
    Strategy,
    StrategyContext,
)
from mtlkit.training.trainer import Budget, Trainer
from mtlkit.version import __version__

__all__ = [
    "HPS",
    "Accuracy",
    "AffinityGroups",
    "AffinityOptions",
    "Alternating",
    "Budget",
    "ConfigError",
    "ForwardResult",
    "Joint",
    "LayerCapture",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "MtlkitError",
    "NonFiniteError",
    "RandomGroups",
    "Step",
    "StepReport",
    "StepResult",
    "Strategy",
    "StrategyContext",
    "Task",
    "Trainer",
    "UnknownNameError",
    "__version__",
    "backward",
    "delta_m",
    "delta_p",
    "gramian",
    "jacobian",
    "methods",
    "optimizer",
]
