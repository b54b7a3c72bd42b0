"""Front metrics: the exact hypervolume against a brute-force count of unit cells (integer
points) and against moocore (random points), the non-dominated filter against its definition,
IGD and spread on fronts with known values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlkit.app.pareto import (
    as_minimised,
    hypervolume,
    igd,
    non_dominated,
    reference_point,
    spread,
)
from mtlkit.errors import ConfigError


def cell_count(points: np.ndarray, reference: int) -> int:
    """Brute force for integer points in [0, reference): the unit cells ``c + [0, 1]^m`` inside
    the union of the boxes ``[p, reference]`` (a cell is inside iff some point is ≤ its
    corner ``c``)."""
    m = points.shape[1]
    count = 0
    for corner in itertools.product(range(reference), repeat=m):
        if (points <= np.array(corner)).all(axis=1).any():
            count += 1
    return count


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_hypervolume_is_exact_on_integer_points(m, n, seed):
    rng = np.random.default_rng(seed)
    reference = 9 if m == 3 else 14
    points = rng.integers(0, reference, size=(n, m)).astype(float)
    assert hypervolume(points, [reference] * m) == cell_count(points, reference)


def test_hypervolume_by_hand_and_points_outside_the_reference():
    assert hypervolume([[1, 2], [2, 1]], [3, 3]) == 3.0
    assert hypervolume([[1, 2], [2, 1], [2.5, 2.5]], [3, 3]) == 3.0  # a dominated point
    assert hypervolume([[1, 2], [4, 0]], [3, 3]) == 2.0  # (4, 0) is not below the reference
    assert hypervolume([[3, 1]], [3, 3]) == 0.0  # on the reference's boundary: no volume
    assert hypervolume([[0, 0, 0]], [1, 2, 3]) == 6.0
    with pytest.raises(ConfigError, match=r"reference point must be 2 finite numbers"):
        hypervolume([[1, 2]], [3, 3, 3])
    with pytest.raises(ConfigError, match=r"row 1 has a NaN"):
        hypervolume([[1, 2], [math.nan, 1]], [3, 3])


@pytest.mark.parametrize("m", [2, 3, 4])
def test_hypervolume_agrees_with_moocore(m):
    moocore = pytest.importorskip("moocore")
    rng = np.random.default_rng(m)
    for _ in range(5):
        points = rng.random((30, m))
        # points near a front (the others are dominated): many count
        points = points / np.linalg.norm(points, axis=1, keepdims=True)
        ref = np.full(m, 1.1)
        expected = float(moocore.hypervolume(points, ref=ref))
        assert hypervolume(points, ref) == pytest.approx(expected, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 25), st.integers(0, 2**31 - 1))
def test_non_dominated_is_the_definition(m, n, seed):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 5, size=(n, m)).astype(float)  # ties on purpose
    mask = non_dominated(points)
    for i in range(n):
        dominated = any(
            (points[j] <= points[i]).all() and (points[j] < points[i]).any() for j in range(n)
        )
        assert mask[i] == (not dominated)


def test_igd_and_spread_on_a_line():
    front = np.stack([np.linspace(0, 1, 101), 1 - np.linspace(0, 1, 101)], axis=1)
    assert igd(front, front) == 0.0
    shifted = front + 0.1  # every reference point 0.1·√2 from its copy, nearer to none
    assert igd(shifted, front) == pytest.approx(0.1 * math.sqrt(2), rel=1e-12)
    # Evenly spaced, reaching both extremes: Δ = 0. Only half the front: the distance to the
    # missing extreme counts.
    even = front[::10]
    assert spread(even, front) == pytest.approx(0.0, abs=1e-12)
    half = front[:51:10]  # (0, 1) ... (0.5, 0.5): 6 points, step 0.1·√2
    d = 0.1 * math.sqrt(2)
    reach = math.hypot(0.5, 0.5)  # from (1, 0), the extreme of objective 2
    assert spread(half, front) == pytest.approx(reach / (reach + 6 * d), rel=1e-12)
    uneven = front[[0, 5, 10, 100]]  # nearest-neighbour distances 0.05√2 (x3) and 0.9√2
    nearest = np.array([0.05, 0.05, 0.05, 0.9]) * math.sqrt(2)
    expected = np.abs(nearest - nearest.mean()).sum() / (4 * nearest.mean())
    assert spread(uneven) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(spread(front[:1]))


def test_reference_point_and_directions():
    points = np.array([[1.0, -20.0], [3.0, -10.0]])
    np.testing.assert_allclose(reference_point(points), [3.2, -9.0])
    np.testing.assert_allclose(reference_point(np.array([[2.0, 0.0]])), [2.2, 0.1])
    np.testing.assert_allclose(as_minimised(np.array([[0.9, 0.2]]), [True, False]), [[-0.9, 0.2]])
    with pytest.raises(ConfigError, match="1 directions for 2 objectives"):
        as_minimised(points, [True])
