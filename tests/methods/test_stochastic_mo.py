"""MoDo and SDMGrad: weights from the Jacobians of two independent extra batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_hps
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import make_jacobian
from stateful_checks import check_route_steps, check_state_round_trip

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.mgda import min_norm_weights
from mtlkit.methods.stochastic_mo import MoDo, SDMGrad

F64 = torch.float64


def extras(step: int, m: int = 3, n: int = 6) -> list[torch.Tensor]:
    return [make_jacobian(1000 + 2 * step, m, n), make_jacobian(1001 + 2 * step, m, n)]


def libmtl_projection(y: torch.Tensor) -> torch.Tensor:
    """LibMTL's MoDo._projection2simplex (a loop over the sorted values)."""
    m = len(y)
    sorted_y = torch.sort(y, descending=True)[0]
    tmpsum, tmax_f = 0.0, (torch.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return torch.max(y - tmax_f, torch.zeros(m, dtype=y.dtype))


def test_modo_matches_libmtl_over_several_steps() -> None:
    method = MoDo(gamma=0.05, rho=0.1)
    assert method.extra_batches == 2
    lam = torch.full((3,), 1 / 3, dtype=F64)
    for step in range(5):
        first, second = extras(step)
        jac = make_jacobian(step, 3, 6)
        method.observe_extra([first, second])
        decision = method.aggregate(jac)
        lam = libmtl_projection(lam - 0.05 * (first @ (second.T @ lam) + 0.1 * lam))
        assert torch.allclose(decision.weights, lam, atol=1e-12)
        assert torch.allclose(decision.direction, lam @ jac, atol=1e-12)  # the step's own Jacobian


def test_modo_one_step_closed_form() -> None:
    method = MoDo(gamma=0.1, rho=0.0)
    method.observe_extra([torch.eye(2, dtype=F64), torch.diag(torch.tensor([1.0, 4.0], dtype=F64))])
    jac = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=F64)
    decision = method.aggregate(jac)
    # (½, ½) - 0.1 (½, 2) = (0.45, 0.3), projected: + 0.125 each
    assert torch.allclose(decision.weights, torch.tensor([0.575, 0.425], dtype=F64))
    assert torch.allclose(decision.direction, 0.575 * jac[0] + 0.425 * jac[1])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 6), gamma=st.floats(1e-3, 10.0))
def test_weights_stay_on_the_simplex(seed: int, m: int, gamma: float) -> None:
    for method in (MoDo(gamma=gamma), SDMGrad(lr=gamma)):
        for step in range(3):
            method.observe_extra(
                [make_jacobian(seed + step, m, 4), make_jacobian(seed - step, m, 4)]
            )
            method(make_jacobian(seed, m, 4))
            w = method.lambdas
            assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_modo_with_identical_extras_decreases_the_mgda_objective(seed: int) -> None:
    """J₁ = J₂ = J, ρ = 0, γ ≤ 1/L: each λ step decreases λᵀ G λ, and λ tends to MGDA's."""
    jac = torch.randn(3, 5, generator=torch.Generator().manual_seed(seed), dtype=F64)
    gramian = jac @ jac.T
    method = MoDo(gamma=1.0 / float(torch.linalg.eigvalsh(gramian).max()), rho=0.0)
    values = []
    for _ in range(400):
        method.observe_extra([jac, jac])
        method(jac)
        values.append(float(method.lambdas @ gramian @ method.lambdas))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))
    assert torch.allclose(method.lambdas @ jac, min_norm_weights(gramian) @ jac, atol=1e-8)


def libmtl_sdmgrad(w, zeta, xi1, xi2, lamda, niter, lr=5.0, momentum=0.5):
    """LibMTL's SDMGrad.backward: SGD with momentum, numpy projection."""

    def euclidean_proj_simplex(v, s=1):
        n = v.shape[0]
        if v.sum() == s and np.all(v >= 0):
            return v
        u = np.sort(v)[::-1]
        cssv = np.cumsum(u)
        rho = np.nonzero(u * np.arange(1, n + 1) > (cssv - s))[0][-1]
        theta = float(cssv[rho] - s) / (rho + 1)
        return (v - theta).clip(min=0)

    gg = xi1 @ xi2.T
    diag = torch.where(torch.diag(gg) < 0, torch.zeros_like(torch.diag(gg)), torch.diag(gg))
    scale = torch.mean(torch.sqrt(diag))
    gg = gg / (scale.pow(2) + 1e-8)
    g_mean = torch.mean(gg, dim=1)
    # torch.optim.SGD(lr, momentum) as documented (buf = g, then μ buf + g; w -= lr buf),
    # written out: the optimizer's first step costs seconds of imports
    buf = None
    for _ in range(niter):
        grad = torch.mv(gg, w) + lamda * g_mean
        buf = grad.clone() if buf is None else momentum * buf + grad
        w = torch.from_numpy(euclidean_proj_simplex((w - lr * buf).numpy()))
    g = ((zeta * w.view(-1, 1)).sum(0) + lamda * zeta.mean(dim=0)) / (1 + lamda)
    return w, g


def test_sdmgrad_matches_libmtl_over_several_steps() -> None:
    method = SDMGrad()
    w = torch.full((3,), 1 / 3, dtype=F64)
    for step in range(4):
        first, second = extras(step)
        jac = make_jacobian(step, 3, 6)
        method.observe_extra([first, second])
        decision = method.aggregate(jac)
        w, expected = libmtl_sdmgrad(w, jac, first, second, 0.3, 20)
        # LibMTL adds 1e-8 to the scale²: a relative difference of 1e-8 / scale²
        assert torch.allclose(method.lambdas, w, atol=1e-7)
        assert torch.allclose(decision.direction, expected, atol=1e-7 * float(jac.norm()))
        assert torch.allclose(decision.weights, (w + 0.1) / 1.3, atol=1e-7)


def test_sdmgrad_limits() -> None:
    jac = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    gramian = jac @ jac.T
    # λ = 0, plain projected gradient with a safe step: stochastic MGDA (here exact: J₁ = J₂)
    scale = float(gramian.diagonal().sqrt().mean()) ** 2
    step = scale / float(torch.linalg.eigvalsh(gramian).max())
    method = SDMGrad(lambda_reg=0.0, lr=step, momentum=0.0, niter=500)
    method.observe_extra([jac, jac])
    d = method(jac)
    assert torch.allclose(d, min_norm_weights(gramian) @ jac, atol=1e-8)
    # large λ: the mean gradient
    method = SDMGrad(lambda_reg=1e6)
    method.observe_extra([jac, jac])
    assert torch.allclose(method(jac), jac.mean(dim=0), atol=1e-5 * float(jac.norm()))


@pytest.mark.parametrize("seed", range(5))
def test_sdmgrad_inner_steps_decrease_its_objective(seed: int) -> None:
    """J₁ = J₂ = J, no momentum, η ≤ 1/L: each step decreases |Jᵀ(w + λ/m)|²."""
    jac = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)
    gramian = jac @ jac.T
    normalized = gramian / float(gramian.diagonal().sqrt().mean()) ** 2
    step = 1.0 / float(torch.linalg.eigvalsh(normalized).max())
    method = SDMGrad(lambda_reg=0.3, lr=step, momentum=0.0, niter=1)
    values = []
    for _ in range(50):
        method.observe_extra([jac, jac])
        method(jac)
        shifted = method.lambdas + 0.3 / 4
        values.append(float(shifted @ gramian @ shifted))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))
    assert values[-1] < values[0]


def test_forward_needs_fresh_extra_jacobians() -> None:
    jac = make_jacobian(0, 3, 6)
    for method in (MoDo(), SDMGrad()):
        with pytest.raises(RuntimeError, match="observe_extra"):
            method(jac)
        method.observe_extra(extras(0))
        method(jac)
        with pytest.raises(RuntimeError, match="observe_extra"):
            method(jac)  # consumed by the previous step
        with pytest.raises(ValueError, match="exactly 2"):
            method.observe_extra(extras(0)[:1])
        with pytest.raises(ValueError, match="same shape"):
            method.observe_extra([make_jacobian(0, 3, 6), make_jacobian(0, 3, 5)])
        with pytest.raises(NonFiniteError):
            method.observe_extra([jac * float("nan"), jac])
        method.observe_extra(extras(0, m=2))
        with pytest.raises(ValueError, match="of 2 tasks, the step has 3"):
            method(jac)


def test_state_round_trip_and_reset() -> None:
    jacobians = [make_jacobian(k, 3, 6) for k in range(4)]

    def prime(method, step: int) -> None:
        method.observe_extra(extras(step))

    for make in (lambda: MoDo(gamma=0.1), lambda: SDMGrad(niter=3)):
        check_state_round_trip(make, jacobians, prime=prime)


def test_errors_and_registry() -> None:
    assert methods.get("modo", gamma=0.01).hparams() == {"gamma": 0.01, "rho": 0.1}
    assert methods.get("sdmgrad").hparams() == {
        "lambda_reg": 0.3,
        "lr": 5.0,
        "momentum": 0.5,
        "niter": 20,
        "normalize": True,
    }
    for name, bad in (
        ("modo", {"gamma": 0.0}),
        ("modo", {"rho": -1.0}),
        ("sdmgrad", {"lambda_reg": -0.1}),
        ("sdmgrad", {"momentum": 1.0}),
        ("sdmgrad", {"niter": 0}),
        ("sdmgrad", {"lr": 0.0}),
    ):
        with pytest.raises(ConfigError):
            methods.get(name, **bad)


@pytest.mark.parametrize("make", [lambda: MoDo(gamma=0.1), SDMGrad])
def test_engine_parameter_route(make) -> None:
    n = sum(p.numel() for p in tiny_hps().shared_parameters())

    def prime(method, step: int) -> None:
        method.observe_extra(extras(step, n=n))

    check_route_steps(make, prime=prime)
