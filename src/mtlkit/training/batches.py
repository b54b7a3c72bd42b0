"""An endless stream of training batches, independent of the main epoch order.

Methods that need *independent* mini-batches at every step (MoDo and SDMGrad estimate
``E[J]ᵀ E[J]`` from two batches; bilevel weightings take an auxiliary batch) get them from a
:class:`BatchStream` that the Trainer builds over the training data: for a ``DataLoader`` a second,
separately seeded, shuffled loader over the same dataset (so the main batch order does not change
when a method draws extra batches); for a :class:`~mtlkit.data.multi_input.MultiInputLoader` the
same per task; for any other iterable a restartable cycle over it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import MtlkitError
from mtlkit.training.checkpoint import LoaderPosition


def independent_copy(loader: Iterable[Any], seed: int) -> Iterable[Any]:
    """A loader over the same data with its own shuffling generator (seeded with ``seed``)."""
    if isinstance(loader, MultiInputLoader):
        return MultiInputLoader(
            {
                t: independent_copy(part, seed + i)
                for i, (t, part) in enumerate(loader.loaders.items())
            }
        )
    if isinstance(loader, DataLoader) and loader.batch_size is not None:
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            shuffle=True,
            drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )
    return loader


class BatchStream:
    """Draw batches endlessly from ``loader`` (restarting it when exhausted).

    Args:
        loader: the training data (a ``DataLoader``, a ``MultiInputLoader`` or any re-iterable).
        seed: seed of the independent shuffling.
        transform: applied to every batch drawn (the Trainer moves batches to its device).
    """

    def __init__(self, loader: Iterable[Any], seed: int = 0, transform: Any = None) -> None:
        self.loader = independent_copy(loader, seed)
        self.transform = transform
        self.position = LoaderPosition()
        self._iterator: Iterator[Any] | None = None

    def draw(self, count: int) -> list[Any]:
        """The next ``count`` batches."""
        batches = []
        for _ in range(count):
            batch = self._next()
            batches.append(self.transform(batch) if self.transform is not None else batch)
        return batches

    def _next(self) -> Any:
        if self._iterator is not None:
            try:
                batch = next(self._iterator)
            except StopIteration:
                pass
            else:
                self.position.consumed += 1
                return batch
        self.position.begin(self.loader)
        self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise MtlkitError(
                "the training data yielded no batch to draw extra batches from"
            ) from None
        self.position.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is (for checkpoints); empty before the first draw."""
        return {} if self._iterator is None else self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a saved stream was (the global RNG is left untouched)."""
        if not state:
            self._iterator = None
            return
        self.position.load_state_dict(state)
        saved = torch.get_rng_state()
        self._iterator = self.position.replay(self.loader)
        torch.set_rng_state(saved)
