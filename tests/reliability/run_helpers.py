"""Helpers of the run-folder, lock, checkpoint, disk-full and clean-error tests (issue 27): a tiny
``mtlkit train``, a snapshot of a folder's files, and a full disk injected into the writes of
chosen files."""

from __future__ import annotations

import builtins
import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import one_line_error, summary  # noqa: F401 (re-exported)

from mtlkit.app.cli import main

TINY = [
    "--no-progress",
    "data_args.n_train=128",
    "data_args.n_val=32",
    "data_args.n_test=32",
    "batch_size=32",
    "plots=false",
]
"""A run of 4 batches per epoch on the embedded MultiDigits (a fraction of a second)."""


def train(*args: str) -> int:
    """``mtlkit train`` in this process with :data:`TINY` and ``args``; its exit code."""
    return main(["train", *TINY, *args])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class FullDisk:
    """A file whose writes fail as on a full disk (``ENOSPC``); everything else is the file's."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._handle)


@contextmanager
def disk_full(monkeypatch: pytest.MonkeyPatch, name: str, after: int = 0) -> Iterator[list[str]]:
    """Writes to files named ``name`` (or to an atomic write's temporary file of it) fail with
    ``ENOSPC`` from the ``after + 1``-th such file on, as on a disk that just filled up; the list
    yielded collects the paths that failed. Files opened with ``open`` (logs, plots, matplotlib)
    and with ``os.fdopen`` (mtlkit's atomic writes, torch.save into them) are covered."""
    real_open, real_fdopen = builtins.open, os.fdopen
    failed: list[str] = []
    seen = [0]

    def hit(path: str, mode: Any) -> bool:
        base = os.path.basename(path)
        if not isinstance(mode, str) or not any(c in mode for c in "wax+"):
            return False
        if base != name and not base.startswith(f".{name}."):
            return False
        seen[0] += 1
        if seen[0] <= after:
            return False
        failed.append(path)
        return True

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return (
            FullDisk(handle) if isinstance(file, (str, Path)) and hit(str(file), mode) else handle
        )

    def fake_fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        path = os.readlink(f"/proc/self/fd/{fd}")
        handle = real_fdopen(fd, mode, *args, **kwargs)
        return FullDisk(handle) if hit(path, mode) else handle

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)
    try:
        yield failed
    finally:
        monkeypatch.setattr(builtins, "open", real_open)
        monkeypatch.setattr(os, "fdopen", real_fdopen)
