"""The shared solvers: Gramian factor, DAQP projections, dual-cone weights, α-fair equation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog, minimize, nnls

from mtlkit.errors import NonFiniteError
from mtlkit.methods import solvers
from mtlkit.methods.active_set import active_set_projection
from mtlkit.methods.fair_solver import fair_weights
from mtlkit.methods.solvers import (
    InfeasibleError,
    PolyhedralProjector,
    SolverError,
    dual_cone_weights,
    eigen_range,
    gramian_factor,
    gramian_to_numpy,
    hull_distance,
)

KINDS = ["generic", "duplicate", "collinear", "opposite", "zero"]


def random_jacobian(seed: int, m: int, n: int, kind: str = "generic") -> np.ndarray:
    """Rows of widely different norms; ``kind`` adds degeneracy."""
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((m, n)) * np.exp(rng.standard_normal((m, 1)))
    i, j = rng.integers(m, size=2)
    if kind == "duplicate":
        jac[i] = jac[j]
    elif kind == "collinear":
        jac[i] = 3.0 * jac[j]
    elif kind == "opposite":
        jac[i] = -0.5 * jac[j]
    elif kind == "zero":
        jac[i] = 0
    return jac


def normalized_gramian(jac: np.ndarray) -> np.ndarray:
    gramian = jac @ jac.T
    top = gramian.diagonal().max()
    return gramian / top if top > 0 else gramian


def nnls_dual_cone(jac: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``argmin_{v ≥ u} vᵀGv`` (``G ∝ J Jᵀ``) by Lawson-Hanson NNLS (scipy) on the Jacobian
    itself: ``v = u + z``, ``z = argmin_{z ≥ 0} |Jᵀz + Jᵀu|``. (Not on a factor of ``G`` from
    its eigendecomposition: that has a zero gradient's column at rounding level, ``~1e-17``, not
    ``0``, and NNLS then gives that task a weight of ``~1e15`` and a wrong ``v``.)"""
    z, _ = nnls(jac.T, -jac.T @ target, maxiter=50 * len(target))
    return target + z


def assert_dual_cone_solution(
    jac: np.ndarray, gramian: np.ndarray, target: np.ndarray, v: np.ndarray
) -> None:
    """``v`` satisfies the KKT conditions of ``min_{v ≥ u} vᵀGv`` and ``Jᵀv`` is the reference
    projection (the direction is unique, ``v`` may not be)."""
    assert (v >= target - 1e-15).all()
    assert (gramian @ v).min() >= -1e-10 * np.abs(v).sum()  # J d >= 0
    assert abs((v - target) @ gramian @ v) <= 1e-10 * (1 + np.abs(v).sum() ** 2)
    reference = nnls_dual_cone(jac, target)
    scale = np.linalg.norm(jac, axis=1).max() or 1.0
    gap = np.linalg.norm(jac.T @ (v - reference))
    assert gap <= 1e-10 * scale * (1 + np.abs(v).sum())


def test_gramian_to_numpy_normalises_and_checks() -> None:
    gramian = torch.tensor([[4.0, -2.0], [-2.0, 9.0]], dtype=torch.float32)
    work, scale = gramian_to_numpy(gramian, "X")
    assert scale == 9.0 and work.dtype == np.float64
    np.testing.assert_allclose(work, gramian.double().numpy() / 9.0)
    zero, one = gramian_to_numpy(torch.zeros(3, 3), "X")
    assert one == 1.0 and not zero.any()
    with pytest.raises(NonFiniteError, match="X got a Gramian"):
        gramian_to_numpy(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "X")
    with pytest.raises(ValueError, match="square"):
        gramian_to_numpy(torch.ones(2, 3), "X")


@pytest.mark.parametrize(("m", "n", "rank"), [(5, 8, 5), (8, 3, 3), (4, 4, 4), (1, 3, 1)])
def test_gramian_factor_reproduces_the_gramian(m: int, n: int, rank: int) -> None:
    gramian = normalized_gramian(random_jacobian(m + n, m, n))
    factor = gramian_factor(gramian)
    assert factor.shape == (m, rank)
    np.testing.assert_allclose(factor @ factor.T, gramian, atol=1e-13)
    values, _ = eigen_range(gramian)
    assert (np.diff(values) <= 0).all()  # descending
    assert gramian_factor(np.zeros((3, 3))).shape == (3, 0)


def test_eigen_range_drops_noise_at_the_given_precision() -> None:
    gramian = np.diag([1.0, 1e-9, 0.0])
    assert eigen_range(gramian)[0].size == 2  # float64: 1e-9 is signal
    assert eigen_range(gramian, eps=float(np.finfo(np.float32).eps))[0].size == 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 8), n=st.integers(1, 8))
def test_projection_satisfies_its_kkt_conditions(seed: int, m: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    factor = gramian_factor(normalized_gramian(random_jacobian(seed, m, n)))
    y = rng.standard_normal(factor.shape[1])
    lower = -np.abs(rng.standard_normal(m)) * rng.integers(0, 2, size=m)  # feasible: 0 is in it
    projection = PolyhedralProjector(factor)(y, lower)
    x, lam = projection.x, projection.multipliers
    np.testing.assert_allclose(x, y + factor.T @ lam, atol=1e-10)
    slack = factor @ x - lower
    assert (lam >= 0).all() and (slack >= -1e-10).all()
    assert np.abs(lam * slack).max() <= 1e-10


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(2, 6),
    tiny=st.sampled_from([1e-4, 1e-6, 1e-8]),
)
def test_projection_holds_tiny_rows_to_their_own_scale(seed: int, m: int, tiny: float) -> None:
    """A constraint row 1e-6 of the others must hold to the tolerance *relative to its norm*
    (DAQP's tolerance is absolute: the rows are scaled to unit norm before the solve)."""
    rng = np.random.default_rng(seed)
    factor = rng.standard_normal((m, 3))
    factor /= np.linalg.norm(factor, axis=1, keepdims=True)
    factor[0] *= tiny
    y = 10 * rng.standard_normal(3)
    lower = np.zeros(m)
    lower[0] = tiny * rng.uniform(0.1, 1.0)  # the tiny task asks for a positive level
    try:
        projection = PolyhedralProjector(factor)(y, lower)
    except InfeasibleError:
        # the polyhedron can be empty for b_0 > 0: then an LP on the unit-norm rows agrees
        norms = np.linalg.norm(factor, axis=1)
        lp = linprog(
            np.zeros(3),
            A_ub=-factor / norms[:, None],
            b_ub=-lower / norms,
            bounds=[(None, None)] * 3,
        )
        assert lp.status == 2, f"DAQP says infeasible, the LP found {lp.x} ({lp.message})"
        return
    x, lam = projection.x, projection.multipliers
    relative_slack = (factor @ x - lower) / np.linalg.norm(factor, axis=1)
    assert relative_slack.min() >= -1e-9
    np.testing.assert_allclose(x, y + factor.T @ lam, atol=1e-9 * max(1.0, np.abs(y).max()))
    assert (lam >= 0).all()
    assert np.abs(lam * (factor @ x - lower)).max() <= 1e-8


def test_projection_reuses_its_workspace_and_reports_infeasibility() -> None:
    factor = np.array([[1.0, 0.0], [-1.0, 0.0]])
    projector = PolyhedralProjector(factor)
    first = projector(np.array([-2.0, 1.0]), np.zeros(2))
    np.testing.assert_allclose(first.x, [0.0, 1.0], atol=1e-14)
    second = projector(np.array([3.0, 1.0]), np.array([-1.0, -1.0]))
    np.testing.assert_allclose(second.x, [1.0, 1.0], atol=1e-14)
    np.testing.assert_allclose(second.multipliers, [0.0, 2.0], atol=1e-14)
    with pytest.raises(InfeasibleError):
        projector(np.zeros(2), np.ones(2))  # x1 >= 1 and -x1 >= 1
    with pytest.raises(InfeasibleError):
        PolyhedralProjector(np.zeros((2, 0)))(np.zeros(0), np.ones(2))


def test_a_failed_solve_raises_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    class FailingModel:
        def __init__(self) -> None:
            self.settings: dict[str, float] = {}

        def setup(self, *args: object) -> tuple[int, float]:
            return 1, 0.0  # DAQP's (exitflag, setup time)

        def solve(self) -> tuple[object, ...]:
            return np.zeros(2), 0.0, -4, {"lam": np.zeros(2)}

    class FakeDaqp:
        Model = FailingModel

    monkeypatch.setattr(solvers, "_daqp", lambda: FakeDaqp)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])  # x_1 >= 1 and -x_1 >= 1: empty
    with pytest.raises(SolverError, match="iteration limit"):
        PolyhedralProjector(opposite)(np.ones(2), np.ones(2))
    # where the polyhedron is not empty the exact active-set solve takes over (KKT-checked)
    projector = PolyhedralProjector(np.eye(2))
    found = projector(np.array([-1.0, 2.0]), np.array([0.5, 0.0]))
    np.testing.assert_allclose(found.x, [0.5, 2.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(found.multipliers, [1.5, 0.0], rtol=0, atol=1e-15)
    assert projector.fallbacks == 1


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 10),
    n=st.integers(1, 12),
    kind=st.sampled_from(KINDS),
)
def test_dual_cone_weights_match_nnls(seed: int, m: int, n: int, kind: str) -> None:
    jac = random_jacobian(seed, m, n, kind)
    gramian = normalized_gramian(jac)
    rng = np.random.default_rng(seed)
    targets = np.vstack([np.eye(m)[rng.integers(m)] / m, rng.random(m)])
    weights = dual_cone_weights(gramian, targets)
    for target, v in zip(targets, weights):
        assert_dual_cone_solution(jac, gramian, target, v)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 8),
    n=st.integers(1, 8),
    kind=st.sampled_from(KINDS),
    level=st.sampled_from([0.0, 0.1, -0.3]),
)
def test_active_set_projection_matches_daqp(seed: int, m: int, n: int, kind: str, level) -> None:
    """The fallback of DAQP returns DAQP's projection wherever DAQP solves (else nothing or a
    point whose KKT conditions it checked)."""
    factor = gramian_factor(normalized_gramian(random_jacobian(seed, m, n, kind)))
    rng = np.random.default_rng(seed)
    y = factor.T @ rng.random(m) / m
    lower = np.full(m, level * float(np.linalg.norm(y)))
    try:
        expected = PolyhedralProjector(factor)(y, lower)
    except SolverError:
        expected = None  # an empty polyhedron, or DAQP's failure: see the CAGrad toy test
    assume(expected is not None)
    found = active_set_projection(factor, y, lower)
    if found is None:  # pragma: no cover - reported with the example if it ever happens
        pytest.fail("the active-set projection found no point where DAQP did")
    scale = max(
        float(np.linalg.norm(y)), float(np.abs(lower).max()), float(np.linalg.norm(found[0]))
    )
    np.testing.assert_allclose(found[0], expected.x, rtol=0, atol=1e-9 * (scale or 1.0))


def _fail(self: PolyhedralProjector, y: np.ndarray, lower: np.ndarray) -> None:
    raise InfeasibleError("the polyhedron {x : L x >= b} is empty (DAQP exit flag -1)")


@pytest.mark.parametrize("solver", ["daqp", "nnls fallback"])
def test_dual_cone_weights_with_a_zero_gradient(
    solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (hypothesis: seed=0, m=7, n=9, kind='zero'; task 3's gradient is zero, rank 6).
    The eigenvectors gave the factor's row 3 at rounding level (~1e-17) instead of 0; NNLS, the
    fallback (and the test's former Gramian-based reference), then put a weight ~1e15 on task 3
    and returned a ``v`` with twice the optimal ``vᵀGv`` (direction off by 0.71)."""
    seed, m, n = 0, 7, 9
    jac = random_jacobian(seed, m, n, "zero")
    assert not jac[3].any()
    gramian = normalized_gramian(jac)
    factor = gramian_factor(gramian)
    assert factor.shape == (m, 6) and not factor[3].any()
    np.testing.assert_allclose(factor @ factor.T, gramian, atol=1e-13)
    rng = np.random.default_rng(seed)
    targets = np.vstack([np.eye(m)[rng.integers(m)] / m, rng.random(m)])
    if solver == "daqp":
        weights = dual_cone_weights(gramian, targets)
    else:
        monkeypatch.setattr(PolyhedralProjector, "__call__", _fail)
        with pytest.warns(RuntimeWarning, match="redone with scipy's NNLS"):
            weights = dual_cone_weights(gramian, targets)
    for target, v in zip(targets, weights):
        assert_dual_cone_solution(jac, gramian, target, v)
        assert v[3] == target[3]  # a zero gradient is no constraint: its weight stays u_3
    # the first target, e_5 / 7: v = (0.2541, 0.1287, 0.0575, 0, 0, 1/7, 0) with vᵀGv = 0.0050
    np.testing.assert_allclose(weights[0, [3, 4, 5, 6]], [0, 0, 1 / 7, 0], atol=1e-12)
    assert weights[0] @ gramian @ weights[0] == pytest.approx(0.0050051783880, rel=1e-9)


def test_dual_cone_falls_back_to_nnls_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """DAQP reports degenerate (always feasible) dual-cone QPs infeasible now and then: the solve
    is redone with scipy's NNLS, with a RuntimeWarning naming the reason."""

    gramian = normalized_gramian(random_jacobian(2, 6, 4, "opposite"))
    targets = np.eye(6) / 6
    expected = dual_cone_weights(gramian, targets)
    monkeypatch.setattr(PolyhedralProjector, "__call__", _fail)
    with pytest.warns(RuntimeWarning, match="exit flag -1.*redone with scipy's NNLS"):
        weights = dual_cone_weights(gramian, targets)
    for target, v, e in zip(targets, weights, expected):
        assert (v >= target).all() and (gramian @ v).min() >= -1e-12
        assert (v - e) @ gramian @ (v - e) <= 1e-20


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize(("m", "n"), [(1, 3), (2, 5), (6, 10), (12, 30)])
def test_fair_weights_solve_the_equation(alpha: float, m: int, n: int) -> None:
    for seed in range(3):
        gramian = normalized_gramian(random_jacobian(seed, m, n))
        solve = fair_weights(gramian, alpha)
        w = solve.weights
        assert solve.converged and not solve.stationary and (w > 0).all()
        residual = w ** (1 / alpha) * (gramian @ w) - 1
        assert np.abs(residual).max() <= 1e-10


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_fair_weights_minimise_the_convex_objective(alpha: float) -> None:
    """Independent reference: scipy's L-BFGS-B on ½ wᵀGw - Σ h(w_i), h' = w^(-1/α)."""
    gramian = normalized_gramian(random_jacobian(11, 5, 9))

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        h = np.log(w) if alpha == 1 else w ** (1 - 1 / alpha) / (1 - 1 / alpha)
        return 0.5 * w @ gramian @ w - h.sum(), gramian @ w - w ** (-1 / alpha)

    reference = minimize(
        objective,
        np.ones(5),
        jac=True,
        method="L-BFGS-B",
        bounds=[(1e-9, None)] * 5,
        options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 10000},
    ).x
    np.testing.assert_allclose(fair_weights(gramian, alpha).weights, reference, rtol=1e-6)


def test_fair_weights_retry_a_stalled_warm_start_cold() -> None:
    """Issue 19, case 3: a Nash-MTL solve on the 2-D toy (float64, from (0, 0)), warm-started
    from the previous step's solution: the line search stalled after 7 iterations with a
    residual of 1.1e3, well below the cap of 20 (the warning said 'raise the iteration cap').
    The cold start solves it at once (within rounding: the weights are ~1e7)."""
    gramian = np.array([[0.010001649114227056, -0.1000082452310417], [-0.1000082452310417, 1.0]])
    warm = np.array([5396305.100197763, 539675.002403254])
    solve = fair_weights(gramian, start=warm)
    assert solve.converged and solve.reason == "converged" and solve.residual < 1e-4
    # both are converged within the residual's rounding (about 5e-4 at weights of ~1e7), which
    # bounds their agreement: 2e-5 relative with NumPy 2.4 / SciPy 1.17 (1e-6 with earlier ones)
    np.testing.assert_allclose(solve.weights, fair_weights(gramian).weights, rtol=1e-4)
    capped = fair_weights(gramian, start=warm, max_iter=1)
    assert capped.converged  # the cold retry needs no iteration


def test_fair_weights_warm_start_zero_rows_and_cap() -> None:
    gramian = normalized_gramian(random_jacobian(3, 6, 10))
    cold = fair_weights(gramian)
    warm = fair_weights(gramian, start=cold.weights * 1.3)
    assert warm.iterations <= 2 and np.allclose(warm.weights, cold.weights, rtol=1e-10)
    capped = fair_weights(gramian, max_iter=1)
    assert not capped.converged and capped.iterations == 1 and capped.residual > 1e-10
    jac = random_jacobian(4, 5, 8)
    jac[2] = 0
    solve = fair_weights(normalized_gramian(jac))
    assert solve.converged and solve.weights[2] == 0
    keep = [0, 1, 3, 4]
    alone = fair_weights(normalized_gramian(jac[keep]))
    np.testing.assert_allclose(solve.weights[keep], alone.weights, rtol=1e-10)


@pytest.mark.parametrize("kind", ["opposite", "all zero", "hull"])
def test_fair_weights_detect_pareto_stationarity(kind: str) -> None:
    jac = random_jacobian(5, 4, 6)
    if kind == "opposite":
        jac = np.vstack([jac[0], -2.0 * jac[0]])
    elif kind == "all zero":
        jac = np.zeros((3, 4))
    else:  # 0 is a strict convex combination of three gradients in the plane
        jac = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]])
    solve = fair_weights(normalized_gramian(jac))
    assert solve.stationary and not solve.converged
    assert (solve.weights == 0).all()


def test_hull_distance() -> None:
    norms = np.array([0.5, 1.0, 2.0])
    expected = 1 / np.sqrt((1 / norms**2).sum())  # orthogonal gradients
    assert hull_distance(np.diag(norms**2) / 4) == pytest.approx(expected / 2, rel=1e-12)
    assert hull_distance(np.array([[1.0, -0.5], [-0.5, 0.25]])) <= 1e-8  # opposite
    assert hull_distance(np.zeros((2, 2))) == 0.0


def test_projector_recovers_when_daqp_setup_reports_infeasibility() -> None:
    """Regression: DAQP's *setup* can find the first problem infeasible (flag -1) and build no
    workspace; the projector then kept the model and the next call failed with DAQP's "Model
    has not been set up". Now the setup's flag is checked (InfeasibleError) and the next call
    sets up afresh."""
    projector = PolyhedralProjector(np.array([[1.0, 0.0], [-1.0, 0.0]]))
    with pytest.raises(InfeasibleError):
        projector(np.zeros(2), np.ones(2))  # x1 >= 1 and -x1 >= 1, at the setup
    y = np.array([0.5, -2.0])
    projection = projector(y, np.full(2, -1.0))  # a loose, feasible level: x = y
    np.testing.assert_allclose(projection.x, y)
    np.testing.assert_array_equal(projection.multipliers, [0.0, 0.0])


def test_a_tiny_row_no_longer_makes_a_feasible_projection_look_empty() -> None:
    """CAGrad's level search on the toy from (9, 9), step 2982: a constraint row 2e-6 of the
    other made DAQP (absolute tolerances) report this feasible problem infeasible at setup;
    with the rows scaled to unit norm it is solved, to the tolerance relative to each row."""
    factor = np.array(
        [[-4.468049687568623e-07, -1.9266799663429824e-06], [1.0, -8.608501821663488e-13]]
    )
    y = np.array([0.4999997765975156, -9.633404135965824e-07])
    lower = np.full(2, 1.7216119244993367e-07)
    projection = PolyhedralProjector(factor)(y, lower)
    x, lam = projection.x, projection.multipliers
    assert ((factor @ x - lower) / np.linalg.norm(factor, axis=1)).min() >= -1e-12
    np.testing.assert_allclose(x, y + factor.T @ lam, rtol=1e-9, atol=1e-12)
    assert (lam >= 0).all() and np.abs(lam * (factor @ x - lower)).max() <= 1e-12
