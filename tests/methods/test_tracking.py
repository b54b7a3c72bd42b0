"""MoCo and DB-MTL: task gradients tracked across steps."""

from __future__ import annotations

import pytest
import torch
from method_checks import make_jacobian
from stateful_checks import check_route_steps, check_state_round_trip
from torch import Tensor

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.mgda import min_norm_weights
from mtlkit.methods.tracking import DBMTL, MoCo

F64 = torch.float64


def bisection_simplex(v: Tensor) -> Tensor:
    """Projection on the simplex by bisection on the threshold θ of max(v - θ, 0)."""
    low, high = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = 0.5 * (low + high)
        if float((v - mid).clamp_min(0).sum()) > 1:
            low = mid
        else:
            high = mid
    return (v - 0.5 * (low + high)).clamp_min(0)


def reference_moco(jacobians, losses, beta, beta_sigma, gamma, gamma_sigma, rho, normalize, soft):
    """Algorithm 1 of the paper (and LibMTL's variants), step by step."""
    m, n = jacobians[0].shape
    y = torch.zeros(m, n, dtype=F64)
    lam = torch.full((m,), 1.0 / m, dtype=F64)
    directions = []
    for k, jac in enumerate(jacobians, start=1):
        h = jac.clone()
        if normalize:
            for i in range(m):
                h[i] = jac[i] / jac[i].norm() * losses[i]
        y = y - beta / k**beta_sigma * (y - h)
        step = lam - gamma / k**gamma_sigma * ((y @ y.T + rho * torch.eye(m, dtype=F64)) @ lam)
        lam = torch.softmax(step, -1) if soft else bisection_simplex(step)
        directions.append(y.T @ lam)
    return directions, y, lam


@pytest.mark.parametrize(
    ("kwargs", "normalize", "soft"),
    [
        ({}, False, False),
        ({"rho": 0.3, "gamma": 0.5, "gamma_sigma": 0.0}, False, False),
        ({"gradient_normalization": "loss", "lambda_update": "softmax"}, True, True),
    ],
)
def test_moco_matches_reference(kwargs, normalize: bool, soft: bool) -> None:
    jacobians = [make_jacobian(k, 3, 5) for k in range(6)]
    losses = torch.tensor([0.5, 2.0, 1.5], dtype=F64)
    method = MoCo(**kwargs)
    decisions = [method.aggregate(jac, losses) for jac in jacobians]
    got = [decision.direction for decision in decisions]
    settings = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0}
    settings.update({k: v for k, v in kwargs.items() if k in settings})
    expected, y, lam = reference_moco(jacobians, losses, **settings, normalize=normalize, soft=soft)
    for d, e in zip(got, expected):
        assert torch.allclose(d, e, atol=1e-12)
    assert torch.allclose(method.tracked, y, atol=1e-12)
    assert torch.allclose(method.lambdas, lam, atol=1e-12)
    assert int(method.step) == 6 and all(decision.weights is None for decision in decisions)


def test_moco_first_step_closed_form() -> None:
    jac = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    method = MoCo(beta=0.5, gamma=0.1)
    d = method(jac)
    y = 0.5 * jac  # β_1 = β
    lam = torch.tensor([0.5, 0.5], dtype=F64) - 0.1 * (y @ y.T) @ torch.tensor(
        [0.5, 0.5], dtype=F64
    )
    lam = lam + (1 - lam.sum()) / 2  # interior: the projection shifts both equally
    assert torch.allclose(method.lambdas, lam, atol=1e-15)
    assert torch.allclose(d, lam @ y, atol=1e-15)


def test_moco_with_a_fixed_jacobian_converges_to_mgda() -> None:
    """Y tracks the fixed J and λ descends ½ λᵀ J Jᵀ λ on the simplex: MGDA's weights."""
    jac = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    gramian = jac @ jac.T
    step = 1.0 / float(torch.linalg.eigvalsh(gramian).max())
    method = MoCo(beta=0.5, beta_sigma=0.5, gamma=step, gamma_sigma=0.0)
    for _ in range(600):
        d = method(jac)
    mgda = min_norm_weights(gramian)
    assert torch.allclose(method.tracked, jac, atol=1e-10)
    assert torch.allclose(d, mgda @ jac, atol=1e-9)
    assert mgda[2] == 0  # a constraint is active: the projection matters


def reference_db_mtl(jacobians, losses, beta, beta_sigma):
    """LibMTL's DB_MTL.backward, with the exact log-loss gradient g / L."""
    buffer = torch.zeros_like(jacobians[0])
    directions = []
    for k, jac in enumerate(jacobians, start=1):
        grads = jac / losses[:, None]
        buffer = grads + beta / k**beta_sigma * (buffer - grads)
        norms = buffer.norm(dim=-1)
        alpha = norms.max() / norms
        directions.append(sum(alpha[i] * buffer[i] for i in range(len(losses))))
    return directions, buffer


@pytest.mark.parametrize(("beta", "beta_sigma"), [(0.9, 0.0), (0.5, 0.5)])
def test_db_mtl_matches_reference(beta: float, beta_sigma: float) -> None:
    jacobians = [make_jacobian(k, 3, 5) for k in range(5)]
    losses = torch.tensor([0.5, 2.0, 1.5], dtype=F64)
    method = DBMTL(beta=beta, beta_sigma=beta_sigma)
    got = [method(jac, losses) for jac in jacobians]
    expected, buffer = reference_db_mtl(jacobians, losses, beta, beta_sigma)
    for d, e in zip(got, expected):
        assert torch.allclose(d, e, atol=1e-12)
    assert torch.allclose(method.tracked, buffer, atol=1e-12)


def test_db_mtl_balances_magnitudes_and_ignores_loss_scales() -> None:
    jac = make_jacobian(2, 3, 5)
    losses = torch.tensor([0.5, 2.0, 1.5], dtype=F64)
    method = DBMTL()
    d = method(jac, losses)
    tracked = method.tracked
    norms = tracked.norm(dim=1)
    scaled = (norms.max() / norms)[:, None] * tracked
    assert torch.allclose(scaled.norm(dim=1), norms.max().expand(3))  # equal magnitudes
    assert torch.allclose(scaled.sum(dim=0), d)
    # L_i → c_i L_i scales g_i by c_i: log L_i only shifts, the update is unchanged
    c = torch.tensor([10.0, 0.01, 3.0], dtype=F64)
    assert torch.allclose(DBMTL()(jac * c[:, None], losses * c), d, atol=1e-12)
    # log_losses=False takes J as the gradients of log L_i
    assert torch.allclose(DBMTL(log_losses=False)(jac / losses[:, None]), d, atol=1e-12)


def test_db_mtl_zero_rows() -> None:
    jac = make_jacobian(0, 3, 4)
    jac[1] = 0
    d = DBMTL(log_losses=False)(jac)
    assert torch.isfinite(d).all()
    assert torch.equal(
        DBMTL(log_losses=False)(torch.zeros(2, 3, dtype=F64)), torch.zeros(3, dtype=F64)
    )


@pytest.mark.parametrize(
    "make", [lambda: MoCo(), lambda: MoCo(rho=0.1, lambda_update="softmax"), lambda: DBMTL()]
)
def test_state_round_trip_and_reset(make) -> None:
    jacobians = [make_jacobian(k, 3, 6) for k in range(4)]
    check_state_round_trip(make, jacobians, torch.tensor([1.0, 0.5, 2.0], dtype=F64))


def test_errors_and_registry() -> None:
    assert isinstance(methods.get("moco", rho=0.1), MoCo)
    assert isinstance(methods.get("db_mtl", beta=0.5), DBMTL)
    assert methods.get("db-mtl").hparams() == {"beta": 0.9, "beta_sigma": 0.0, "log_losses": True}
    losses = torch.ones(3, dtype=F64)
    for method in (MoCo(), DBMTL()):
        method(make_jacobian(0, 3, 4), losses)
        with pytest.raises(ValueError, match="parameter route"):
            method(make_jacobian(0, 3, 5), losses)
        method.reset()
        assert method.tracked is None and int(method.step) == 0
        with pytest.raises(NonFiniteError):
            method(torch.tensor([[float("nan"), 1.0]], dtype=F64), torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match="needs the task losses"):
        DBMTL()(make_jacobian(0, 2, 3))
    with pytest.raises(ValueError, match="positive"):
        DBMTL()(make_jacobian(0, 2, 3), torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="needs the task losses"):
        MoCo(gradient_normalization="loss")(make_jacobian(0, 2, 3))
    for name, bad in (
        ("moco", {"beta": 0.0}),
        ("moco", {"gamma": -1.0}),
        ("moco", {"rho": -0.1}),
        ("moco", {"lambda_update": "exp"}),
        ("db_mtl", {"beta": 1.0}),
        ("db_mtl", {"beta_sigma": -1.0}),
    ):
        with pytest.raises(ConfigError):
            methods.get(name, **bad)


@pytest.mark.parametrize("make", [MoCo, DBMTL])
def test_engine_parameter_route(make) -> None:
    check_route_steps(make)


def test_db_mtl_heads_descend_the_log_losses() -> None:
    """The paper's heads take ∇ log L_i = ∇L_i / L_i: head weights 1 / L (none for log inputs)."""
    jac, losses = make_jacobian(4, 3, 6), torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    decision = DBMTL().aggregate(jac, losses)
    torch.testing.assert_close(decision.head_weights, 1.0 / losses, rtol=0, atol=0)
    assert decision.weights is None
    raw = DBMTL(log_losses=False).aggregate(jac, losses.log())
    assert raw.head_weights is None
