"""Smoothed / CR-MOGM: an exponential moving average of an inner Gramian weighting's weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import check_engine_routes, jacobians, make_jacobian
from torch import Tensor

from mtlkit import methods
from mtlkit.errors import ConfigError, UnknownNameError
from mtlkit.methods import CRMOGM, MGDA, GramianWeighting, Mean, PCGrad, Smoothed

F64 = torch.float64


class Scripted(GramianWeighting):
    """Returns the weights of a fixed script, one row per call."""

    def __init__(self, script: Tensor) -> None:
        super().__init__()
        self.script = script
        self.calls = 0

    def reset(self) -> None:
        super().reset()
        self.calls = 0

    def get_extra_state(self) -> int:
        return self.calls

    def set_extra_state(self, state: int) -> None:
        self.calls = state

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        row = self.script[self.calls]
        self.calls += 1
        return row.to(gramian.dtype)


def closed_form(script: Tensor, beta: float, k: int, init: str) -> Tensor:
    """λ_k as an explicit sum over the script (rows 0..k-1), not a recursion."""
    m = script.shape[1]
    if init == "first":
        total = beta ** (k - 1) * script[0]
        terms = range(1, k)
    else:
        total = beta**k * torch.full((m,), 1.0 / m, dtype=F64)
        terms = range(k)
    for j in terms:
        total = total + (1 - beta) * beta ** (k - 1 - j) * script[j]
    return total


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 6),
    st.floats(0.0, 0.99),
    st.sampled_from(["first", "uniform"]),
    st.integers(0, 2**31 - 1),
)
def test_ema_formula_is_exact_on_a_fixed_sequence(m: int, beta: float, init: str, seed: int):
    script = torch.randn(12, m, generator=torch.Generator().manual_seed(seed), dtype=F64)
    method = Smoothed(Scripted(script), beta=beta, init=init)
    gram = torch.eye(m, dtype=F64)
    for k in range(1, 13):
        w = method.weights(gram)
        torch.testing.assert_close(w, closed_form(script, beta, k, init), rtol=1e-12, atol=1e-13)
        assert torch.equal(method.smoothed, w) and method.steps == k


@settings(max_examples=30, deadline=None)
@given(jacobians(min_m=2, max_m=6))
def test_beta_zero_is_the_inner_method(jac: Tensor) -> None:
    smoothed, plain = Smoothed("mgda", beta=0.0), MGDA()
    got, expected = smoothed.aggregate(jac), plain.aggregate(jac)
    assert torch.equal(got.direction, expected.direction)
    assert torch.equal(got.weights, expected.weights)


def test_fixed_inner_weights_are_left_unchanged() -> None:
    jac = make_jacobian(0, 4, 5)
    method = Smoothed(Mean(), beta=0.9)
    for _ in range(5):
        torch.testing.assert_close(method(jac), jac.mean(dim=0), rtol=1e-15, atol=1e-15)


def test_direction_is_smoothed_weights_times_jacobian_and_lags_behind() -> None:
    j1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)  # MGDA: (1/2, 1/2)
    j2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)  # MGDA: (4/5, 1/5)
    method = Smoothed(MGDA(), beta=0.5)
    method(j1)
    decision = method.aggregate(j2)
    expected = torch.tensor([0.65, 0.35], dtype=F64)
    torch.testing.assert_close(decision.weights, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(decision.direction, expected @ j2, rtol=0, atol=1e-12)
    uniform = Smoothed(MGDA(), beta=0.5, init="uniform").aggregate(j2)
    torch.testing.assert_close(uniform.weights, torch.tensor([0.65, 0.35], dtype=F64))


def test_state_dict_round_trip_with_a_stochastic_inner_method() -> None:
    jacs = [make_jacobian(s, 4, 3, "opposite") for s in range(8)]
    method = methods.get("cr_mogm", inner="pcgrad", inner_args={"generator": 3}, beta=0.7)
    assert isinstance(method, CRMOGM) and isinstance(method.inner, PCGrad)
    for jac in jacs[:4]:
        method(jac)
    state = method.state_dict()
    assert {"_extra_state", "inner._extra_state"} <= set(state)
    after = [method(jac) for jac in jacs[4:]]
    other = methods.get("cr_mogm", inner="pcgrad", inner_args={"generator": 99}, beta=0.7)
    other.load_state_dict(state)
    assert other.steps == 4
    assert all(torch.equal(d, other(jac)) for d, jac in zip(after, jacs[4:]))


def test_reset_restarts_the_average_and_the_inner_method() -> None:
    jacs = [make_jacobian(s, 3, 4) for s in range(5)]
    method = Smoothed(PCGrad(generator=1), beta=0.8)
    first = [method(jac) for jac in jacs]
    method.reset()
    assert method.smoothed is None and method.steps == 0
    assert all(torch.equal(d, method(jac)) for d, jac in zip(first, jacs))


def test_arguments_registry_and_errors() -> None:
    method = methods.get("smoothed")
    assert type(method) is Smoothed and isinstance(method.inner, MGDA)
    assert method.hparams() == {"inner": "mgda", "beta": 0.9, "inner_args": None, "init": "first"}
    assert methods.get("cr_mogm", inner="mgda", inner_args={"normalization": "l2"}).hparams() == {
        "inner": "mgda",
        "beta": 0.9,
        "inner_args": {"normalization": "l2"},
        "init": "first",
    }
    assert methods.get("smoothed", inner="mgda", inner_args={"normalization": "loss"}).needs_losses
    with pytest.raises(ConfigError, match="Gramian weighting"):
        methods.get("smoothed", inner="ew")
    with pytest.raises(ConfigError, match="Gramian weighting"):
        methods.get("smoothed", inner="trimmed_mean")
    with pytest.raises(UnknownNameError):
        methods.get("smoothed", inner="nope")
    for bad in ({"beta": 1.0}, {"beta": -0.1}, {"init": "zero"}):
        with pytest.raises(ConfigError):
            methods.get("smoothed", **bad)
    with pytest.raises(ValueError, match="inner_args"):
        Smoothed(MGDA(), inner_args={"tol": 1e-9})
    method = Smoothed(MGDA())
    method.weights(torch.eye(3))
    with pytest.raises(ValueError, match="3 tasks, got 2"):
        method.weights(torch.eye(2))


def test_dtype_follows_the_gramian() -> None:
    jac = make_jacobian(2, 3, 4).float()
    method = Smoothed(MGDA(), beta=0.5)
    assert method.weights(jac @ jac.T).dtype == torch.float32
    assert method.smoothed.dtype == F64


def test_hooks_are_forwarded_to_the_inner_method() -> None:
    calls = []

    class Recorder(Mean):
        def setup(self, num_tasks: int) -> None:
            calls.append(("setup", num_tasks))

        def before_step(self, step: int) -> None:
            calls.append(("before", step))

        def on_epoch_end(self, epoch: int) -> None:
            calls.append(("epoch", epoch))

    method = Smoothed(Recorder())
    method.setup(3)
    method.before_step(4)
    method.on_epoch_end(1)
    assert calls == [("setup", 3), ("before", 4), ("epoch", 1)]


@pytest.mark.parametrize("inner", ["mgda", "pcgrad"])
def test_engine_routes(inner: str) -> None:
    args = {"generator": 0} if inner == "pcgrad" else {}
    check_engine_routes(lambda: Smoothed(inner, beta=0.5, inner_args=args))
