"""Checkpoints: written atomically, loaded safely, enough to resume a run exactly.

A checkpoint is one ``torch.save`` file written to a temporary file in the same folder, flushed
to disk and renamed over the previous one, so a reader (or a resumed run after a ``SIGKILL``)
sees either the old checkpoint or the new one, never a torn file. It is loaded with
``torch.load(weights_only=True)``: only tensors and plain containers, no pickled code.

What makes a resume *exact* (bit-identical weights on the CPU) is in the Trainer's state: model,
strategy (optimizers, schedulers, methods, task groups), counters, the exploration tracker, the
best model so far, and the random state: the global torch generator now, and, to replay the
current epoch's batch order, the data loaders' generators as they were when the epoch began plus
how many batches of it were consumed (see :class:`LoaderPosition`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import MtlkitError
from mtlkit.training.logs import atomic_file

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    with atomic_file(path, "wb") as handle:
        torch.save({"format": FORMAT_VERSION, **state}, handle)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    ``path`` is the file or the run folder holding ``checkpoint.pt``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise MtlkitError(f"no checkpoint at {str(path)!r} (expected a {CHECKPOINT_NAME} file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types; report which file failed
        raise MtlkitError(f"cannot read checkpoint {str(path)!r}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise MtlkitError(f"{str(path)!r} is not an mtlkit checkpoint of format {FORMAT_VERSION}")
    return state


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes interrupted by a kill left in ``folder``.

    :func:`mtlkit.training.logs.atomic_file` writes ``.NAME.XXXXXXXX.tmp`` beside its target and
    renames it over the target when complete; a ``SIGKILL`` in between leaves the temporary file
    (the target itself is intact). The Trainer calls this when it starts writing into a run
    folder, which only that run writes to. Returns the removed paths.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def generators(loader: Any) -> list[torch.Generator | None]:
    """The shuffling generators of a loader (one per task loader of a multi-input loader);
    ``None`` for a loader without its own generator (it then draws from the global one)."""
    if isinstance(loader, MultiInputLoader):
        return [g for part in loader.loaders.values() for g in generators(part)]
    if isinstance(loader, DataLoader):
        return [loader.generator]
    return [None]


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

    def begin(self, loader: Any) -> None:
        self.loader_states = [None if g is None else g.get_state() for g in generators(loader)]
        self.global_state = torch.get_rng_state()
        self.consumed = 0

    def replay(self, loader: Iterable[Any]) -> Any:
        """An iterator over ``loader`` positioned after the consumed batches."""
        gens = generators(loader)
        if len(gens) != len(self.loader_states):
            raise MtlkitError(
                "the training data changed since the checkpoint: "
                f"{len(self.loader_states)} loader(s) then, {len(gens)} now"
            )
        for gen, state in zip(gens, self.loader_states):
            if gen is not None and state is not None:
                gen.set_state(state)
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
        return {
            "loader_states": self.loader_states,
            "global_state": self.global_state,
            "consumed": self.consumed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader_states = list(state["loader_states"])
        self.global_state = state["global_state"]
        self.consumed = int(state["consumed"])
