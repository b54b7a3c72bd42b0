"""PCD: priority-constrained descent (Varam & AlHajri, TMLR 2026)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import check_engine_routes, jacobians, make_jacobian
from scipy.optimize import minimize

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods import PCD
from mtlkit.methods.pcd import priority_qp

F64 = torch.float64


def enumerate_qp(gram: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, bool]:
    """The QP by brute force over active sets (an independent solver): for each set of
    linearly independent constraints, solve the KKT system; keep the feasible one with
    non-negative multipliers (the optimum is unique, the primal being strictly convex)."""
    m = gram.shape[0]
    gs, b = gram[1:, 1:], taus * np.diag(gram)[1:] - gram[1:, 0]
    scale = max(np.diag(gram).max(), 1e-300)
    for size in range(m):
        for subset in itertools.combinations(range(m - 1), size):
            s = list(subset)
            mu = np.zeros(m - 1)
            if s:
                block = gs[np.ix_(s, s)]
                if np.linalg.matrix_rank(block, tol=1e-12 * scale) < size:
                    continue
                mu[s] = np.linalg.solve(block, b[s])
            # tolerances relative to the multipliers' size: near-incompatible constraints give
            # huge multipliers, whose rounding shows in the slacks
            size_mu = 1.0 + np.abs(mu).sum()
            if (mu >= -1e-9 * size_mu).all() and (gs @ mu - b >= -1e-9 * scale * size_mu).all():
                return np.r_[1.0, mu], True
    return np.r_[1.0, np.zeros(m - 1)], False


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 7),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["generic", "collinear", "opposite", "zero", "duplicate"]),
    st.floats(0.0, 1.0),
)
def test_qp_matches_active_set_enumeration(m: int, n: int, seed: int, kind: str, tau: float):
    jac = make_jacobian(seed, m, n, kind)
    gram = jac @ jac.T
    taus = torch.full((m - 1,), tau, dtype=F64)
    w, feasible = priority_qp(gram, taus)
    expected, expected_feasible = enumerate_qp(gram.numpy(), taus.numpy())
    assert feasible == expected_feasible
    scale = float(jac.norm(dim=1).max()) or 1.0
    # compare the directions (the multipliers of dependent gradients are not unique); nearly
    # dependent active gradients give huge multipliers, whose rounding the tolerance follows
    size = 1.0 + float(w.abs().sum())
    atol = 1e-8 * scale * size
    np.testing.assert_allclose((w @ jac).numpy(), expected @ jac.numpy(), rtol=0, atol=atol)
    if feasible and m > 1:  # every constraint holds
        slack = jac[1:] @ (w @ jac) - taus * (jac[1:] ** 2).sum(dim=1)
        assert float(slack.min()) >= -1e-8 * scale**2 * size
        assert float(w[1:].min()) >= 0 and w[0] == 1


@pytest.mark.parametrize("seed", range(25))
def test_qp_matches_scipy_on_the_dual(seed: int) -> None:
    """The dual, min_{μ ≥ 0} ½ μᵀ G_s μ - bᵀ μ with b_j = τ_j |g_j|² - g_jᵀ g_0, by scipy's
    L-BFGS-B; the primal solution is d = g_0 + Σ_j μ_j g_j (unique even where μ is not)."""
    rng = np.random.default_rng(seed)
    m, n = 2 + seed % 4, 3 + seed % 5
    jac = rng.normal(size=(m, n)) * np.exp(rng.normal(size=(m, 1)))
    taus = rng.uniform(0, 0.5, size=m - 1)
    w, feasible = priority_qp(torch.from_numpy(jac @ jac.T), torch.from_numpy(taus))
    assert feasible  # n > m - 1 secondaries in general position: always feasible
    secondary = jac[1:]
    gram = secondary @ secondary.T
    b = taus * np.diag(gram) - secondary @ jac[0]
    result = minimize(
        lambda mu: 0.5 * mu @ gram @ mu - b @ mu,
        np.zeros(m - 1),
        jac=lambda mu: gram @ mu - b,
        bounds=[(0, None)] * (m - 1),
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 10000},
    )
    assert result.success
    expected = jac[0] + secondary.T @ result.x
    np.testing.assert_allclose(w.numpy() @ jac, expected, rtol=0, atol=1e-7 * np.abs(jac).max())


def test_qp_infeasible_constraints_are_dropped() -> None:
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=F64)  # opposite secondaries
    w, feasible = priority_qp(g @ g.T, torch.tensor([0.1, 0.1], dtype=F64))
    assert not feasible and w.tolist() == [1.0, 0.0, 0.0]
    w, feasible = priority_qp(g @ g.T, torch.tensor([0.0, 0.0], dtype=F64))
    assert feasible and w.tolist() == [1.0, 0.0, 0.0]  # τ = 0: d = g_0 is orthogonal, fine


@pytest.mark.parametrize("seed", range(20))
def test_two_tasks_closed_form(seed: int) -> None:
    """m = 2 (the paper's Cor. 4.6), first call: the scales are 1/sqrt(|g_i|² + ε), exactly."""
    gen = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(2, 5, generator=gen, dtype=F64) * torch.tensor([[3.0], [0.2]], dtype=F64)
    tau = 0.3
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    if u1 @ u2 >= tau:
        expected = g1
    else:
        direction = u1 + (tau - u1 @ u2) * u2
        assert float(direction @ u2) == pytest.approx(tau)  # the constraint binds
        expected = direction * g1.norm() / direction.norm()
    method = PCD(tau=tau, eps=0.0)
    d = method(torch.stack([g1, g2]))
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    assert float(d.norm()) == pytest.approx(float(g1.norm()), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(jacobians(max_m=6), st.floats(0.0, 1.0))
def test_direction_properties(jac: torch.Tensor, tau: float) -> None:
    method = PCD(tau=tau)
    decision = method.aggregate(jac)
    d = decision.direction
    assert d.dtype == jac.dtype and bool(torch.isfinite(d).all())
    g1 = jac[0].double()
    w = decision.weights.double()
    jac64 = jac.double()
    torch.testing.assert_close(w @ jac64, d.double(), rtol=1e-4, atol=1e-4 * float(g1.norm()))
    eps = 1e-4 if jac.dtype == torch.float32 else 1e-9
    if float(d.norm()) > 0:
        assert float(d.double().norm()) == pytest.approx(float(g1.norm()), rel=eps)
    if float(g1.norm()) == 0:
        assert float(d.abs().max()) == 0
    if method.last_feasible and float(d.norm()) > 0 and jac.shape[0] > 1:
        # each secondary gets its share of the normalised progress, g̃_jᵀ d̃ ≥ τ |g̃_j|², where
        # d = c d̃ and the primary's weight is s_1 c (its QP weight is 1)
        scales = method.last_scales
        d_tilde = d.double() * scales[0] / w[0]
        normalized = jac64 * scales[:, None]
        slack = normalized[1:] @ d_tilde - tau * (normalized[1:] ** 2).sum(dim=1)
        # the QP's multipliers w_i / (s_i c) amplify the rounding of the Gramian
        size = 1.0 + float((w / (scales * w[0] / scales[0])).abs().sum())
        assert float(slack.min()) >= -(1e-5 if jac.dtype == torch.float32 else 1e-9) * size


def test_secondary_scale_invariance_and_primary_index() -> None:
    jacs = [make_jacobian(s, 3, 6) for s in range(6)]
    a, b = PCD(tau=0.2, eps=0.0), PCD(tau=0.2, eps=0.0)
    scale = torch.tensor([[1.0], [1e4], [1e-3]], dtype=F64)
    for jac in jacs:
        torch.testing.assert_close(a(jac), b(jac * scale), rtol=1e-9, atol=1e-12)
    perm = [2, 0, 1]  # the primary (task 0) becomes task 1
    c, d = PCD(tau=0.2), PCD(tau=0.2, primary=1)
    for jac in jacs:
        first, moved = c.aggregate(jac), d.aggregate(jac[perm])
        torch.testing.assert_close(first.direction, moved.direction, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(first.weights[perm], moved.weights, rtol=1e-12, atol=1e-12)


def test_moving_average_of_squared_norms() -> None:
    beta = 0.9
    method = PCD(beta=beta, eps=0.0)
    norms = [2.0, 0.5, 3.0]
    v = 0.0
    for t, r in enumerate(norms, start=1):
        jac = torch.tensor([[r, 0.0], [0.0, 1.0]], dtype=F64)
        method(jac)
        v = beta * v + (1 - beta) * r**2
        expected = 1 / math.sqrt(v / (1 - beta**t))
        assert float(method.last_scales[0]) == pytest.approx(expected, rel=1e-12)
        assert float(method.last_scales[1]) == pytest.approx(1.0, rel=1e-12)


def test_special_cases() -> None:
    method = PCD()
    assert method(torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=F64)).tolist() == [0.0, 0.0]
    g = torch.tensor([[3.0, 4.0]], dtype=F64)
    torch.testing.assert_close(PCD()(g), g[0], rtol=1e-15, atol=0)  # one task: its gradient
    infeasible = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=F64)
    method = PCD(tau=0.1)
    torch.testing.assert_close(method(infeasible), infeasible[0], rtol=0, atol=1e-15)
    assert method.last_feasible is False and method.infeasible_steps == 1
    # g̃_1 exactly opposite a secondary, τ > 0: d̃ = g̃_1 + μ g̃_2 with μ = 1 + τ gives d ∥ g_2
    opposite = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(PCD(tau=0.5)(opposite), torch.tensor([1.0, 0.0], dtype=F64))


def test_state_dict_reset_and_arguments() -> None:
    jacs = [make_jacobian(s, 3, 4) for s in range(6)]
    method = methods.get("pcd", tau=[0.1, 0.3], beta=0.5)
    assert method.hparams() == {"tau": [0.1, 0.3], "beta": 0.5, "eps": 1e-8, "primary": 0}
    first = [method(jac) for jac in jacs]
    method.reset()
    assert method.steps == 0 and method.sq_norm_average is None
    assert all(torch.equal(d, method(jac)) for d, jac in zip(first, jacs))
    method.reset()
    for jac in jacs[:3]:
        method(jac)
    state = method.state_dict()
    other = PCD(tau=[0.1, 0.3], beta=0.5)
    other.load_state_dict(state)
    assert other.steps == 3
    assert all(torch.equal(method(jac), other(jac)) for jac in jacs[3:])
    with pytest.raises(ValueError, match="tracking 3 tasks, got 2"):
        method(make_jacobian(0, 2, 4))
    with pytest.raises(ValueError, match="2 values of tau for 3"):
        PCD(tau=[0.1, 0.2])(make_jacobian(0, 4, 4))
    for bad in ({"tau": 1.5}, {"tau": [-0.1]}, {"beta": 1.0}, {"eps": -1}, {"primary": -1}):
        with pytest.raises(ConfigError):
            methods.get("pcd", **bad)
    with pytest.raises(ValueError, match="primary=3"):
        PCD(primary=3)(make_jacobian(0, 2, 2))
    gram = torch.eye(2)
    gram[1, 1] = math.inf
    with pytest.raises(NonFiniteError):
        PCD().weights(gram)


def test_engine_routes() -> None:
    check_engine_routes(lambda: PCD(tau=0.3))
