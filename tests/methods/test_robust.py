"""TrimmedMean (coordinate-wise) and Krum / Multi-Krum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import check_engine_routes, jacobians, make_jacobian

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods import Krum, TrimmedMean

F64 = torch.float64


def numpy_trimmed_mean(jac: np.ndarray, t: int) -> np.ndarray:
    m = jac.shape[0]
    return np.sort(jac, axis=0)[t : m - t].mean(axis=0)


@settings(max_examples=50, deadline=None)
@given(jacobians(), st.integers(0, 3))
def test_trimmed_mean_matches_numpy(jac: torch.Tensor, t: int) -> None:
    m = jac.shape[0]
    t = min(t, (m - 1) // 2)
    method = TrimmedMean(trim_number=t)
    decision = method.aggregate(jac)
    got = decision.direction
    expected = numpy_trimmed_mean(jac.double().numpy(), t)
    scale = float(jac.abs().max()) or 1.0
    eps = 1e-6 if jac.dtype == torch.float32 else 1e-13
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=eps * scale)
    assert got.dtype == jac.dtype and decision.weights is None
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(m))
    assert torch.equal(method(jac[perm]), got)  # the sort makes it exactly order-free


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(1e3, 1e12))
def test_trimmed_mean_ignores_up_to_t_outliers(t: int, n: int, seed: int, size: float) -> None:
    """With at most t corrupted rows, every coordinate stays within the honest rows' range."""
    honest = make_jacobian(seed, 2 * t + 2, n)
    gen = torch.Generator().manual_seed(seed)
    outliers = size * torch.randn(t, n, generator=gen, dtype=F64)
    d = TrimmedMean(t)(torch.cat([honest, outliers]))
    assert bool((d >= honest.min(dim=0).values - 1e-12).all())
    assert bool((d <= honest.max(dim=0).values + 1e-12).all())


def test_trimmed_mean_known_values() -> None:
    jac = torch.tensor([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 1.0], [-50.0, 2.0]])
    assert TrimmedMean(1)(jac).tolist() == [2.0, 1.0]  # mean of {1, 2, 3} and of {0, 1, 2}
    assert TrimmedMean(2)(jac).tolist() == [2.0, 1.0]  # the coordinate-wise median
    torch.testing.assert_close(TrimmedMean(0)(jac), jac.mean(dim=0))


def test_trimmed_mean_arguments_and_errors() -> None:
    assert methods.get("trimmed_mean").hparams() == {"trim_number": 1}
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="trim_number"):
            methods.get("trimmed_mean", trim_number=bad)
    with pytest.raises(ValueError, match="at least 2 \\* trim_number \\+ 1 = 5 tasks, got 4"):
        TrimmedMean(2)(torch.ones(4, 3))
    jac = torch.ones(3, 2)
    jac[0, 1] = math.inf
    with pytest.raises(NonFiniteError):
        TrimmedMean(1)(jac)


def test_trimmed_mean_engine_routes() -> None:
    check_engine_routes(lambda: TrimmedMean(1))


def brute_force_scores(jac: np.ndarray, f: int, squared: bool = True) -> np.ndarray:
    """Blanchard et al. (2017), from the gradients themselves: the sum of the (squared)
    distances to the m - f - 2 nearest other gradients, from explicit differences."""
    m = jac.shape[0]
    scores = []
    for i in range(m):
        dist = [float(np.sum((jac[i] - jac[j]) ** 2)) for j in range(m) if j != i]
        if not squared:
            dist = [math.sqrt(v) for v in dist]
        scores.append(sum(sorted(dist)[: m - f - 2]))
    return np.array(scores)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(3, 9),
    st.integers(1, 8),
    st.integers(0, 2**31 - 1),
    st.integers(0, 6),
    st.integers(1, 9),
    st.sampled_from(["squared", "distance"]),
)
def test_krum_matches_brute_force(m: int, n: int, seed: int, f: int, k: int, score: str) -> None:
    f, k = min(f, m - 3), min(k, m)
    jac = make_jacobian(seed, m, n)
    method = Krum(n_byzantine=f, n_selected=k, score=score)
    decision = method.aggregate(jac)
    expected = brute_force_scores(jac.numpy(), f, squared=score == "squared")
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(method.last_scores.numpy(), expected, rtol=1e-9, atol=1e-9 * scale)
    weights = decision.weights.numpy()
    chosen = np.flatnonzero(weights)
    assert len(chosen) == k and np.all(weights[chosen] == 1.0 / k)
    # the k lowest scores (exact ties, e.g. on a line, may be broken either way by rounding)
    np.testing.assert_allclose(
        np.sort(expected[chosen]), np.sort(expected)[:k], rtol=1e-9, atol=1e-9 * scale
    )
    if len(set(np.round(expected / scale, 6))) == m:  # no near-ties: the very same selection
        assert set(chosen) == set(np.argsort(expected, kind="stable")[:k])
    torch.testing.assert_close(decision.direction, decision.weights @ jac, rtol=0, atol=0)


def test_krum_picks_an_honest_gradient() -> None:
    """f outliers far away, m > 2 f + 2: the selection is among the honest gradients."""
    gen = torch.Generator().manual_seed(0)
    for f in (1, 2, 3):
        honest = torch.randn(2 * f + 3, 6, generator=gen, dtype=F64) * 0.1 + 1.0
        byzantine = torch.randn(f, 6, generator=gen, dtype=F64) * 100.0
        jac = torch.cat([byzantine, honest])
        for k in (1, 2):
            w = Krum(n_byzantine=f, n_selected=k).weights(jac @ jac.T)
            assert float(w[:f].abs().sum()) == 0.0 and float(w.sum()) == pytest.approx(1.0)


def test_krum_known_values_and_multi_krum() -> None:
    # four gradients on a line at 0, 1, 2 and 10; f = 1: each scores its nearest neighbour
    jac = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=F64)
    method = Krum(n_byzantine=1)
    assert method(jac).tolist() == [0.0]  # scores 1, 1, 1, 64: ties go to the first
    assert method.last_scores.tolist() == [1.0, 1.0, 1.0, 64.0]
    jac = torch.tensor([[0.0], [1.5], [2.0], [10.0]], dtype=F64)
    assert Krum(n_byzantine=1)(jac).tolist() == [1.5]  # scores 2.25, 0.25, 0.25, 64
    assert Krum(n_byzantine=1, n_selected=3)(jac).tolist() == [pytest.approx(3.5 / 3)]
    jac = make_jacobian(3, 6, 4)
    torch.testing.assert_close(Krum(n_byzantine=0, n_selected=6)(jac), jac.mean(dim=0))


def test_krum_permutation_equivariance_and_scale_invariance() -> None:
    jac = make_jacobian(7, 7, 5)
    method = Krum(n_byzantine=2, n_selected=2)
    d = method(jac)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(method(jac[perm]), d, rtol=0, atol=1e-14)
    torch.testing.assert_close(method(1e-5 * jac), 1e-5 * d, rtol=1e-12, atol=0)


def test_krum_arguments_and_errors() -> None:
    assert methods.get("krum").hparams() == {
        "n_byzantine": 1,
        "n_selected": 1,
        "score": "squared",
    }
    for bad in ({"n_byzantine": -1}, {"n_selected": 0}, {"n_selected": 1.5}, {"score": "l1"}):
        with pytest.raises(ConfigError):
            methods.get("krum", **bad)
    with pytest.raises(ValueError, match="n_byzantine \\+ 3 = 5 tasks, got 4"):
        Krum(n_byzantine=2).weights(torch.eye(4))
    with pytest.raises(ValueError, match="n_selected=5"):
        Krum(n_byzantine=0, n_selected=5).weights(torch.eye(4))
    gram = torch.eye(4)
    gram[0, 0] = math.nan
    with pytest.raises(NonFiniteError):
        Krum().weights(gram)
    w = Krum(n_byzantine=0).weights(torch.eye(4, dtype=torch.float32))
    assert w.dtype == torch.float32


def test_krum_engine_routes() -> None:
    check_engine_routes(lambda: Krum(n_byzantine=1, n_selected=2), num_tasks=4)
