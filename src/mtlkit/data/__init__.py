"""Data sets bundled with mtlkit and loaders for multi-input problems.

* :mod:`mtlkit.data.multidigits`: MultiDigits, the embedded default benchmark (two UCI digits on
  one canvas; tasks ``left``, ``right`` and ``sum``).
* :mod:`mtlkit.data.multi_input`: :class:`MultiInputLoader` and the embedded two-domain problem
  :func:`two_domain_digits`.
* :mod:`mtlkit.data.tensors`: :class:`TensorTasks`, a data set of your own tensors
  ``(x, {task: y})``, and :func:`split_dataset`, a seeded train/val/test split.
* :mod:`mtlkit.data.regression`: :class:`Standardizer` (regression targets standardised on the
  training split) and :func:`regression_tasks` (MSE on them, MAE/RMSE in original units).
* :mod:`mtlkit.data.attributes`: Attributes, a synthetic CelebA-like problem generated from
  seeds (40 correlated binary attributes of latent factors).

The UCI digits are by E. Alpaydin and C. Kaynak (CC BY 4.0); see ``UCI_DIGITS_LICENSE.txt``.
"""

from __future__ import annotations

from mtlkit.data.attributes import (
    Attributes,
    AttributesConfig,
    AttributeStructure,
    BinaryAccuracy,
    BinaryF1,
    attribute_features,
    attribute_names,
    attributes,
    attributes_tasks,
    binary_loss,
)
from mtlkit.data.multi_input import (
    TWO_DOMAIN_TASKS,
    DomainDigits,
    MultiInputLoader,
    two_domain_digits,
    two_domain_tasks,
)
from mtlkit.data.multidigits import (
    SUM_MEAN,
    SUM_SCALE,
    MultiDigits,
    MultiDigitsConfig,
    SumMeanAbsoluteError,
    load_uci_digits,
    multidigits,
    multidigits_tasks,
    sum_from_output,
    sum_loss,
)
from mtlkit.data.regression import Standardizer, regression_loss, regression_tasks
from mtlkit.data.tensors import TensorTasks, split_dataset

__all__ = [
    "SUM_MEAN",
    "SUM_SCALE",
    "TWO_DOMAIN_TASKS",
    "AttributeStructure",
    "Attributes",
    "AttributesConfig",
    "BinaryAccuracy",
    "BinaryF1",
    "DomainDigits",
    "MultiDigits",
    "MultiDigitsConfig",
    "MultiInputLoader",
    "Standardizer",
    "SumMeanAbsoluteError",
    "TensorTasks",
    "attribute_features",
    "attribute_names",
    "attributes",
    "attributes_tasks",
    "binary_loss",
    "load_uci_digits",
    "multidigits",
    "multidigits_tasks",
    "regression_loss",
    "regression_tasks",
    "split_dataset",
    "sum_from_output",
    "sum_loss",
    "two_domain_digits",
    "two_domain_tasks",
]
