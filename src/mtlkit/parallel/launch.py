"""Starting and failing under ``torchrun``: rank 0 first, and a lost peer as one clean error.

* :func:`rank_zero_first`: rank 0 does a piece of work (creating and claiming the run folder)
  while the other processes wait for it at a broadcast, which is a barrier; its result, or its
  :class:`~mtlkit.errors.MtlkitError`, reaches every process. Without it rank 1 probed the new
  run folder while rank 0 created it: ``[Errno 17] File exists`` in 2 of 9 starts.
* :func:`lost_peer`: when a process dies (killed, out of memory), the collectives of the others
  fail with a backend ``RuntimeError`` (gloo: ``Connection reset by peer``); this turns it into a
  :class:`PeerLost` naming the lost rank (exactly, with two processes), which the CLI prints as
  one line with the last checkpoint and the resume command (exit code 3).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from mtlkit.errors import EnvironmentFailure, MtlkitError
from mtlkit.parallel.ddp import is_distributed

__all__ = ["PeerLost", "RankZeroFailed", "lost_peer", "rank_zero_first", "torchrun_prefix"]

T = TypeVar("T")


class RankZeroFailed(MtlkitError):
    """Raised on the other processes when the work of :func:`rank_zero_first` failed on rank 0
    (which reports the error itself)."""


def rank_zero_first(work: Callable[[], T]) -> T:
    """``work()`` on rank 0 while the other processes of the default group wait for it; every
    process returns rank 0's result (a picklable value). A single process just calls ``work``.

    Raises:
        MtlkitError: on rank 0, the one ``work`` raised; on the others, a
            :class:`RankZeroFailed` with its message.
    """
    if not is_distributed():
        return work()
    if dist.get_rank() != 0:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise RankZeroFailed(value)
        return value  # type: ignore[no-any-return]
    try:
        result = work()
    except MtlkitError as error:
        dist.broadcast_object_list([("error", str(error))], src=0)
        raise
    dist.broadcast_object_list([("ok", result)], src=0)
    return result


class PeerLost(EnvironmentFailure):
    """Another process of the DDP run stopped (killed, out of memory, its machine lost), so this
    one cannot go on.

    Attributes:
        rank: this process's rank.
        world: the number of processes.
        lost: the ranks that may have stopped (one, with two processes).
    """

    def __init__(self, rank: int, world: int, detail: str) -> None:
        self.rank, self.world, self.detail = rank, world, detail
        self.lost = [r for r in range(world) if r != rank]
        who = (
            f"rank {self.lost[0]}"
            if len(self.lost) == 1
            else f"one of ranks {', '.join(map(str, self.lost))}"
        )
        super().__init__(
            f"lost DDP peer: {who} of {world} processes stopped, rank {rank} cannot go on "
            f"({detail})"
        )

    def __reduce__(self) -> Any:
        return (type(self), (self.rank, self.world, self.detail))


_BACKEND_FAILURE = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|broken pipe|socket|timed? ?out", re.IGNORECASE
)


def lost_peer(error: BaseException) -> PeerLost | None:
    """The :class:`PeerLost` that ``error`` means, when it is a collective's failure in a process
    group of several processes (a backend ``RuntimeError``); ``None`` for any other error, which
    must then propagate as it is."""
    if not is_distributed() or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    backend_error = getattr(dist, "DistBackendError", ())
    if not (isinstance(error, backend_error) or _BACKEND_FAILURE.search(text)):
        return None
    first = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
    detail = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's [file.cc:line] prefix
    detail = detail.split(". ")[0].strip().rstrip(".")
    detail = "".join(c for c in detail if c.isprintable() and c.isascii())[:200]
    return PeerLost(dist.get_rank(), dist.get_world_size(), detail)


def torchrun_prefix() -> str:
    """The ``torchrun`` command that started this process (its process counts), to put before
    ``-m mtlkit ...`` in a resume command; ``""`` outside ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = f"--nnodes {world // local} " if local != world else ""
    return f"torchrun {nodes}--nproc-per-node {local} "
