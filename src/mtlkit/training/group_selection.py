"""Task groups from an affinity matrix (Fifty et al., NeurIPS 2021, TAG, Sec. 3.3).

``z[i, j]`` is the affinity of task ``i`` onto task ``j`` (:mod:`mtlkit.training.affinity`). The
affinity onto task ``i`` from a group ``g ∋ i`` is the mean over the group's other members,
``Z_{g→i} = 1/(|g|-1) Σ_{j∈g, j≠i} z[j, i]`` (0 for a group of one: nothing transfers).

* **Cover** (the paper's selection, :func:`best_cover`): choose ``k`` groups, a task possibly in
  several, every task in at least one, maximising ``Σ_i max_{g∋i} Z_{g→i}``: each task is
  served by the group that helps it most (as in TAG, where each task's network is then picked
  from the group whose model serves it best).
* **Partition** (:func:`best_partition`, what :class:`AffinityGroups` trains with, since an
  alternating step trains each task once per batch): ``k`` disjoint non-empty groups covering the
  tasks, maximising ``Σ_g Σ_{i∈g} Z_{g→i} = Σ_g (Σ_{i≠j∈g} z[j, i]) / (|g|-1)``.

Both are exact for small task counts (every set partition into ``k`` blocks, Stirling
``S(m, k)`` of them; every ``k``-set of the ``2^m - 1`` candidate groups for the cover, pruned by
branch and bound) when the count of candidates is at most ``exact_limit``, and a heuristic
beyond: a greedy start (tasks by decreasing total affinity, each put in the group where it adds
the most, the groups kept non-empty) and 8 seeded random partitions, each followed by a local
search (the best single-task move or swap between groups) until no move improves the score, the
best local optimum kept; for the cover, from that partition, the best addition of a task to a
group or removal from one, until none improves the score. The heuristic is a local optimum, not
a guarantee: ``tests/test_group_selection.py`` checks it against the exact selection on random
small matrices.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mtlkit.errors import ConfigError

EXACT_LIMIT = 200_000
"""Largest number of candidate selections enumerated exactly (about a second in Python)."""


@dataclass(frozen=True)
class AffinityGroups:
    """Groups of an :class:`~mtlkit.training.strategies.Alternating` strategy chosen from the
    run's affinities (a partition into ``k`` groups maximising the total affinity onto each
    task from its group; see the module docstring).

    Before the first selection the tasks are split at random (``seed``) into ``k`` groups of
    sizes differing by at most one; after ``warmup`` epochs the groups are selected from the mean
    affinity over every measurement so far, then kept (``recompute="never"``) or selected again
    after every epoch (``"epoch"``). Needs the Trainer's affinity logging (``affinity_every``)
    with the ``affinity`` kind.

    Args:
        k: number of groups (``1 <= k <= m``).
        affinity: ``"tag"`` (look-ahead) or ``"cosine"`` (gradient cosines).
        warmup: epochs (``>= 1``) before the first selection.
        recompute: ``"never"`` (fixed after the warm-up) or ``"epoch"``.
        seed: seed of the random groups of the warm-up.
        exact_limit: largest number of partitions enumerated exactly; beyond, the heuristic.
    """

    k: int
    affinity: Literal["tag", "cosine"] = "tag"
    warmup: int = 1
    recompute: Literal["never", "epoch"] = "never"
    seed: int = 0
    exact_limit: int = EXACT_LIMIT

    def __post_init__(self) -> None:
        for name in ("k", "warmup", "exact_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"AffinityGroups {name} must be an integer >= 1, got {value!r}")
        if self.affinity not in ("tag", "cosine"):
            raise ConfigError(
                f"AffinityGroups affinity must be tag or cosine; got {self.affinity!r}"
            )
        if self.recompute not in ("never", "epoch"):
            raise ConfigError(
                f"AffinityGroups recompute must be never or epoch; got {self.recompute!r}"
            )

    def initial(self, tasks: Sequence[str]) -> list[list[str]]:
        """The warm-up groups: a seeded random split into ``k`` near-equal groups."""
        if self.k > len(tasks):
            raise ConfigError(f"AffinityGroups k={self.k} exceeds the {len(tasks)} tasks")
        order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(self.seed))
        chunks = [sorted(order[g :: self.k].tolist()) for g in range(self.k)]
        return [[tasks[i] for i in chunk] for chunk in chunks]

    def select(self, z: Tensor, tasks: Sequence[str]) -> list[list[str]]:
        """The best partition of ``tasks`` into ``k`` groups under ``z``."""
        groups = best_partition(z, self.k, self.exact_limit)
        return [[tasks[i] for i in g] for g in groups]


# ------------------------------------------------------------------------ scores
def _matrix(z: Tensor | Sequence[Sequence[float]]) -> list[list[float]]:
    values = torch.as_tensor(z, dtype=torch.float64)
    if values.dim() != 2 or values.shape[0] != values.shape[1] or values.shape[0] == 0:
        raise ConfigError(f"an affinity matrix must be square [m, m], got {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ConfigError("the affinity matrix has NaN or infinite entries")
    return values.tolist()


def onto(z: Sequence[Sequence[float]], group: Sequence[int], task: int) -> float:
    """``Z_{g→i}``: the mean affinity onto ``task`` from the other members of ``group``."""
    others = [j for j in group if j != task]
    return sum(z[j][task] for j in others) / len(others) if others else 0.0


def group_score(z: Sequence[Sequence[float]], group: Sequence[int]) -> float:
    """``Σ_{i∈g} Z_{g→i}``."""
    if len(group) < 2:
        return 0.0
    return sum(z[j][i] for i in group for j in group if j != i) / (len(group) - 1)


def partition_score(
    z: Tensor | Sequence[Sequence[float]], groups: Sequence[Sequence[int]]
) -> float:
    """The total affinity of disjoint ``groups`` (task indices)."""
    values = _matrix(z)
    return sum(group_score(values, g) for g in groups)


def cover_score(z: Tensor | Sequence[Sequence[float]], groups: Sequence[Sequence[int]]) -> float:
    """``Σ_i max_{g∋i} Z_{g→i}`` over the tasks in some group."""
    values = _matrix(z)
    return _cover(values, [tuple(g) for g in groups], len(values))


def _cover(z: list[list[float]], groups: Sequence[Sequence[int]], m: int) -> float:
    best = [-math.inf] * m
    for g in groups:
        for i in g:
            best[i] = max(best[i], onto(z, g, i))
    return sum(b for b in best if b > -math.inf)


def _check_k(k: int, m: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
        raise ConfigError(f"the number of groups must be an integer in [1, {m}], got {k!r}")


def stirling2(m: int, k: int) -> int:
    """Partitions of ``m`` items into ``k`` non-empty blocks."""
    total = sum((-1) ** i * math.comb(k, i) * (k - i) ** m for i in range(k + 1))
    return total // math.factorial(k)


# --------------------------------------------------------------------- partition
def best_partition(
    z: Tensor | Sequence[Sequence[float]], k: int, exact_limit: int = EXACT_LIMIT
) -> list[list[int]]:
    """Disjoint groups (sorted task indices, ordered by first task) maximising
    :func:`partition_score`: exact when ``S(m, k) <= exact_limit``, else the heuristic."""
    values = _matrix(z)
    m = len(values)
    _check_k(k, m)
    if stirling2(m, k) <= exact_limit:
        return _exact_partition(values, k)
    return heuristic_partition(values, k)


def _exact_partition(z: list[list[float]], k: int) -> list[list[int]]:
    m = len(z)
    best, best_score = None, -math.inf
    labels = [0] * m

    def extend(i: int, used: int) -> None:  # restricted growth strings: each partition once
        nonlocal best, best_score
        if m - i < k - used:
            return
        if i == m:
            groups = [[t for t in range(m) if labels[t] == g] for g in range(k)]
            score = sum(group_score(z, g) for g in groups)
            if score > best_score + 1e-12:
                best, best_score = groups, score
            return
        for g in range(min(used + 1, k)):
            labels[i] = g
            extend(i + 1, max(used, g + 1))

    extend(0, 0)
    assert best is not None
    return best


def heuristic_partition(
    z: Tensor | Sequence[Sequence[float]], k: int, restarts: int = 8, seed: int = 0
) -> list[list[int]]:
    """The greedy start and local search of the module docstring, for any task count, run again
    from ``restarts`` seeded random partitions; the best local optimum found."""
    values = _matrix(z)
    m = len(values)
    _check_k(k, m)
    pair = [[values[i][j] + values[j][i] for j in range(m)] for i in range(m)]
    order = sorted(range(m), key=lambda i: -sum(pair[i][j] for j in range(m) if j != i))
    starts = [_greedy(pair, order, k)]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(restarts):
        perm = torch.randperm(m, generator=generator).tolist()
        starts.append([perm[g::k] for g in range(k)])
    best, best_score = None, -math.inf
    for groups in starts:
        groups = _local_search(pair, [list(g) for g in groups])
        score = sum(_score(_pair_sum(pair, g), len(g)) for g in groups)
        if score > best_score + 1e-12:
            best, best_score = groups, score
    assert best is not None
    return sorted((sorted(g) for g in best), key=lambda g: g[0])


def _score(total: float, size: int) -> float:
    return total / (size - 1) if size > 1 else 0.0


def _pair_sum(pair: list[list[float]], group: Sequence[int]) -> float:
    """``Σ_{i≠j∈g} z[j][i]``."""
    return sum(pair[i][j] for i, j in itertools.combinations(group, 2))


def _greedy(pair: list[list[float]], order: list[int], k: int) -> list[list[int]]:
    """Each task in ``order`` into the group where it adds the most (groups kept non-empty)."""
    m = len(order)
    groups: list[list[int]] = [[] for _ in range(k)]
    sums = [0.0] * k
    for n, t in enumerate(order):
        empty = [g for g in range(k) if not groups[g]]
        choices = empty if len(empty) >= m - n else range(k)
        gains = []
        for g in choices:
            added = sums[g] + sum(pair[t][j] for j in groups[g])
            gains.append((_score(added, len(groups[g]) + 1) - _score(sums[g], len(groups[g])), -g))
        g = -max(gains)[1]
        sums[g] += sum(pair[t][j] for j in groups[g])
        groups[g].append(t)
    return groups


def _local_search(pair: list[list[float]], groups: list[list[int]]) -> list[list[int]]:
    """The best improving single-task move or two-task swap between groups, until none."""
    m, k = len(pair), len(groups)
    sums = [_pair_sum(pair, g) for g in groups]
    score = _score
    while True:
        best_gain, best_move = 1e-12, None
        where = {t: g for g, members in enumerate(groups) for t in members}
        for t in range(m):
            a = where[t]
            if len(groups[a]) == 1:
                continue
            out_a = sums[a] - sum(pair[t][j] for j in groups[a] if j != t)
            loss = score(out_a, len(groups[a]) - 1) - score(sums[a], len(groups[a]))
            for b in range(k):
                if b == a:
                    continue
                in_b = sums[b] + sum(pair[t][j] for j in groups[b])
                gain = loss + score(in_b, len(groups[b]) + 1) - score(sums[b], len(groups[b]))
                if gain > best_gain:
                    best_gain, best_move = gain, ("move", t, a, b)
        for t, u in itertools.combinations(range(m), 2):
            a, b = where[t], where[u]
            if a == b:
                continue
            new_a = sums[a] - sum(pair[t][j] for j in groups[a] if j != t)
            new_a += sum(pair[u][j] for j in groups[a] if j != t)
            new_b = sums[b] - sum(pair[u][j] for j in groups[b] if j != u)
            new_b += sum(pair[t][j] for j in groups[b] if j != u)
            size_a, size_b = len(groups[a]), len(groups[b])
            gain = score(new_a, size_a) + score(new_b, size_b)
            gain -= score(sums[a], size_a) + score(sums[b], size_b)
            if gain > best_gain:
                best_gain, best_move = gain, ("swap", t, u)
        if best_move is None:
            return groups
        if best_move[0] == "move":
            _, t, a, b = best_move
            groups[a].remove(t)
            groups[b].append(t)
        else:
            _, t, u = best_move
            a, b = where[t], where[u]
            groups[a][groups[a].index(t)] = u
            groups[b][groups[b].index(u)] = t
        for g in (a, b):
            sums[g] = _pair_sum(pair, groups[g])


# ------------------------------------------------------------------------- cover
def best_cover(
    z: Tensor | Sequence[Sequence[float]], k: int, exact_limit: int = EXACT_LIMIT
) -> list[list[int]]:
    """``k`` distinct groups covering every task, maximising :func:`cover_score` (TAG's
    selection): exact when ``C(2^m - 1, k) <= exact_limit`` (branch and bound over the candidate
    groups, best first), else the heuristic."""
    values = _matrix(z)
    m = len(values)
    _check_k(k, m)
    if math.comb(2**m - 1, k) <= exact_limit:
        return _exact_cover(values, k)
    return heuristic_cover(values, k)


def _exact_cover(z: list[list[float]], k: int) -> list[list[int]]:
    m = len(z)
    candidates = [c for r in range(1, m + 1) for c in itertools.combinations(range(m), r)]
    gain = {c: [onto(z, c, i) if i in c else -math.inf for i in range(m)] for c in candidates}
    # ceiling[n][i]: the most task i can get from the candidates n, n + 1, ...
    ceiling = [[-math.inf] * m for _ in range(len(candidates) + 1)]
    for n in range(len(candidates) - 1, -1, -1):
        ceiling[n] = [max(a, b) for a, b in zip(ceiling[n + 1], gain[candidates[n]])]
    best, best_score = None, -math.inf

    def search(start: int, chosen: list[tuple[int, ...]], served: list[float]) -> None:
        nonlocal best, best_score
        if len(chosen) == k:
            if all(s > -math.inf for s in served):
                score = sum(served)
                if score > best_score + 1e-12:
                    best, best_score = [list(c) for c in chosen], score
            return
        # bound: each task served at best by the best group still to choose from
        bound = [max(s, c) for s, c in zip(served, ceiling[start])]
        if -math.inf in bound or sum(bound) <= best_score + 1e-12:
            return
        for n in range(start, len(candidates) - (k - len(chosen)) + 1):
            c = candidates[n]
            search(n + 1, [*chosen, c], [max(s, g) for s, g in zip(served, gain[c])])

    search(0, [], [-math.inf] * m)
    assert best is not None
    return sorted(best, key=lambda g: (g[0], len(g), g))


def heuristic_cover(z: Tensor | Sequence[Sequence[float]], k: int) -> list[list[int]]:
    """From :func:`heuristic_partition`, the best addition of a task to a group or removal of
    one (every task kept covered, the groups kept distinct and non-empty) while it improves
    :func:`cover_score`."""
    values = _matrix(z)
    m = len(values)
    groups = [set(g) for g in heuristic_partition(values, k)]
    current = _cover(values, [sorted(g) for g in groups], m)
    while True:
        best_score, best_groups = current + 1e-12, None
        for g, t in itertools.product(range(k), range(m)):
            trial = [set(h) for h in groups]
            if t in trial[g]:
                trial[g].discard(t)
                if not trial[g] or not any(t in h for h in trial):
                    continue
            else:
                trial[g].add(t)
            if len({frozenset(h) for h in trial}) < k:
                continue
            score = _cover(values, [sorted(h) for h in trial], m)
            if score > best_score:
                best_score, best_groups = score, trial
        if best_groups is None:
            break
        groups, current = best_groups, best_score
    return sorted((sorted(g) for g in groups), key=lambda g: (g[0], len(g), g))
