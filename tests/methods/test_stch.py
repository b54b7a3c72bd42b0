"""Smooth Tchebycheff scalarisation: warm-up, nadir estimate, closed-form weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_checks import (
    check_loss_engine_routes,
    check_reset,
    check_round_trip,
    drive,
    random_events,
)

from mtlkit import methods
from mtlkit.errors import ConfigError
from mtlkit.methods import STCH
from mtlkit.methods.stch import stch_weights

F64 = torch.float64
EPOCH = ("epoch",)


def losses(*values: float) -> tuple:
    return ("loss", torch.tensor(values, dtype=F64))


def objective(L: torch.Tensor, nadir: torch.Tensor, mu: float) -> torch.Tensor:
    """The authors' MTL objective: m μ log Σ exp(log(L_i / z_i) / μ)."""
    return L.numel() * mu * torch.logsumexp((L / nadir).log() / mu, dim=0)


def test_phases_and_closed_form_weights():
    """Warm-up epoch: weights 1/L. Estimation epoch: weights 1/L and z = mean losses = (2, 4).
    Then at L = (1, 4): f = (log 1/2, 0), softmax(f) = (1/3, 2/3), w = 2 (1/3, 2/3) / (1, 4)."""
    events = [
        losses(2.0, 8.0), EPOCH,  # warm-up (warmup_epochs=1)
        losses(1.0, 2.0), losses(3.0, 6.0), EPOCH,  # nadir z = (2, 4)
        losses(1.0, 4.0), losses(2.0, 4.0),
    ]  # fmt: skip
    method = STCH(mu=1.0, warmup_epochs=1)
    assert method.phase == "warmup"
    weights = drive(method, events)
    assert weights[0].tolist() == [0.5, 0.125]
    assert weights[1].tolist() == [1.0, 0.5] and weights[2].tolist() == [1 / 3, 1 / 6]
    assert method.phase == "stch"
    assert method.nadir.tolist() == [2.0, 4.0]
    torch.testing.assert_close(
        weights[3], torch.tensor([2 / 3, 1 / 3], dtype=F64), rtol=1e-15, atol=0
    )
    # At the nadir itself every task weighs the same in f: w = (2 · 1/2) / L.
    torch.testing.assert_close(
        weights[4], torch.tensor([1 / 2, 1 / 4], dtype=F64), rtol=1e-15, atol=0
    )
    method.on_epoch_end(3)
    assert int(method.epochs) == 3 and method.nadir.tolist() == [2.0, 4.0]  # z stays fixed


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.floats(0.05, 5.0),
    st.integers(0, 2**31 - 1),
    st.sampled_from([torch.float32, F64]),
)
def test_weights_are_the_gradient_of_the_objective(m, mu, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    values = torch.exp(3 * torch.randn(m, generator=gen, dtype=F64))
    nadir = torch.exp(3 * torch.randn(m, generator=gen, dtype=F64))
    leaf = values.clone().requires_grad_(True)
    expected = torch.autograd.grad(objective(leaf, nadir, mu), leaf)[0]
    torch.testing.assert_close(stch_weights(values, nadir, mu), expected, rtol=1e-12, atol=0)
    method = STCH(mu=mu, warmup_epochs=0, num_tasks=m)
    method.epochs.fill_(1)
    method.nadir.copy_(nadir)
    w = method(values.to(dtype)).weights
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert w.dtype == dtype
    reference = stch_weights(values.to(dtype).to(F64), nadir, mu)
    atol = 1e-30 if dtype == F64 else 1e-37  # weights below the dtype's range round to 0
    torch.testing.assert_close(w.to(F64), reference, rtol=tol, atol=atol)


def test_small_mu_concentrates_on_the_worst_task():
    nadir = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    values = torch.tensor([2.0, 3.0, 2.5], dtype=F64)  # task 1 is the farthest above its nadir
    w = stch_weights(values, nadir, 0.01)
    assert w[1] == pytest.approx(3 / 3.0, rel=1e-7)  # m · 1 / L_1, up to (2.5 / 3)^100
    assert float(w[0]) < 1e-15 and float(w[2]) < 1e-7
    # Large μ: softmax → uniform, weights → 1 / L (the warm-up objective).
    w = stch_weights(values, nadir, 1e6)
    torch.testing.assert_close(w, 1 / values, rtol=1e-5, atol=0)


def test_default_warmup_is_the_authors():
    method = methods.get("stch")
    assert isinstance(method, STCH) and (method.mu, method.warmup_epochs) == (1.0, 4)
    events = [losses(1.0, 2.0), EPOCH] * 4 + [losses(2.0, 2.0), EPOCH]
    drive(method, events)
    assert method.phase == "stch" and method.nadir.tolist() == [2.0, 2.0]


def test_arguments_and_inputs():
    for kwargs in ({"mu": 0.0}, {"mu": math.inf}, {"warmup_epochs": -1}, {"warmup_epochs": 1.5}):
        with pytest.raises(ValueError):
            STCH(**kwargs)
        with pytest.raises(ConfigError, match="'stch'"):
            methods.get("stch", **kwargs)
    method = STCH(warmup_epochs=0)
    with pytest.raises(ConfigError, match="task 1 has loss 0"):
        method(torch.tensor([1.0, 0.0]))
    method(torch.tensor([1.0, 2.0]))
    method.on_epoch_end(0)
    with pytest.warns(RuntimeWarning, match="no losses"):
        method.on_epoch_end(1)
    assert method.phase == "stch" and method.nadir.tolist() == [1.0, 2.0]
    assert repr(method) == "STCH(mu=1.0, warmup_epochs=0, preference=None)"


def test_state_round_trip_and_reset():
    events = random_events(0, 3, 9, epoch_every=2)
    future = random_events(1, 3, 4, epoch_every=3)

    def make():
        return STCH(mu=0.5, warmup_epochs=1)

    check_round_trip(make, events[:3], events[3:] + future)  # saved during the warm-up
    check_round_trip(make, events, future)  # saved during STCH
    check_reset(make, events, 3)


@pytest.mark.parametrize("epochs", [0, 1, 3])
def test_through_the_engine(epochs):
    """In the warm-up, the estimation epoch and STCH."""

    def make():
        method = STCH(mu=0.7, warmup_epochs=1)
        drive(method, random_events(2, 3, 2 * epochs, epoch_every=2))
        return method

    check_loss_engine_routes(make)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.floats(0.05, 5.0), st.integers(0, 2**31 - 1))
def test_preference_weights_are_the_gradient_of_the_weighted_objective(m, mu, seed):
    """F = m μ logsumexp(λ ⊙ f / μ), λ = m p: the paper's weighted smooth Tchebycheff."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.exp(torch.randn(m, generator=gen, dtype=F64))
    nadir = torch.exp(torch.randn(m, generator=gen, dtype=F64))
    p = torch.rand(m, generator=gen, dtype=F64) + 0.1
    p = p / p.sum()
    leaf = values.clone().requires_grad_(True)
    F = m * mu * torch.logsumexp(m * p * (leaf / nadir).log() / mu, dim=0)
    expected = torch.autograd.grad(F, leaf)[0]
    torch.testing.assert_close(stch_weights(values, nadir, mu, p), expected, rtol=1e-12, atol=0)
    method = STCH(mu=mu, warmup_epochs=0, num_tasks=m, preference=(3 * p).tolist())
    method.epochs.fill_(1)
    method.nadir.copy_(nadir)
    torch.testing.assert_close(method(values).weights, expected, rtol=1e-12, atol=0)


def test_uniform_preference_is_the_authors_objective_and_small_mu_follows_the_preference():
    values, nadir = torch.tensor([2.0, 3.0], dtype=F64), torch.ones(2, dtype=F64)
    plain = stch_weights(values, nadir, 0.5)
    uniform = stch_weights(values, nadir, 0.5, torch.tensor([0.5, 0.5], dtype=F64))
    torch.testing.assert_close(uniform, plain, rtol=1e-15, atol=0)
    # f = (log 2, log 3); with p = (0.8, 0.2), λ ⊙ f = (1.11, 0.44): task 0 is the active one.
    w = stch_weights(values, nadir, 0.01, torch.tensor([0.8, 0.2], dtype=F64))
    assert w[0] == pytest.approx(2 * 1.6 / 2.0, rel=1e-12) and float(w[1]) < 1e-20
    with pytest.raises(ValueError, match="preference of 3 entries"):
        STCH(preference=[1.0, 1.0, 1.0]).setup(2)
    with pytest.raises(ConfigError, match=r"'stch'.*preference"):
        methods.get("stch", preference=[1.0, -1.0])
