"""Result files: CSV logs appended row by row, JSON written atomically (temp file + rename),
and the optional TensorBoard mirror of the CSV logs (:func:`with_tensorboard`).

A write that fails for want of disk space (or any other ``OSError``) raises a
:class:`WriteError` naming the file, never a bare ``OSError``; an atomic write then leaves the
previous version of its file intact and removes its temporary file. Temporary files are named
``.NAME.mtlkit-XXXXXXXX.tmp`` (:func:`partial_target` recognises exactly those), so that
cleaning up after a killed write never touches a file mtlkit did not create.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mtlkit.errors import EnvironmentFailure, MtlkitError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import (os.umask can only be read by setting it)


class WriteError(EnvironmentFailure):
    """A result file could not be written (``ENOSPC``: the disk is full; or another ``OSError``).

    Attributes:
        path: the file.
        errno: the ``OSError``'s error number (``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, path: str | Path, error: OSError, intact: bool = True) -> None:
        self.path, self.errno, self.intact = Path(path), error.errno, intact
        self.reason = error.strerror or str(error)
        code = f" [Errno {error.errno}]" if error.errno is not None else ""
        state = "its previous version is intact" if intact else "it may end in a partial row"
        super().__init__(f"cannot write {str(path)!r}: {self.reason}{code} ({state})")

    def __reduce__(self) -> Any:  # picklable: worker processes send their errors back
        return (type(self), (self.path, OSError(self.errno, self.reason), self.intact))


TEMP_MARK = ".mtlkit-"
"""What marks a temporary file of :func:`atomic_file`: ``.NAME.mtlkit-XXXXXXXX.tmp``."""
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.mtlkit-[a-z0-9_]{8}\.tmp")


def partial_target(name: str) -> str | None:
    """The file that an interrupted :func:`atomic_file` write of temporary file ``name`` was
    writing (``".summary.json.mtlkit-ab12cd34.tmp"`` -> ``"summary.json"``); ``None`` for any
    other name, so that no file of the user's is ever taken for one of mtlkit's."""
    match = _TEMP_NAME.fullmatch(name)
    return match["target"] if match else None


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success flush it to disk and rename
    it over ``path``, so that readers see the old file or the new one, never half of one. On an
    error the temporary file is removed and ``path`` is untouched.

    Raises:
        WriteError: for an ``OSError`` while creating, writing, flushing or renaming (a full
            disk), naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp"
        )
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600: the mode of a file open() creates
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(path, error) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON (NaN and inf become ``null``)."""
    write_atomic(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class CsvLog:
    """A CSV file with a fixed header, appended one row at a time.

    Rows are flushed every ``flush_every`` rows and on ``close``; values missing from a row are
    left empty. A new log truncates an existing file of the same name, unless ``keep_rows`` is
    given (a resumed run): the file then keeps its header and its first ``keep_rows`` rows (those
    written before the checkpoint; later ones are dropped, since the run redoes them) and new
    rows are appended. ``rows`` counts the data rows in the file.

    Raises:
        MtlkitError: on resume, if the file is missing or has fewer than ``keep_rows`` rows or
            other columns (the run folder was changed since the checkpoint: continuing would
            silently restart or cut the log).
        WriteError: when a row cannot be written (a full disk).
    """

    def __init__(
        self,
        path: str | Path,
        columns: Sequence[str],
        flush_every: int = 100,
        keep_rows: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.flush_every = flush_every
        self.rows = 0
        if keep_rows:
            self._truncate(keep_rows)
        mode = "a" if keep_rows else "w"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, mode, newline="", encoding="utf-8")  # noqa: SIM115 (kept open)
            self._writer = csv.DictWriter(
                self._handle, fieldnames=self.columns, extrasaction="raise"
            )
            if mode == "w":
                self._writer.writeheader()
        except OSError as error:
            raise WriteError(self.path, error, intact=False) from error
        self._pending = 0

    def _truncate(self, keep_rows: int) -> None:
        if not self.path.is_file():
            raise MtlkitError(
                f"cannot continue the log {str(self.path)!r}: the file is missing, and the "
                f"checkpoint was taken after {keep_rows} row(s) of it"
            )
        with open(self.path, newline="", encoding="utf-8") as handle:
            lines = list(csv.reader(handle))
        if not lines or lines[0] != self.columns:
            raise MtlkitError(
                f"cannot continue the log {str(self.path)!r}: it does not have the columns "
                f"{self.columns}"
            )
        if len(lines) - 1 < keep_rows:
            raise MtlkitError(
                f"cannot continue the log {str(self.path)!r}: it has {len(lines) - 1} row(s), "
                f"the checkpoint was taken after {keep_rows}"
            )
        kept = lines[: 1 + keep_rows]
        self.rows = len(kept) - 1
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        write_atomic(self.path, text.getvalue())

    def append(self, row: Mapping[str, Any]) -> None:
        try:
            self._writer.writerow({k: _format(v) for k, v in row.items()})
        except OSError as error:
            raise WriteError(self.path, error, intact=False) from error
        self.rows += 1
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        try:
            if not self._handle.closed:
                self._handle.flush()
        except OSError as error:
            raise WriteError(self.path, error, intact=False) from error
        self._pending = 0

    def close(self) -> None:
        try:
            if not self._handle.closed:
                self._handle.close()
        except OSError as error:
            raise WriteError(self.path, error, intact=False) from error

    def __enter__(self) -> CsvLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# --- TensorBoard (optional: pip install "mtlkit[tensorboard]") ----------------------------------


def require_tensorboard() -> Any:
    """torch's ``SummaryWriter`` class, or an :class:`~mtlkit.errors.MtlkitError` that names the
    extra to install when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise MtlkitError(
            'tensorboard logging needs TensorBoard: pip install "mtlkit[tensorboard]" '
            f"(or pip install tensorboard); tensorboard=false turns it off ({error})"
        ) from error
    return SummaryWriter


class TensorBoardLog:
    """A :class:`CsvLog` whose rows are also written as TensorBoard scalars to ``log_dir``: every
    numeric column but the first (``step`` for ``steps.csv``, ``epoch`` for ``metrics.csv``),
    which is the scalars' global step. It has the CSV log's interface (``append``, ``flush``,
    ``close``, ``rows``).

    A new log removes the event files an earlier run left in ``log_dir`` (as the CSV log
    truncates its file); a resumed one (``resumed``) keeps them and hides the events after the
    last row the CSV kept, which the run redoes (``purge_step``).
    """

    def __init__(self, log: CsvLog, log_dir: str | Path, resumed: bool = False) -> None:
        summary_writer = require_tensorboard()
        self.log = log
        self.x = log.columns[0]
        if resumed:
            purge = _last_value(log.path, self.x) + 1
        else:
            purge = None
            for stale in Path(log_dir).glob("events.out.tfevents.*"):
                stale.unlink()
        self.writer = summary_writer(str(log_dir), purge_step=purge)

    @property
    def rows(self) -> int:
        return self.log.rows

    @property
    def columns(self) -> list[str]:
        return self.log.columns

    def append(self, row: Mapping[str, Any]) -> None:
        self.log.append(row)
        step = int(row[self.x])
        for key, value in row.items():
            if key == self.x or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(key, float(value), step)

    def flush(self) -> None:
        self.log.flush()
        self.writer.flush()

    def close(self) -> None:
        self.log.close()
        self.writer.close()


def with_tensorboard(
    logs: Mapping[str, CsvLog], root: str | Path, resumed: bool = False
) -> dict[str, TensorBoardLog]:
    """Each CSV log ``name`` mirrored to TensorBoard under ``root/name`` (``tb/steps``,
    ``tb/metrics``; one folder per log, since their global steps are steps and epochs)."""
    return {name: TensorBoardLog(log, Path(root) / name, resumed) for name, log in logs.items()}


def _last_value(path: Path, column: str) -> int:
    """The ``column`` value of the last data row of a CSV log (0 if it has none)."""
    last = 0
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get(column):
                last = int(float(row[column]))
    return last
