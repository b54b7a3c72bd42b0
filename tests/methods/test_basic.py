"""Mean, Sum, Constant and random gradient weighting (RGW / Random)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import check_engine_routes, jacobians, make_jacobian
from scipy import stats

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods import RGW, Constant, Mean, Random, Sum

F64 = torch.float64


def tolerance(jac: torch.Tensor) -> float:
    scale = float(jac.abs().max()) or 1.0
    return (1e-5 if jac.dtype == torch.float32 else 1e-12) * scale * jac.shape[0]


@settings(max_examples=40, deadline=None)
@given(jacobians())
def test_mean_and_sum_are_the_mean_and_sum_of_the_rows(jac: torch.Tensor) -> None:
    m = jac.shape[0]
    mean, total = Mean(), Sum()
    averaged, summed = mean.aggregate(jac), total.aggregate(jac)
    torch.testing.assert_close(averaged.direction, jac.mean(dim=0), rtol=0, atol=tolerance(jac))
    torch.testing.assert_close(summed.direction, jac.sum(dim=0), rtol=0, atol=tolerance(jac))
    assert torch.equal(averaged.weights, torch.full((m,), 1 / m, dtype=jac.dtype))
    assert summed.weights.tolist() == [1.0] * m
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(total(jac[perm]), total(jac), rtol=0, atol=tolerance(jac))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 7),
    st.integers(0, 2**31 - 1),
    st.floats(-3, 3),
    st.floats(-3, 3),
)
def test_linearity(m: int, n: int, seed: int, a: float, b: float) -> None:
    """A(a J1 + b J2) = a A(J1) + b A(J2) for the three fixed weightings."""
    j1, j2 = make_jacobian(seed, m, n), make_jacobian(seed + 1, m, n)
    weights = torch.linspace(-1, 2, m).tolist()
    for method in (Mean(), Sum(), Constant(weights)):
        torch.testing.assert_close(
            method(a * j1 + b * j2), a * method(j1) + b * method(j2), rtol=1e-12, atol=1e-11
        )


def test_constant_known_values_and_gramian_independence() -> None:
    jac = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]], dtype=F64)
    method = methods.get("constant", weights=[0.5, -1, 2])
    assert isinstance(method, Constant) and method.hparams() == {"weights": [0.5, -1.0, 2.0]}
    assert method(jac).tolist() == [0.5 * 1 - 3 + 0, 0.5 * 2 + 1 + 8]
    assert method.weights(torch.eye(3) * 1e9).tolist() == [0.5, -1.0, 2.0]
    assert method.weights(torch.eye(3, dtype=torch.float32)).dtype == torch.float32


def test_constant_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="needs argument"):
        methods.get("constant")
    with pytest.raises(ConfigError, match="empty"):
        methods.get("constant", weights=[])
    with pytest.raises(ConfigError, match="finite"):
        methods.get("constant", weights=[1.0, math.nan])
    with pytest.raises(ValueError, match="2 weights, got 3 tasks"):
        Constant([1.0, 2.0])(torch.ones(3, 4))


@pytest.mark.parametrize("name", ["mean", "sum", "rgw", "random"])
def test_non_finite_and_bad_shapes(name: str) -> None:
    method = methods.get(name)
    jac = torch.ones(3, 2)
    jac[1, 0] = math.nan
    with pytest.raises(NonFiniteError):
        method(jac)
    with pytest.raises(ValueError, match="square"):
        method.weights(torch.ones(2, 3))


def test_registry_names() -> None:
    assert isinstance(methods.get("mean"), Mean) and isinstance(methods.get("sum"), Sum)
    assert type(methods.get("rgw")) is RGW and type(methods.get("random")) is Random
    with pytest.raises(ConfigError, match="no argument"):
        methods.get("mean", weights=[1])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_rgw_weights_are_on_the_simplex_and_are_a_softmax_of_normal_draws(
    m: int, seed: int
) -> None:
    method = RGW(generator=seed)
    w = method.weights(torch.eye(m, dtype=torch.float32))
    assert w.dtype == torch.float32 and w.shape == (m,)
    assert bool((w > 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    z = torch.randn(m, generator=torch.Generator().manual_seed(seed), dtype=F64)
    torch.testing.assert_close(w, torch.softmax(z, 0).float(), rtol=1e-6, atol=0)


def test_rgw_distribution() -> None:
    """log(w_i / w_j) = z_i - z_j ~ N(0, 2), independent of the gradients; E[w_i] = 1/m."""
    m, draws = 4, 4000
    method = RGW(generator=1234)
    jac = make_jacobian(0, m, 5)
    samples = torch.stack([method.weights(jac @ jac.T) for _ in range(draws)]).numpy()
    log_ratio = np.log(samples[:, 0] / samples[:, 1])
    assert stats.kstest(log_ratio, stats.norm(scale=math.sqrt(2)).cdf).pvalue > 0.01
    # E[w_i] = 1/m by symmetry; the standard error of each mean is below 0.2 / sqrt(draws)
    assert np.abs(samples.mean(axis=0) - 1 / m).max() < 4 * 0.2 / math.sqrt(draws)
    # consecutive draws are independent: lag-1 correlation of w_0 near 0
    assert abs(np.corrcoef(samples[:-1, 0], samples[1:, 0])[0, 1]) < 4 / math.sqrt(draws)


def test_rgw_direction_is_the_weighted_sum() -> None:
    jac = make_jacobian(1, 5, 6)
    decision = RGW(generator=3).aggregate(jac)
    torch.testing.assert_close(decision.direction, decision.weights @ jac, rtol=0, atol=1e-15)
    assert torch.equal(decision.weights, RGW(generator=3).weights(jac @ jac.T))  # its own draw


def test_rgw_seed_reset_state_dict_and_alias() -> None:
    jac = make_jacobian(2, 4, 3)
    a, b, alias = RGW(generator=7), RGW(generator=7), Random(generator=7)
    first = [a.weights(jac @ jac.T) for _ in range(5)]
    assert all(torch.equal(w, b.weights(jac @ jac.T)) for w in first)
    assert all(torch.equal(w, alias.weights(jac @ jac.T)) for w in first)
    assert len({tuple(w.tolist()) for w in first}) == 5
    a.reset()
    assert all(torch.equal(w, a.weights(jac @ jac.T)) for w in first)
    state = a.state_dict()
    after = [a.weights(jac @ jac.T) for _ in range(3)]
    fresh = RGW(generator=0)
    fresh.load_state_dict(state)
    assert all(torch.equal(w, fresh.weights(jac @ jac.T)) for w in after)
    assert a.hparams() == {"generator": 7}
    assert RGW(generator=torch.Generator().manual_seed(9)).hparams() == {"generator": 9}
    assert RGW().hparams() == {"generator": None}


@pytest.mark.parametrize(
    "make",
    [Mean, Sum, lambda: Constant([0.5, 2.0, -1.0]), lambda: RGW(generator=4)],
    ids=["mean", "sum", "constant", "rgw"],
)
def test_engine_routes(make) -> None:
    check_engine_routes(make)


def test_sum_and_mean_through_the_engine_equal_the_loss_weighting() -> None:
    """Sum ≡ EW() and Mean ≡ EW("mean") on every parameter (different routes, same update)."""
    from conftest import task_losses, tiny_hps

    import mtlkit

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=gen, dtype=F64), torch.randn(7, 3, generator=gen, dtype=F64)
    for aggregator, weighting in ((Sum(), methods.EW()), (Mean(), methods.EW("mean"))):
        grads = []
        for method in (aggregator, weighting):
            model = tiny_hps(seed=1)
            mtlkit.backward(task_losses(model, x, y), model.shared_parameters(), method)
            grads.append([p.grad for p in model.parameters() if p.grad is not None])
        assert len(grads[0]) == len(grads[1])
        for g, h in zip(*grads):
            torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-14)
