"""Exception types raised by mtlkit.

Every error a user can cause (a bad config key, an unknown method name, a missing dataset folder,
mismatched shapes, a non-finite loss) is an :class:`MtlkitError`, so that the CLI can report it in
one line with exit code 2 instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class MtlkitError(Exception):
    """Base class of the errors that mtlkit raises on bad input or a failed run."""


class ConfigError(MtlkitError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class UnknownNameError(MtlkitError, KeyError):
    """A registered name (method, architecture, strategy, dataset) does not exist."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class NonFiniteError(MtlkitError, FloatingPointError):
    """A task loss or gradient is NaN or infinite."""


class DatasetError(MtlkitError):
    """A dataset root, or a file in it, is missing or malformed.

    The message names the file or folder at fault and shows the layout the loader expects. It is
    not a ``ValueError``, so the dataset registry passes it on unchanged, and it takes a single
    message argument, so that a ``DataLoader`` worker re-raises it with its type.
    """


class EnvironmentFailure(MtlkitError):
    """A run failed because of its environment, not its input: a full disk, a file that could not
    be written, a lost DDP peer. The run's last checkpoint is intact; the CLI prints one line with
    what failed and the resume command, and exits with code 3 (user errors exit with 2)."""
