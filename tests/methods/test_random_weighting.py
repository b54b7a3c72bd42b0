"""Random loss weighting: weights on the simplex with the paper's distributions (statistical
tests with fixed seeds against exact distributions or independent Monte Carlo estimates)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from loss_checks import check_loss_engine_routes, check_reset, check_round_trip, random_events
from scipy import stats

from mtlkit import methods
from mtlkit.errors import ConfigError
from mtlkit.methods import RLW
from mtlkit.methods.random_weighting import DISTRIBUTIONS

F64 = torch.float64
P_MIN = 1e-3  # fixed seeds: these tests are deterministic; the threshold guards against a wrong law


def draws(method: RLW, count: int) -> np.ndarray:
    return torch.stack([method.draw() for _ in range(count)]).numpy()


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_weights_are_on_the_simplex(distribution, m):
    method = RLW(distribution, generator=m, num_tasks=m)
    for dtype in (torch.float32, F64):
        for _ in range(20):
            w = method(torch.rand(m, dtype=dtype) + 0.1).weights
            assert w.dtype == dtype and w.shape == (m,) and not w.requires_grad
            assert bool((w >= 0).all())
            assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)


def test_normal_softmax_law():
    """softmax of N(0, I): log(w_1 / w_0) = λ̃_1 - λ̃_0 ~ N(0, 2) exactly; the mean and variance
    of each weight match an independent numpy Monte Carlo estimate."""
    w = draws(RLW("normal", generator=0, num_tasks=3), 4000)
    ks = stats.kstest(np.log(w[:, 1] / w[:, 0]), stats.norm(scale=np.sqrt(2)).cdf)
    assert ks.pvalue > P_MIN
    rng = np.random.default_rng(123)
    logits = rng.standard_normal((400_000, 3))
    reference = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    stderr = w.std(axis=0) / np.sqrt(len(w))
    assert np.all(np.abs(w.mean(axis=0) - reference.mean(axis=0)) < 5 * stderr)
    np.testing.assert_allclose(w.mean(axis=0), 1 / 3, atol=5 * stderr.max())
    np.testing.assert_allclose(w.var(axis=0), reference.var(axis=0), rtol=0.1)


def test_uniform_softmax_law():
    """softmax of U(0, 1)^m: log(w_1 / w_0) = U_1 - U_0, triangular on (-1, 1)."""
    w = draws(RLW("uniform", generator=1, num_tasks=4), 3000)
    triangular = stats.triang(c=0.5, loc=-1.0, scale=2.0)
    assert stats.kstest(np.log(w[:, 1] / w[:, 0]), triangular.cdf).pvalue > P_MIN
    assert stats.kstest(np.log(w[:, 0] / w[:, 1]), triangular.cdf).pvalue > P_MIN


def test_random_normal_law():
    """N(μ, diag σ²) with μ, σ ~ U(0, 1) drawn once: log(w_1 / w_0) ~ N(μ_1 - μ_0, σ_0² + σ_1²)."""
    method = RLW("random_normal", generator=2, num_tasks=3)
    mu, sigma = method.normal_mean, method.normal_std
    assert bool(((mu > 0) & (mu < 1) & (sigma > 0) & (sigma < 1)).all())
    assert mu.tolist() != sigma.tolist()
    w = draws(method, 3000)
    law = stats.norm(loc=float(mu[1] - mu[0]), scale=float((sigma[0] ** 2 + sigma[1] ** 2).sqrt()))
    assert stats.kstest(np.log(w[:, 1] / w[:, 0]), law.cdf).pvalue > P_MIN
    # μ, σ are fixed for the run: another RLW with the same seed draws the same ones.
    other = RLW("random_normal", generator=2, num_tasks=3)
    assert torch.equal(other.normal_mean, mu) and torch.equal(other.normal_std, sigma)


@pytest.mark.parametrize("m", [2, 4])
def test_dirichlet_law(m):
    """Dir(1, ..., 1): each weight is Beta(1, m - 1)."""
    w = draws(RLW("dirichlet", generator=3, num_tasks=m), 3000)
    for i in range(m):
        assert stats.kstest(w[:, i], stats.beta(1, m - 1).cdf).pvalue > P_MIN


def test_bernoulli_law():
    """Bernoulli(1/2) conditioned on a non-empty draw: each of the 2^m - 1 non-empty subsets
    equally likely, weights 1/|S| on the subset."""
    m = 3
    w = draws(RLW("bernoulli", generator=4, num_tasks=m), 3500)
    subsets = [s for k in range(1, m + 1) for s in itertools.combinations(range(m), k)]
    counts = dict.fromkeys(subsets, 0)
    for row in w:
        support = tuple(int(i) for i in np.nonzero(row)[0])
        np.testing.assert_allclose(row[list(support)], 1 / len(support), rtol=1e-15)
        counts[support] += 1
    assert stats.chisquare(list(counts.values())).pvalue > P_MIN


def test_constrained_bernoulli_law():
    """Exactly one task, uniformly drawn, gets weight 1."""
    w = draws(RLW("constrained_bernoulli", generator=5, num_tasks=4), 2000)
    assert set(np.unique(w).tolist()) == {0.0, 1.0} and np.all(w.sum(axis=1) == 1)
    assert stats.chisquare(w.sum(axis=0)).pvalue > P_MIN


def test_seed_reproducibility_and_reset():
    a, b = RLW(generator=7), RLW(generator=7)
    losses = torch.tensor([1.0, 2.0, 3.0])
    first = [a(losses).weights for _ in range(5)]
    assert all(torch.equal(x, b(losses).weights) for x in first)
    assert not torch.equal(first[0], first[1])
    a.reset()
    assert all(torch.equal(x, a(losses).weights) for x in first)
    g = torch.Generator().manual_seed(7)
    c = RLW(generator=g)
    assert torch.equal(c(losses).weights, first[0])


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_state_round_trip_and_reset(distribution):
    events = random_events(0, 4, 5)

    def make():
        return RLW(distribution, generator=11)

    check_round_trip(make, events, random_events(1, 4, 5))
    check_reset(make, events, 4)


def test_arguments():
    with pytest.raises(ValueError, match="distribution must be one of normal"):
        RLW("gaussian")
    with pytest.raises(ConfigError, match="'rlw'"):
        methods.get("rlw", distribution="gaussian")
    method = methods.get("rlw", distribution="dirichlet", generator=3)
    assert isinstance(method, RLW)
    assert repr(method) == "RLW(distribution='dirichlet', generator=3)"
    with pytest.raises(RuntimeError, match="setup"):
        RLW().draw()


@pytest.mark.parametrize("distribution", ["normal", "bernoulli"])
def test_through_the_engine(distribution):
    check_loss_engine_routes(lambda: RLW(distribution, generator=5))
