"""Result files: CSV logs appended row by row, JSON written atomically (temp file + rename),
and the optional TensorBoard mirror of the CSV logs (:func:`with_tensorboard`)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mtlkit.errors import MtlkitError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import (os.umask can only be read by setting it)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success flush it to disk and rename
    it over ``path``, so that readers see the old file or the new one, never half of one. On an
    error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600: the mode of a file open() creates
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
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
    """

    def __init__(
        self,
        path: str | Path,
        columns: Sequence[str],
        flush_every: int = 100,
        keep_rows: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.flush_every = flush_every
        self.rows = 0
        if keep_rows is not None and self.path.is_file():
            self._truncate(keep_rows)
            mode = "a"
        else:
            mode = "w"
        self._handle = open(self.path, mode, newline="", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._writer = csv.DictWriter(self._handle, fieldnames=self.columns, extrasaction="raise")
        if mode == "w":
            self._writer.writeheader()
        self._pending = 0

    def _truncate(self, keep_rows: int) -> None:
        with open(self.path, newline="", encoding="utf-8") as handle:
            lines = list(csv.reader(handle))
        if not lines or lines[0] != self.columns:
            raise ValueError(f"{self.path} does not have the columns {self.columns}")
        kept = lines[: 1 + keep_rows]
        self.rows = len(kept) - 1
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        write_atomic(self.path, text.getvalue())

    def append(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow({k: _format(v) for k, v in row.items()})
        self.rows += 1
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
        self._pending = 0

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

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
