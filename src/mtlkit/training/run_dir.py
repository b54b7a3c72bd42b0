"""Run folders that mtlkit owns, and one writer per run folder.

A run folder is created by mtlkit and carries a marker, ``.mtlkit-run.json``, with the run's
identity: a random run id, when it was created, the hash of its config and the mtlkit version.
:func:`claim_run_dir` is how a run takes a folder:

* a missing or empty folder becomes a new run folder (created, marked);
* a non-empty folder without a marker is not mtlkit's: it is refused (``out=.`` in a folder of the
  user's files, ``--out ~``), unless ``overwrite`` (files of mtlkit's names are then replaced;
  no other file is touched);
* a run folder holding a finished run (``summary.json`` with test results) or an interrupted one
  (``checkpoint.pt``) is refused unless ``resume`` or ``overwrite``; a new run in a run folder
  first deletes the old run's checkpoint, weights and summary (by exact name) and gets a new run
  id, so that no stale checkpoint is ever resumed under another run's config
  (:func:`mtlkit.training.checkpoint.check_trainer_state` binds checkpoints to the run id).

One writer per folder: the claim holds an advisory lock (``fcntl.flock`` on ``.mtlkit-run.lock``,
released by the kernel when the process ends, even on ``SIGKILL``) for as long as the run lasts; a
second writer is refused with a :class:`RunLockedError` naming the holder's PID. A process may
claim a folder it holds again (the CLI claims before reading data, the run builder again): the
inner claim changes nothing. A claim that made the folder and ends in an error before the run
wrote a file removes the folder again (a config error found once the data is loaded leaves no
empty run folder behind). The lock is advisory and local: it does not protect a folder on a
network file system shared by several machines that lacks ``flock``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.training.checkpoint import CHECKPOINT_NAME, MODEL_NAME, RUN_FILES
from mtlkit.training.logs import WriteError, partial_target, write_json_atomic
from mtlkit.version import __version__

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover (Windows: msvcrt's byte-range lock)
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = [
    "LOCK_NAME",
    "MARKER_NAME",
    "RunLock",
    "RunLockedError",
    "RunMarker",
    "check_claim",
    "claim_run_dir",
    "config_hash",
    "holds",
    "is_finished_run",
    "read_marker",
]

MARKER_NAME = ".mtlkit-run.json"
LOCK_NAME = ".mtlkit-run.lock"
STALE_FILES = (CHECKPOINT_NAME, MODEL_NAME, "summary.json", "error.txt")
"""What a new run deletes from its folder first: the old run's checkpoint, weights and results
(its logs are truncated when the new ones open, its plots redrawn)."""


def config_hash(config: Mapping[str, Any]) -> str:
    """The SHA-256 of a JSON-able config (keys sorted), as hex."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RunMarker:
    """The identity of a run folder (its ``.mtlkit-run.json``)."""

    run_id: str
    created: str
    config_hash: str
    mtlkit_version: str

    @classmethod
    def new(cls, config_hash: str) -> RunMarker:
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return cls(uuid.uuid4().hex, created, config_hash, __version__)


def read_marker(folder: str | Path) -> RunMarker | None:
    """The marker of ``folder``; ``None`` if it has none.

    Raises:
        MtlkitError: if the marker is there but damaged.
    """
    path = Path(folder) / MARKER_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise MtlkitError(f"run folder marker {str(path)!r} cannot be read: {error}") from None
    fields = RunMarker.__dataclass_fields__
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in fields):
        raise MtlkitError(
            f"run folder marker {str(path)!r} is damaged (it must hold {', '.join(fields)})"
        )
    return RunMarker(**{k: data[k] for k in fields})


def is_finished_run(folder: Path) -> bool:
    """Whether ``folder/summary.json`` holds test results (the run evaluated and wrote them)."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    results = summary.get("results") if isinstance(summary, dict) else None
    return isinstance(results, dict) and bool(results.get("test"))


# ------------------------------------------------------------------------------ the lock
class RunLockedError(MtlkitError):
    """Another process writes into the run folder (it holds the folder's lock).

    Attributes:
        folder: the run folder.
        pid: the holder's process id, when it could be read.
    """

    def __init__(self, folder: str | Path, pid: int | None) -> None:
        self.folder, self.pid = Path(folder), pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"run folder {str(folder)!r} is in use: {holder} is writing into it (one writer per "
            "run folder); wait for it to end, or choose another out"
        )

    def __reduce__(self) -> Any:
        return (type(self), (self.folder, self.pid))


class RunLock:
    """The advisory lock of a run folder: ``flock`` of ``folder/.mtlkit-run.lock``, which then
    holds the holder's PID."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> int | None:
        """The PID written by the process holding (or that last held) the lock."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def acquire(self, blocking: bool = False) -> None:
        """Take the lock; wait for it with ``blocking``.

        Raises:
            RunLockedError: if another process holds it (not ``blocking``).
            WriteError: if the lock file cannot be created (a full disk, no permission).
        """
        if self._fd is not None:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise WriteError(self.path, error) from error
            try:
                _lock(fd, blocking)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(self.folder, self.holder()) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the folder it had made: lock the new file
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError as error:  # a full disk: the lock holds, the PID is not shown
            if error.errno != errno.ENOSPC:
                self.release()
                raise WriteError(self.path, error) from error

    def release(self, remove: bool = False) -> None:
        """Give the lock up (closing the file releases it); with ``remove``, delete the lock
        file first (a waiting process then sees that its file is gone and opens the new one)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not unlinked meanwhile)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _lock(fd: int, blocking: bool) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    while True:  # pragma: no cover (Windows)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return
        except OSError:
            if not blocking:
                raise BlockingIOError from None
            time.sleep(0.1)


# ----------------------------------------------------------------------------- the claim
_HELD: dict[Path, RunMarker] = {}  # folders this process has claimed, and their markers


def holds(folder: str | Path) -> bool:
    """Whether this process has claimed ``folder`` (and holds its lock)."""
    return Path(folder).expanduser().resolve() in _HELD


def _own(name: str) -> bool:
    """A name mtlkit's claim itself leaves in a folder: the lock, the marker, a killed write's
    temporary file of one of the run files."""
    return name in (LOCK_NAME, MARKER_NAME) or partial_target(name) in RUN_FILES


def _refuse_foreign(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before creating anything in it, a folder that holds files and is not mtlkit's."""
    if not folder.exists():
        if resume:
            raise ConfigError(f"--resume {str(folder)!r}: no such folder")
        return
    if not folder.is_dir():
        raise ConfigError(f"out {str(folder)!r} exists and is not a folder")
    if (folder / MARKER_NAME).exists():
        return
    if resume:
        raise ConfigError(
            f"--resume {str(folder)!r}: not an mtlkit run folder (it has no {MARKER_NAME})"
        )
    foreign = sorted(p.name for p in folder.iterdir() if not _own(p.name))
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise ConfigError(
            f"out {str(folder)!r} is not empty and is not an mtlkit run folder (no {MARKER_NAME}; "
            f"it holds {shown}): runs go into new or empty folders, so that no file of yours is "
            "overwritten; choose another out, or add --overwrite to write into it anyway (files "
            "named as mtlkit's are then replaced, no other is touched)"
        )


def _refuse_to_lose(
    folder: Path,
    marker: RunMarker | None,
    resume: bool,
    overwrite: bool,
    finished: Callable[[Path], bool],
    adopt: bool = False,
) -> None:
    """Refuse a claim that would lose the run in ``folder`` (or resume a folder with no run)."""
    if adopt:
        return
    if resume and marker is None:
        raise ConfigError(f"--resume {str(folder)!r}: not an mtlkit run folder (no {MARKER_NAME})")
    if resume or marker is None or overwrite:
        return
    if finished(folder):
        raise ConfigError(
            f"out {str(folder)!r} holds a finished run; it is not overwritten: --resume "
            f"{folder} trains it further (from its checkpoint), --overwrite replaces it, or "
            "choose another out"
        )
    if (folder / CHECKPOINT_NAME).exists():
        raise ConfigError(
            f"out {str(folder)!r} holds an interrupted run ({CHECKPOINT_NAME}): --resume "
            f"{folder} continues it, --overwrite starts it over, or choose another out"
        )


def _settle(
    folder: Path,
    config_hash: str,
    resume: bool,
    overwrite: bool,
    finished: Callable[[Path], bool],
    adopt: bool = False,
) -> RunMarker:
    """Under the lock: keep the run (``resume``, ``adopt``), or refuse, or start a new one."""
    marker = read_marker(folder)
    _refuse_to_lose(folder, marker, resume, overwrite, finished, adopt)
    if (resume or adopt) and marker is not None:
        return marker
    for name in STALE_FILES:  # a new run: nothing of the old one may pass for this one's
        try:
            (folder / name).unlink(missing_ok=True)
        except OSError as error:
            raise WriteError(folder / name, error) from error
    marker = RunMarker.new(config_hash)
    write_json_atomic(folder / MARKER_NAME, asdict(marker))
    return marker


def check_claim(
    folder: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    finished: Callable[[Path], bool] = is_finished_run,
) -> None:
    """Whether :func:`claim_run_dir` would take ``folder`` now, without writing anything in it
    (``mtlkit train --check``): the same refusals, and another process's lock.

    Raises:
        ConfigError: as :func:`claim_run_dir`.
        RunLockedError: if another process writes into the folder.
    """
    folder = Path(folder).expanduser()
    if holds(folder):
        return
    _refuse_foreign(folder, resume, overwrite)
    if not folder.is_dir():
        return
    marker = read_marker(folder)
    _refuse_to_lose(folder, marker, resume, overwrite, finished)
    lock = RunLock(folder)
    if lock.path.exists():
        try:
            fd = os.open(lock.path, os.O_RDONLY)
        except OSError:
            return
        try:
            _lock(fd, blocking=False)
        except BlockingIOError:
            raise RunLockedError(folder, lock.holder()) from None
        finally:
            os.close(fd)


@contextmanager
def claim_run_dir(
    folder: str | Path,
    *,
    config_hash: str,
    resume: bool = False,
    overwrite: bool = False,
    finished: Callable[[Path], bool] = is_finished_run,
    adopt: bool = False,
    created: bool = False,
) -> Iterator[RunMarker]:
    """Take ``folder`` for one run (see the module docstring) and hold its lock until the
    ``with`` block ends; yield the folder's marker. A folder this process holds already is
    yielded as it is.

    Args:
        config_hash: the hash of the run's config (:func:`config_hash`), kept in a new marker.
        resume: continue the run in the folder (it must be a run folder).
        overwrite: write into a folder of other files, or replace a finished or interrupted run.
        finished: whether a run folder holds a finished run (:func:`is_finished_run`).
        adopt: take the run folder with whatever run it holds (``mtlkit compare``, which then
            skips a finished run and resumes an interrupted one under the lock); a new folder
            or an empty one becomes a new run.
        created: the caller made ``folder`` (empty) for this run (a new ``runs/`` folder): a
            claim that fails before the run writes a file removes it, as one it made itself.

    Raises:
        ConfigError: for a folder that is not mtlkit's, or holds a run that would be lost.
        RunLockedError: if another process writes into it.
        WriteError: if the folder, its lock or its marker cannot be written.
    """
    folder = Path(folder).expanduser()
    key = folder.resolve()
    if key in _HELD:
        yield _HELD[key]
        return
    _refuse_foreign(folder, resume, overwrite)
    made = _missing_ancestors(folder)
    if created and not made and not any(folder.iterdir()):
        made = [folder]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(folder, error) from error
    lock = RunLock(folder)
    lock.acquire()
    failed = True
    try:
        _HELD[key] = _settle(folder, config_hash, resume, overwrite, finished, adopt)
        yield _HELD[key]
        failed = False
    finally:
        _HELD.pop(key, None)
        unused = failed and bool(made) and _holds_only_the_claim(folder)
        if unused:
            (folder / MARKER_NAME).unlink(missing_ok=True)
        lock.release(remove=unused)
        if unused:
            _remove_empty(made)


def _missing_ancestors(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _holds_only_the_claim(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but its marker and lock (the run wrote no file)."""
    try:
        return {entry.name for entry in folder.iterdir()} <= {MARKER_NAME, LOCK_NAME}
    except OSError:
        return False


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders a claim made (innermost first) while they are empty: a run that
    failed before writing anything (a user error found with the data) leaves nothing behind."""
    for path in made:
        try:
            path.rmdir()
        except OSError:  # another process wrote into it meanwhile: it stays
            return
