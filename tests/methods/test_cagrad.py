"""CAGrad: the exact maximin direction in a ball around the mean gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jacobians import KINDS, random_jacobian
from method_checks import check_gramian_weighting_routes
from scipy.optimize import minimize
from torch import Tensor

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.cagrad import CAGrad, cagrad_solve
from mtlkit.methods.mgda import MGDA

F64 = torch.float64


def dual_objective(jac: Tensor, w: Tensor, c: float) -> float:
    """The paper's dual ``F(w) = g_w · g0 + c |g0| |g_w|``, an upper bound of the maximin value
    for every ``w`` in the simplex."""
    g0 = jac.mean(dim=0)
    gw = w @ jac
    return float(gw @ g0 + c * g0.norm() * gw.norm())


def slsqp_reference(jac: Tensor, c: float) -> np.ndarray:
    """The paper's own method: SLSQP on the dual (best of a few starts), then
    ``d = g0 + c|g0| g_w / |g_w|``."""
    gramian = (jac @ jac.T).numpy()
    m = gramian.shape[0]
    b, radius = gramian.mean(axis=1), c * np.sqrt(gramian.mean())

    def objective(w: np.ndarray) -> float:
        return float(w @ b + radius * np.sqrt(max(w @ gramian @ w, 0.0)))

    best = None
    for seed in range(4):
        start = np.random.default_rng(seed).dirichlet(np.ones(m))
        result = minimize(
            objective,
            start,
            method="SLSQP",
            bounds=[(0, 1)] * m,
            constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        if best is None or result.fun < best.fun:
            best = result
    gw = jac.T.numpy() @ best.x
    return jac.numpy().mean(axis=0) + radius * gw / np.linalg.norm(gw)


def test_registry_and_arguments() -> None:
    method = methods.get("cagrad", c=0.5, rescale=2)
    assert isinstance(method, CAGrad)
    assert method.hparams() == {"c": 0.5, "rescale": 2}
    assert CAGrad().hparams() == {"c": 0.4, "rescale": 1}
    with pytest.raises(ConfigError, match="c must be"):
        methods.get("cagrad", c=-0.1)
    with pytest.raises(ConfigError, match="rescale must be one of"):
        methods.get("cagrad", rescale=3)


@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_c_zero_is_the_mean(rescale: int, kind: str) -> None:
    jac = random_jacobian(1, 5, 7, kind)
    decision = CAGrad(c=0.0, rescale=rescale).aggregate(jac)
    torch.testing.assert_close(decision.direction, jac.mean(dim=0), rtol=0, atol=1e-15)
    torch.testing.assert_close(decision.weights, torch.full((5,), 0.2, dtype=F64))


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 9),
    n=st.integers(1, 12),
    c=st.sampled_from([0.1, 0.4, 0.5, 1.0, 3.0]),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
)
def test_optimality_certificate(seed: int, m: int, n: int, c: float, scale: float) -> None:
    """``d`` is feasible (on the sphere ``|d - g0| = c|g0|``) and its worst improvement
    ``min_i g_i · d`` equals the dual value at ``w = λ / Σλ``: zero duality gap, so ``d`` is
    the maximiser (weak duality: any feasible ``d'`` has ``min_i g_i · d' ≤ F(w)``). When the
    gradients are Pareto-stationary the maximin value is 0 and ``d`` may lie inside the ball."""
    jac = random_jacobian(seed, m, n) * scale
    decision = CAGrad(c=c, rescale=0).aggregate(jac)
    d = decision.direction
    g0 = jac.mean(dim=0)
    radius = c * float(g0.norm())
    top = float((jac @ jac.T).diagonal().max())
    primal = float((jac @ d).min())
    extra = decision.weights - 1.0 / m
    assert bool((extra >= 0).all())
    assert float((d - g0).norm()) <= radius * (1 + 1e-8)
    if float((d - g0).norm()) < radius * (1 - 1e-8):
        mgda = MGDA().weights(jac @ jac.T)
        assert float(mgda @ (jac @ jac.T) @ mgda) <= 1e-12 * top  # stationary
        assert abs(primal) <= 1e-10 * top
    else:
        dual = dual_objective(jac, extra / extra.sum(), c)
        assert primal == pytest.approx(dual, abs=1e-9 * top * (1 + c))
    # random feasible points do no better
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        u = torch.randn(n, generator=gen, dtype=F64)
        other = g0 + radius * float(torch.rand(1, generator=gen, dtype=F64)) * u / u.norm()
        assert float((jac @ other).min()) <= primal + 1e-9 * top


@pytest.mark.parametrize(("m", "n"), [(2, 5), (3, 3), (4, 10), (5, 2)])
def test_matches_the_papers_dual_solved_by_scipy(m: int, n: int) -> None:
    for seed in range(3):
        jac = random_jacobian(seed, m, n)
        d = CAGrad(c=0.4, rescale=0)(jac).numpy()
        reference = slsqp_reference(jac, 0.4)
        scale = float(jac.norm(dim=1).max())
        np.testing.assert_allclose(d, reference, rtol=0, atol=1e-5 * scale)


def test_rescale_divides_the_direction() -> None:
    jac = random_jacobian(4, 4, 6)
    d = CAGrad(c=0.5, rescale=0)(jac)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=1)(jac), d / 1.25)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=2)(jac), d / 1.5)


def test_large_c_tends_to_mgda() -> None:
    jac = random_jacobian(5, 5, 8)
    extra = CAGrad(c=1e6, rescale=0).aggregate(jac).weights - 0.2
    mgda = MGDA().weights(jac @ jac.T)
    torch.testing.assert_close(extra / extra.sum(), mgda, rtol=0, atol=1e-5)


def test_two_orthogonal_tasks_closed_form() -> None:
    """g1 = e1, g2 = e2: by symmetry d moves from g0 = (½, ½) along g0 to the sphere:
    d = g0 + c|g0| g0 / |g0| = (1 + c) g0."""
    jac = torch.eye(2, dtype=F64)
    d = CAGrad(c=0.4, rescale=0)(jac)
    torch.testing.assert_close(d, torch.full((2,), 0.7, dtype=F64), rtol=0, atol=1e-12)


def test_zero_gradient_and_stationary_cases() -> None:
    """The maximin value is 0; the maximiser closest to g0 is returned: here g0 itself projected
    onto the gradients' dual cone, which lies in the ball."""
    jac = random_jacobian(6, 4, 6)
    jac[2] = 0
    d = CAGrad(c=0.4, rescale=0)(jac)
    assert float((jac @ d).min()) >= -1e-12
    assert float((d - jac.mean(dim=0)).norm()) <= 0.4 * float(jac.mean(dim=0).norm()) + 1e-12
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)  # g0 = 0: the ball is {0}
    torch.testing.assert_close(CAGrad()(opposite), torch.zeros(2, dtype=F64))
    # g0 = (-1/3, 1/3); with c = 1 the ball reaches the maximisers {d1 = 0, d2 >= 0} (value 0)
    stationary = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0]], dtype=F64)
    d = CAGrad(c=1.0, rescale=0)(stationary)
    torch.testing.assert_close(d, torch.tensor([0.0, 1 / 3], dtype=F64), rtol=0, atol=1e-12)


# The 2-D toy (CAGrad / Nash-MTL / FAMO; Adam lr 1e-3, float64) from (0, 0) at step 19979
TOY_STEP_19979 = [
    [-0.25443206859281553, -0.0006492140812572356],
    [0.25443211795347237, 0.0006493003714651939],
]
# its CAGrad direction (c = 0.5, rescale 0): the paper's dual minimised by golden section in
# 60-digit arithmetic (mpmath), d = g0 + c|g0| g_w / |g_w|; both rates g_i · d are 1.9318e-15
TOY_STEP_19979_DIRECTION = [-1.1442393788344916e-10, 4.484065922439970e-08]


def test_nearly_opposite_gradients_of_the_toy() -> None:
    """Issue 19, case 1: this raised 'the polyhedron {x : L x >= b} is empty (DAQP exit flag
    -1), but the task gradients are not Pareto-stationary' (hull distance 1.7e-7 of the
    largest gradient). DAQP's tolerances are now relative to the data, a level it finds empty
    is above t* (bisection), and its factorisation failure on the nearly opposite active rows
    is checked by an exact active-set solve: the direction is 0.29% from the 60-digit one (the
    eigen-factor of the float64 Gramian resolves its small eigenvalue, 5.7e-14, to about 1%),
    and it conflicts with neither task."""
    jac = torch.tensor(TOY_STEP_19979, dtype=F64)
    decision = CAGrad(c=0.5, rescale=0).aggregate(jac)
    exact = torch.tensor(TOY_STEP_19979_DIRECTION, dtype=F64)
    assert float((decision.direction - exact).norm()) <= 5e-3 * float(exact.norm())
    rates = jac @ decision.direction
    assert float(rates.min()) >= 0.98 * 1.9318e-15
    assert decision.status.converged


@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_jacobians_stay_finite_and_feasible(kind: str) -> None:
    for seed in range(5):
        for m, n in [(1, 4), (6, 3), (8, 8)]:
            for dtype in (torch.float32, F64):
                jac = random_jacobian(seed, m, n, kind, dtype)
                d = CAGrad(c=0.4, rescale=0)(jac)
                assert d.dtype == dtype and bool(torch.isfinite(d).all())
                g0 = jac.double().mean(dim=0)
                gap = float((d.double() - g0).norm()) - 0.4 * float(g0.norm())
                assert gap <= (1e-10 if dtype == F64 else 1e-4) * float(jac.double().norm())


@pytest.mark.parametrize("seed", range(5))
def test_permutation_equivariance_and_scale_invariance(seed: int) -> None:
    jac = random_jacobian(seed, 6, 10)
    gramian = jac @ jac.T
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
    w = CAGrad().weights(gramian)
    torch.testing.assert_close(CAGrad().weights(gramian[perm][:, perm]), w[perm])
    torch.testing.assert_close(CAGrad().weights(1e-10 * gramian), w, rtol=1e-8, atol=1e-10)


def test_bad_input_and_float32() -> None:
    with pytest.raises(NonFiniteError):
        CAGrad().weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    jac = random_jacobian(2, 5, 9)
    torch.testing.assert_close(CAGrad()(jac.float()).double(), CAGrad()(jac), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("features", [False, True])
def test_engine_routes(problem, features: bool) -> None:
    check_gramian_weighting_routes(problem, CAGrad, features)


# Normalised Gramians of CAGrad (c = 0.4, float32 toy) on the 2-D toy's front from (0, 0): nearly
# opposite gradients, |g0|² about 1e-12 of |g_i|². The level search stopped with duality gaps of
# 1.4e-7 to 3.5e-7 (DAQP's tolerances on a problem of that size) and ball excesses at the
# rounding of |Jᵀλ| (4.7% of the toy's steps there were reported "not verified").
TOY_FRONT_GRAMIANS = [
    [[0.999999040721431, -0.9999995203511369], [-0.9999995203511369, 1.0]],
    [[0.9999983383612954, -0.9999991691712057], [-0.9999991691712057, 1.0]],
    [[1.0, -0.9999993057924725], [-0.9999993057924725, 0.9999986115967592]],
    [[1.0, -0.999999769894458], [-0.999999769894458, 0.9999995397916273]],
]


@pytest.mark.parametrize("gramian", TOY_FRONT_GRAMIANS)
def test_nearly_opposite_gradients_at_the_front_are_solved_and_verified(gramian):
    """Checked against the paper's dual ``min_w g_w·g0 + ρ |g_w|`` solved in 50-digit
    arithmetic: the maximin value ``min_i g_i · d`` to 1e-9 of ``|g0| + ρ`` and the ball to its
    rounding."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    G = mpmath.matrix(gramian)
    c = mpmath.mpf("0.4")

    def dot_g(u, v):  # uᵀ G v for weight vectors
        return sum(u[i] * G[i, j] * v[j] for i in range(2) for j in range(2))

    mean = [mpmath.mpf(1) / 2] * 2
    rho = c * mpmath.sqrt(dot_g(mean, mean))

    def dual(w):
        gw = [w, 1 - w]
        return dot_g(gw, mean) + rho * mpmath.sqrt(dot_g(gw, gw))

    low, high = mpmath.mpf(0), mpmath.mpf(1)  # golden section: the dual is convex in w
    ratio = (mpmath.sqrt(5) - 1) / 2
    for _ in range(240):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if dual(a) < dual(b) else (a, high)
    w = (low + high) / 2
    gw = [w, 1 - w]
    exact = [mean[i] + rho * gw[i] / mpmath.sqrt(dot_g(gw, gw)) for i in range(2)]

    def maximin(weights):
        return min(dot_g([1 if k == i else 0 for k in range(2)], weights) for i in range(2))

    solve = cagrad_solve(np.array(gramian), 0.4)
    assert solve.converged
    ours = [mpmath.mpf(float(v)) for v in solve.weights]
    scale = mpmath.sqrt(dot_g(mean, mean)) + rho
    assert abs(maximin(ours) - maximin(exact)) / scale < 1e-9
    offset = [ours[i] - mean[i] for i in range(2)]
    assert mpmath.sqrt(dot_g(offset, offset)) / rho - 1 < 1e-3  # the rounding of ρ² ≈ 1e-13
