"""Front metrics over sets of runs: non-dominated filter, hypervolume, IGD, spread.

Every objective is minimised (a metric where higher is better is negated first, see
:func:`as_minimised`). Points are ``[n, m]`` arrays, one row per run.

* :func:`non_dominated`: the mask of the points no other point dominates (``≤`` everywhere,
  ``<`` somewhere); equal points do not dominate each other, so both stay.
* :func:`hypervolume`: the Lebesgue measure of the union of the boxes ``[p, r]`` between each
  point and the reference point ``r`` (points not below ``r`` in every objective add nothing).
  Exact code here for 1, 2 (a sweep, ``O(n log n)``) and 3 objectives (slices along the third:
  ``O(n² log n)``); 4 and more need the ``pareto`` extra (``moocore``, the maintained C
  implementation of Fonseca, Paquete & López-Ibáñez's algorithms), which the tests also check
  the exact code against.
* :func:`igd`: the inverted generational distance of Coello & Cortés (2005), the mean over the
  points of a reference front of the Euclidean distance to the nearest point of the set.
* :func:`spread`: the generalised spread Δ of Zhou, Jin, Zhang, Sendhoff & Tsang (2006), which
  is Deb et al.'s (NSGA-II, 2002) Δ extended to ``m`` objectives: 0 for points evenly spaced
  that reach the extremes of the reference front.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtlkit.errors import ConfigError, MtlkitError

__all__ = [
    "as_minimised",
    "hypervolume",
    "igd",
    "non_dominated",
    "reference_point",
    "spread",
]


def _points(points: Sequence[Sequence[float]] | np.ndarray, what: str = "points") -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ConfigError(f"{what} must be an [n, m] array of objective values, got shape "
                          f"{array.shape}")  # fmt: skip
    if not np.isfinite(array).all():
        bad = int(np.argwhere(~np.isfinite(array))[0, 0])
        raise ConfigError(f"{what}: row {bad} has a NaN or infinite value: {array[bad].tolist()}")
    return array


def as_minimised(values: np.ndarray, higher_is_better: Sequence[bool]) -> np.ndarray:
    """``values`` (``[n, m]``) with the columns where higher is better negated."""
    array = _points(values)
    if len(higher_is_better) != array.shape[1]:
        raise ConfigError(f"{len(higher_is_better)} directions for {array.shape[1]} objectives")
    signs = np.where(np.asarray(higher_is_better, dtype=bool), -1.0, 1.0)
    return array * signs


def non_dominated(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """The boolean mask of the points that no other point dominates (minimisation)."""
    array = _points(points)
    if len(array) == 0:
        return np.zeros(0, dtype=bool)
    below = (array[:, None, :] <= array[None, :, :]).all(axis=2)  # [j, i]: j ≤ i everywhere
    strictly = (array[:, None, :] < array[None, :, :]).any(axis=2)
    dominated = (below & strictly).any(axis=0)
    return ~dominated


def hypervolume(
    points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float]
) -> float:
    """The hypervolume dominated by ``points`` up to ``reference`` (minimisation; see the module
    docstring).

    Raises:
        ConfigError: on a shape mismatch or a non-finite value.
        MtlkitError: for 4 or more objectives without ``moocore`` (the ``pareto`` extra).
    """
    array = _points(points)
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (array.shape[1],) or not np.isfinite(ref).all():
        raise ConfigError(
            f"the reference point must be {array.shape[1]} finite numbers (one per objective), "
            f"got {np.asarray(reference).tolist()}"
        )
    inside = array[(array < ref).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    inside = inside[non_dominated(inside)]
    m = array.shape[1]
    if m == 1:
        return float(ref[0] - inside[:, 0].min())
    if m == 2:
        return _hypervolume_2d(inside, ref)
    if m == 3:
        return _hypervolume_3d(inside, ref)
    try:
        import moocore
    except ImportError as error:
        raise MtlkitError(
            f"the hypervolume of {m} objectives needs moocore: pip install 'mtlkit[pareto]' "
            "(mtlkit computes 1 to 3 objectives itself)"
        ) from error
    return float(moocore.hypervolume(inside, ref=ref))


def _hypervolume_2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Non-dominated points below ``ref``: sorted by the first objective, the second falls;
    the area is a sum of rectangles."""
    order = np.lexsort((points[:, 1], points[:, 0]))
    xs, ys = points[order, 0], points[order, 1]
    area, level = 0.0, ref[1]
    for x, y in zip(xs, ys, strict=True):
        if y < level:
            area += (ref[0] - x) * (level - y)
            level = y
    return float(area)


def _hypervolume_3d(points: np.ndarray, ref: np.ndarray) -> float:
    """Slices between consecutive values of the third objective: in each, the 2-D area of the
    points at or below the slice's bottom."""
    order = np.argsort(points[:, 2], kind="stable")
    points = points[order]
    levels = np.append(points[:, 2], ref[2])
    volume = 0.0
    for k in range(len(points)):
        height = levels[k + 1] - levels[k]
        if height > 0:
            slice_ = points[: k + 1, :2]
            volume += height * _hypervolume_2d(slice_[non_dominated(slice_)], ref[:2])
    return float(volume)


def igd(
    points: Sequence[Sequence[float]] | np.ndarray,
    reference_front: Sequence[Sequence[float]] | np.ndarray,
) -> float:
    """Inverted generational distance: the mean over the reference front's points of the
    Euclidean distance to the nearest of ``points`` (0 when the set covers the front)."""
    array = _points(points)
    front = _points(reference_front, "the reference front")
    if front.shape[1] != array.shape[1] or len(array) == 0 or len(front) == 0:
        raise ConfigError(
            f"IGD needs points and a reference front of the same objectives, got shapes "
            f"{array.shape} and {front.shape}"
        )
    distances = np.sqrt(((front[:, None, :] - array[None, :, :]) ** 2).sum(axis=2))
    return float(distances.min(axis=1).mean())


def spread(
    points: Sequence[Sequence[float]] | np.ndarray,
    reference_front: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> float:
    """The generalised spread ``Δ = (Σ_k d(e_k, S) + Σ_{x ∈ S} |d(x) - d̄|) /
    (Σ_k d(e_k, S) + |S| d̄)`` (Zhou et al., 2006), with ``d(x)`` the distance of ``x`` to its
    nearest neighbour in the set ``S`` (its non-dominated points), ``d̄`` their mean and
    ``e_k`` the extreme point of the reference front in objective ``k`` (without a reference
    front: of ``S`` itself, so only the evenness counts). NaN for fewer than two points.
    """
    array = _points(points)
    array = np.unique(array[non_dominated(array)], axis=0)
    if len(array) < 2:
        return float("nan")
    extremes_of = array if reference_front is None else _points(reference_front, "the front")
    if extremes_of.shape[1] != array.shape[1]:
        raise ConfigError(
            f"spread: the reference front has {extremes_of.shape[1]} objectives, the points "
            f"{array.shape[1]}"
        )
    extremes = extremes_of[np.argmin(extremes_of, axis=0)]
    pairwise = np.sqrt(((array[:, None, :] - array[None, :, :]) ** 2).sum(axis=2))
    np.fill_diagonal(pairwise, np.inf)
    nearest = pairwise.min(axis=1)
    mean = nearest.mean()
    to_extremes = np.sqrt(((extremes[:, None, :] - array[None, :, :]) ** 2).sum(axis=2))
    reach = to_extremes.min(axis=1).sum()
    denominator = reach + len(array) * mean
    if denominator == 0:
        return 0.0
    return float((reach + np.abs(nearest - mean).sum()) / denominator)


def reference_point(points: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """A reference point for sets with no given one: the worst value of each objective plus
    ``margin`` times its range (plus ``margin`` times its magnitude, or ``margin``, where
    the range is 0), so that every point adds volume."""
    array = _points(points)
    if len(array) == 0:
        raise ConfigError("no points to take a reference point from")
    worst, best = array.max(axis=0), array.min(axis=0)
    span = worst - best
    span = np.where(span > 0, span, np.where(worst != 0, np.abs(worst), 1.0))
    return worst + margin * span
