"""mtlkit inside other frameworks' training loops: PyTorch Lightning
(:mod:`mtlkit.integrations.lightning`) and Hugging Face Transformers
(:mod:`mtlkit.integrations.transformers`).

Each is an optional extra (``pip install "mtlkit[lightning]"``, ``pip install
"mtlkit[transformers]"``); importing this package imports neither framework. Both run every
optimizer step through mtlkit's step driver (:func:`mtlkit.training.step.method_step`, the one
:class:`mtlkit.Step` and the strategies run), so a method gets the same hooks, routes and
non-finite checks in a Lightning or a Hugging Face loop as in mtlkit's own.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mtlkit.errors import MtlkitError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(MtlkitError, ImportError):
    """An optional dependency of an integration is not installed; the message names the extra."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that installs it.

    Args:
        module: the module to import (``"lightning"``).
        extra: mtlkit's extra that installs it (``"lightning"``).
        what: what needs it, for the message (``"mtlkit.integrations.lightning"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f'{what} needs the {module!r} package: pip install "mtlkit[{extra}]" ({error})'
        ) from error
