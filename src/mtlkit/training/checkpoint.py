"""Checkpoints: written atomically, loaded safely, enough to resume a run exactly.

A checkpoint is one ``torch.save`` file written to a temporary file in the same folder, flushed
to disk and renamed over the previous one, so a reader (or a resumed run after a ``SIGKILL``)
sees either the old checkpoint or the new one, never a torn file. It is loaded with
``torch.load(weights_only=True)``: only tensors and plain containers, no pickled code; a file
that needs more is refused in one line as "not a safe mtlkit checkpoint".

What makes a resume *exact* (bit-identical weights on the CPU) is in the Trainer's state: model,
strategy (optimizers, schedulers, methods, task groups), counters, the exploration tracker, the
best model so far, and the random state: the global torch generator now, and, to replay the
current epoch's batch order, the data loaders' generators as they were when the epoch began plus
how many batches of it were consumed (see :class:`LoaderPosition`).

A Trainer's checkpoint is bound to its run: its ``run`` entry holds the run's config, the hash
of that config, the run folder's id (:mod:`mtlkit.training.run_dir`), the model, strategy and
method classes, the task names and the seed; a resume that does not match is refused, naming the
differing entries. Its schema (:data:`TRAINER_SCHEMA`) is checked before anything is restored
(:func:`check_trainer_state`), so a damaged or crafted checkpoint is one error naming the entry.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import MtlkitError
from mtlkit.training.logs import atomic_file, partial_target

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
FORMAT_VERSION = 2
"""2: a Trainer checkpoint records its run (``run``); 1: it did not (mtlkit before issue 27)."""
READABLE_FORMATS = (1, 2)
"""The formats :func:`load_checkpoint` reads (a format-1 ``model.pt`` holds weights only)."""

RUN_FILES = frozenset(
    {
        CHECKPOINT_NAME,
        MODEL_NAME,
        "summary.json",
        "metrics.csv",
        "steps.csv",
        "config.yaml",
        "trackers.json",
        "error.txt",
        "stl_baseline.json",
        ".mtlkit-run.json",
        "losses.png",
        "weights.png",
        "validation.png",
    }
)
"""The files mtlkit writes atomically into a run folder: the only ones whose temporary files
:func:`remove_partial_files` deletes."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    with atomic_file(path, "wb") as handle:
        torch.save({"format": FORMAT_VERSION, **state}, handle)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    ``path`` is the file or the run folder holding ``checkpoint.pt``; ``mmap``: map the tensors
    instead of reading them (cheap, to look at the ``run`` entry only).

    Raises:
        MtlkitError: one line: the file is missing, is not a safe mtlkit checkpoint (it would
            unpickle something other than tensors and plain containers), cannot be read, or is
            not of a format this version reads.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise MtlkitError(f"no checkpoint at {str(path)!r} (expected a {CHECKPOINT_NAME} file)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:  # weights_only refused what it would unpickle
            raise MtlkitError(
                f"cannot read checkpoint {str(path)!r}: not a safe mtlkit checkpoint (it would "
                f"unpickle {_unsafe_part(error)}; mtlkit loads only tensors and plain "
                "containers); refused"
            ) from None
        except Exception as error:  # a torn or foreign file: many types; report which file
            raise MtlkitError(f"cannot read checkpoint {str(path)!r}: {one_line(error)}") from None
    for warning in caught:  # the load worked: its warnings are the user's to see
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise MtlkitError(
            f"{str(path)!r} is not an mtlkit checkpoint of format "
            f"{' or '.join(map(str, READABLE_FORMATS))}"
        )
    return state


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x1f\x7f]")


def one_line(error: BaseException) -> str:
    """The first line of an error's message with terminal escapes and control characters
    removed (a crafted file must not write to the user's terminal), at most 200 characters."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = _ESCAPES.sub("", lines[0] if lines else repr(error)).strip()
    return text if len(text) <= 200 else text[:197] + "..."


def _unsafe_part(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused: ``module.name`` of a global, when it says."""
    found = re.search(r"GLOBAL ([A-Za-z_][\w.]{0,100})", str(error))
    return f"`{found[1]}`" if found else "an object or instruction it does not allow"


# The schema of a Trainer checkpoint: entry -> type, tuple of types (None: null allowed), or a
# nested mapping of exactly those keys. ints are not bools; a float may be given as an int.
TRAINER_SCHEMA: dict[str, Any] = {
    "format": int,
    "model": dict,
    "strategy": dict,
    "nonfinite": (dict, None),
    "progress": {"epoch": int, "steps": int, "passes": int, "seconds": float},
    "counters": {"backwards": int, "batches_seen": int, "optimizer_steps": int},
    "exploration": (dict, None),
    "best": {"score": float, "epoch": (int, None), "state": (dict, None)},
    "history": list,
    "results": dict,
    "epoch": (dict, None),
    "position": {
        "loader_states": list,
        "global_state": (torch.Tensor, None),
        "consumed": int,
        "states_at_save": list,
    },
    "extra_batches": dict,
    "rng": torch.Tensor,
    "log_rows": dict,
    "precision": dict,
    "run": {
        "config": dict,
        "config_hash": str,
        "run_id": (str, None),
        "model": str,
        "strategy": str,
        "methods": list,
        "tasks": list,
        "seed": int,
    },
}


OPTIONAL_ENTRIES = frozenset({"position.states_at_save"})
"""Entries of :data:`TRAINER_SCHEMA` that checkpoints of earlier versions (same format) lack."""


def check_trainer_state(state: Mapping[str, Any], path: str | Path) -> None:
    """Check a loaded Trainer checkpoint against :data:`TRAINER_SCHEMA` (and its counts, its
    random state and its log rows), before anything is restored from it.

    Raises:
        MtlkitError: naming the first entry that is missing, unknown or of the wrong type.
    """
    where = f"checkpoint {str(path)!r}"
    if state.get("format") != FORMAT_VERSION:
        raise MtlkitError(
            f"{where} is of format {state.get('format')!r}, written by an mtlkit that did not "
            f"record the run in its checkpoints (format {FORMAT_VERSION}); it cannot be checked "
            "against this run: start the run over (--overwrite)"
        )
    _check_entries(state, TRAINER_SCHEMA, where, "", exact=False)
    for key in ("progress", "counters"):
        for name, value in state[key].items():
            if value < 0:
                raise MtlkitError(f"{where}: entry '{key}.{name}' must be >= 0, got {value}")
    if state["position"]["consumed"] < 0:
        raise MtlkitError(f"{where}: entry 'position.consumed' must be >= 0")
    rng = state["rng"]
    if rng.dtype != torch.uint8 or rng.dim() != 1:
        raise MtlkitError(f"{where}: entry 'rng' must be a 1-D uint8 tensor (torch's RNG state)")
    rows = state["log_rows"]
    if not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in rows.items()):
        raise MtlkitError(f"{where}: entry 'log_rows' must map log names to row counts >= 0")
    expected = {"steps": state["counters"]["batches_seen"], "metrics": len(state["history"])}
    wrong = {k: v for k, v in rows.items() if k in expected and v != expected[k]}
    if wrong or (rows and set(rows) != set(expected)):
        raise MtlkitError(
            f"{where}: entry 'log_rows' {dict(rows)} does not match the run it records (one "
            f"steps row per batch, one metrics row per epoch: {expected}); the checkpoint was "
            "changed"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _matches(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if kind is int:
        return _is_int(value)
    if kind is float:
        return isinstance(value, float) or _is_int(value)
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_type_name(k) for k in kind)
    if kind is None:
        return "null"
    return "a mapping" if kind is dict or isinstance(kind, dict) else kind.__name__


def _check_entries(
    state: Mapping[str, Any], schema: Mapping[str, Any], where: str, prefix: str, exact: bool
) -> None:
    for key, kind in schema.items():
        name = f"{prefix}{key}"
        if key not in state:
            if name in OPTIONAL_ENTRIES:
                continue
            raise MtlkitError(f"{where} is damaged or not a Trainer checkpoint: no entry {name!r}")
        value = state[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise MtlkitError(
                    f"{where}: entry {name!r} must be a mapping, got {type(value).__name__}"
                )
            _check_entries(value, kind, where, f"{name}.", exact=True)
        elif not any(_matches(value, k) for k in (kind if isinstance(kind, tuple) else (kind,))):
            raise MtlkitError(
                f"{where}: entry {name!r} must be {_type_name(kind)}, got {type(value).__name__}"
            )
    unknown = sorted(str(k) for k in state if k not in schema)
    if exact and unknown:
        raise MtlkitError(f"{where}: entry {prefix[:-1]!r} has unknown key(s) {unknown}")


def remove_partial_files(folder: str | Path, names: Iterable[str] = RUN_FILES) -> list[Path]:
    """Delete the temporary files that writes interrupted by a kill left in ``folder``.

    :func:`mtlkit.training.logs.atomic_file` writes ``.NAME.mtlkit-XXXXXXXX.tmp`` beside its
    target and renames it over the target when complete; a ``SIGKILL`` in between leaves the
    temporary file (the target itself is intact). Only such files of the targets ``names``
    (:data:`RUN_FILES`: the files of a run folder) are deleted, by exact name: a file of the
    user's (``.notes.tmp``) is never touched. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    targets = set(names)
    removed = []
    for path in folder.iterdir():
        if partial_target(path.name) in targets and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def generators(loader: Any) -> list[torch.Generator | None]:
    """The shuffling generators of a loader (one per task loader of a multi-input loader);
    ``None`` for a loader without its own generator (it then draws from the global one)."""
    if isinstance(loader, MultiInputLoader):
        return [g for part in loader.loaders.values() for g in generators(part)]
    if isinstance(loader, DataLoader):
        return [loader.generator]
    return [None]


def _set_generators(loader: Any, states: Sequence[torch.Tensor | None]) -> None:
    """Set ``loader``'s shuffling generators to ``states`` (one per generator, ``None``: none)."""
    gens = generators(loader)
    if len(gens) != len(states):
        raise MtlkitError(
            f"the training data changed since the checkpoint: {len(states)} loader(s) then, "
            f"{len(gens)} now"
        )
    for gen, state in zip(gens, states):
        if gen is not None and state is not None:
            gen.set_state(state)


@dataclass
class LoaderPosition:
    """Where an epoch over a loader is: the random state at its start and the batches consumed.

    ``begin`` snapshots the loader generators and the global torch generator before the epoch's
    ``iter()`` (which draws the shuffling order from them); ``replay`` restores that snapshot,
    starts the iterator and skips the consumed batches, so that the next batch is the one the
    interrupted run would have seen.
    """

    loader_states: list[torch.Tensor | None] = field(default_factory=list)
    global_state: torch.Tensor | None = None
    consumed: int = 0
    states_at_save: list[torch.Tensor | None] = field(default_factory=list)
    _loader: Any = field(default=None, repr=False, compare=False)

    def begin(self, loader: Any) -> None:
        self.loader_states = [None if g is None else g.get_state() for g in generators(loader)]
        self.global_state = torch.get_rng_state()
        self.consumed = 0
        self._loader = loader

    def continue_generators(self, loader: Any) -> None:
        """Resumed at an epoch boundary (a finished run trained on): set the loader generators
        to their states when the checkpoint was saved, so that the next epoch draws a new order
        (a rebuilt loader's fresh generator would repeat the first epoch's)."""
        if self.states_at_save:  # absent in a checkpoint of an earlier version
            _set_generators(loader, self.states_at_save)

    def replay(self, loader: Iterable[Any]) -> Any:
        """An iterator over ``loader`` positioned after the consumed batches."""
        _set_generators(loader, self.loader_states)
        if self.global_state is not None:
            torch.set_rng_state(self.global_state)
        iterator = iter(loader)
        for index in range(self.consumed):
            try:
                next(iterator)
            except StopIteration:
                raise MtlkitError(
                    f"the training data has fewer batches than the checkpoint consumed "
                    f"({index} < {self.consumed})"
                ) from None
        return iterator

    def state_dict(self) -> dict[str, Any]:
        now = [] if self._loader is None else generators(self._loader)
        return {
            "loader_states": self.loader_states,
            "global_state": self.global_state,
            "consumed": self.consumed,
            "states_at_save": [None if g is None else g.get_state() for g in now],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader_states = list(state["loader_states"])
        self.global_state = state["global_state"]
        self.consumed = int(state["consumed"])
        self.states_at_save = list(state.get("states_at_save", []))  # absent in older checkpoints
