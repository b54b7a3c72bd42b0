"""Task groups for alternating strategies: one task per group, explicit groups, random groups,
or groups selected from the run's task affinities
(:class:`~mtlkit.training.group_selection.AffinityGroups`).

Pascal et al. (2021) split the tasks at random into groups of size ``s`` once, at the start, and
keep them; a group's loss is the sum of its tasks' losses (or a method's combination of them).
Alternating over ``G = ceil(m / s)`` groups costs about ``G`` forward/backward passes per batch,
so ``s`` trades the benefit of independent steps against compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch

from mtlkit.errors import ConfigError
from mtlkit.training.group_selection import AffinityGroups

Resample = Literal["never", "epoch", "step"]


@dataclass(frozen=True)
class RandomGroups:
    """Random groups of ``size`` tasks (the last one smaller when ``size`` does not divide the
    number of tasks), drawn with a seeded generator.

    Args:
        size: tasks per group (``>= 1``).
        resample: draw new groups ``"never"`` (once, at the start: the paper), at every
            ``"epoch"``, or at every ``"step"`` (batch).
        seed: seed of the draws.
    """

    size: int
    resample: Resample = "never"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"RandomGroups size must be an integer >= 1, got {self.size!r}")
        if self.resample not in ("never", "epoch", "step"):
            raise ConfigError(
                f"RandomGroups resample must be never, epoch or step; got {self.resample!r}"
            )

    def draw(self, tasks: Sequence[str], generator: torch.Generator) -> list[list[str]]:
        """A random partition of ``tasks`` into groups of ``size`` (order of tasks within a group
        follows ``tasks``)."""
        order = torch.randperm(len(tasks), generator=generator).tolist()
        chunks = [order[i : i + self.size] for i in range(0, len(order), self.size)]
        return [[tasks[i] for i in sorted(chunk)] for chunk in chunks]


GroupSpec = Union[str, Sequence[Sequence[str]], RandomGroups, AffinityGroups]  # noqa: UP007


def check_partition(groups: Sequence[Sequence[str]], tasks: Sequence[str]) -> list[list[str]]:
    """``groups`` as lists, checked to be a partition of ``tasks`` into non-empty groups."""
    if not isinstance(groups, (list, tuple)) or not all(
        isinstance(g, (list, tuple)) and all(isinstance(t, str) for t in g) for g in groups
    ):
        raise ConfigError(
            f"groups must be a list of task-name lists (e.g. [['a', 'b'], ['c']]), got {groups!r}"
        )
    groups = [list(g) for g in groups]
    flat = [t for g in groups for t in g]
    unknown = sorted(set(flat) - set(tasks))
    if unknown:
        raise ConfigError(f"groups name unknown task(s) {unknown}; tasks: {list(tasks)}")
    repeated = sorted({t for t in flat if flat.count(t) > 1})
    if repeated:
        raise ConfigError(f"task(s) {repeated} appear in more than one group")
    missing = [t for t in tasks if t not in flat]
    if missing:
        raise ConfigError(f"task(s) {missing} are in no group; every task needs one")
    if any(not g for g in groups):
        raise ConfigError("groups must not be empty")
    return groups


class GroupSchedule:
    """The current task groups of a run, redrawn when a :class:`RandomGroups` asks for it, or
    selected from the affinities :meth:`observe` hands it (:class:`AffinityGroups`)."""

    def __init__(self, spec: GroupSpec, tasks: Sequence[str]) -> None:
        self.spec = spec
        self.tasks = list(tasks)
        self.generator = torch.Generator()
        self.affinity: torch.Tensor | None = None  # AffinityGroups: the latest mean matrix
        self.selections: list[dict[str, object]] = []  # AffinityGroups: epoch and groups
        if isinstance(spec, AffinityGroups):
            self.groups = spec.initial(self.tasks)
        elif isinstance(spec, RandomGroups):
            self.generator.manual_seed(spec.seed)
            self.groups = spec.draw(self.tasks, self.generator)
        elif isinstance(spec, str):
            if spec != "each":
                raise ConfigError(
                    f"groups must be 'each', a list of task lists or RandomGroups; got {spec!r}"
                )
            self.groups = [[t] for t in self.tasks]
        else:
            self.groups = check_partition(spec, self.tasks)

    @property
    def resample(self) -> Resample:
        if isinstance(self.spec, AffinityGroups):
            return "epoch"  # the groups change after the warm-up at least
        return self.spec.resample if isinstance(self.spec, RandomGroups) else "never"

    def observe(self, affinity: torch.Tensor, epoch: int) -> None:
        """The mean affinity matrix after ``epoch`` (the Trainer's affinity logging), which the
        next :meth:`maybe_resample` at the epoch's end selects from."""
        self.affinity = affinity
        self.epoch = epoch

    def maybe_resample(self, event: Literal["epoch", "step"]) -> bool:
        """Draw (or select) new groups if the spec does so at ``event``; return whether the
        groups changed (a draw always counts as a change)."""
        if self.resample != event:
            return False
        if isinstance(self.spec, AffinityGroups):
            return self._select()
        assert isinstance(self.spec, RandomGroups)
        self.groups = self.spec.draw(self.tasks, self.generator)
        return True

    def _select(self) -> bool:
        spec = self.spec
        assert isinstance(spec, AffinityGroups)
        epoch = getattr(self, "epoch", 0)
        if epoch < spec.warmup or (self.selections and spec.recompute == "never"):
            return False
        if self.affinity is None:
            raise ConfigError(
                f"AffinityGroups select after epoch {epoch}, but no {spec.affinity!r} affinity "
                "was measured yet; log affinities more often (affinity_every)"
            )
        groups = spec.select(self.affinity, self.tasks)
        self.selections.append({"epoch": epoch, "groups": groups})
        changed = groups != self.groups
        self.groups = groups
        return changed

    def state_dict(self) -> dict[str, object]:
        state: dict[str, object] = {"groups": self.groups, "generator": self.generator.get_state()}
        if isinstance(self.spec, AffinityGroups):
            state["selections"] = list(self.selections)
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.groups = check_partition(state["groups"], self.tasks)  # type: ignore[arg-type]
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]
        if isinstance(self.spec, AffinityGroups):
            self.selections = list(state.get("selections", []))  # type: ignore[call-overload]
