"""FAMO: log-loss weighting updated after each step from the decrease of the log losses."""

from __future__ import annotations

import copy
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
    saved_and_loaded,
)
from torch import nn

from mtlkit import Joint, methods
from mtlkit.engine.backward import method_backward
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods import FAMO
from mtlkit.training.forward import ForwardResult
from mtlkit.training.optim import optimizer
from mtlkit.training.strategies import StrategyContext

F64 = torch.float64


class Quadratic(nn.Module):
    """One shared scalar θ; task a: (θ - 1)², task b: 4 (θ + 1)²."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=F64))

    def shared_parameters(self):
        return iter([self.theta])

    def task_parameters(self, task):
        return iter([])

    def losses(self) -> list[torch.Tensor]:
        return [(self.theta - 1) ** 2, 4 * (self.theta + 1) ** 2]


def by_hand(theta: float, steps: int, eta: float, lr=0.025, decay=1e-3, eps=0.0):
    """FAMO on the quadratic in plain Python floats, from the paper's equations: the weights
    (z_i / L_i) / Σ (z_j / L_j), an SGD step on θ, δ = log L - log L', g = (diag z - z zᵀ) δ
    + γ ξ, and Adam (β = 0.9, 0.999, ε = 1e-8) on ξ. Returns the weights and logits per step."""
    xi, m1, m2 = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    history = []

    def losses(t):
        return [(t - 1) ** 2, 4 * (t + 1) ** 2]

    for k in range(1, steps + 1):
        e = [math.exp(x) for x in xi]
        z = [v / sum(e) for v in e]
        before = losses(theta)
        ratio = [z[i] / (before[i] + eps) for i in range(2)]
        w = [r / sum(ratio) for r in ratio]
        theta -= eta * (w[0] * 2 * (theta - 1) + w[1] * 8 * (theta + 1))
        after = losses(theta)
        delta = [math.log(before[i] + eps) - math.log(after[i] + eps) for i in range(2)]
        zd = z[0] * delta[0] + z[1] * delta[1]
        g = [z[i] * (delta[i] - zd) + decay * xi[i] for i in range(2)]
        m1 = [0.9 * m1[i] + 0.1 * g[i] for i in range(2)]
        m2 = [0.999 * m2[i] + 0.001 * g[i] ** 2 for i in range(2)]
        xi = [
            xi[i] - lr * (m1[i] / (1 - 0.9**k)) / (math.sqrt(m2[i] / (1 - 0.999**k)) + 1e-8)
            for i in range(2)
        ]
        history.append((w, list(xi), theta))
    return history


def test_first_step_on_a_two_task_quadratic_by_hand():
    """θ = 0.5: L = (1/4, 9), z = (1/2, 1/2), w = (36/37, 1/37); the SGD step (η = 0.1) gives
    dθ = 2.4/37, task a improves and task b worsens, so g = (1/4)(δ_a - δ_b)(1, -1) with
    δ_a > 0 > δ_b, and Adam's first step moves ξ by -lr · sign(g) = (-0.025, +0.025)."""
    model = Quadratic(0.5)
    method = FAMO(eps=0.0, num_tasks=2).double()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = method_backward(model.losses(), method=method).weights  # after_step by hand below
    torch.testing.assert_close(
        weights, torch.tensor([36 / 37, 1 / 37], dtype=F64), rtol=1e-15, atol=0
    )
    torch.testing.assert_close(
        model.theta.grad, torch.tensor(-24 / 37, dtype=F64), rtol=1e-15, atol=0
    )
    sgd.step()
    assert float(model.theta.detach()) == pytest.approx(0.5 + 2.4 / 37, rel=1e-15)
    with torch.no_grad():
        method.after_step(torch.stack(model.losses()))
    g = 0.25 * (
        math.log(0.25 / (0.5 + 2.4 / 37 - 1) ** 2) - math.log(9 / (4 * (1.5 + 2.4 / 37) ** 2))
    )
    assert g > 0
    step = 0.025 * g / (g + 1e-8)  # Adam's bias-corrected first step: lr · g / (|g| + ε)
    torch.testing.assert_close(
        method.logits, torch.tensor([-step, step], dtype=F64), rtol=1e-13, atol=0
    )
    z = torch.softmax(torch.tensor([-step, step], dtype=F64), dim=0)
    assert z[0] < 0.5 < z[1]  # the task that improved is down-weighted


def test_many_steps_match_the_hand_computation_through_the_joint_strategy():
    """Joint recomputes the losses after the step (needs_losses_after) and calls after_step."""
    model = Quadratic(0.5)
    method = FAMO(eps=0.0, num_tasks=2).double()
    strategy = Joint(method)
    strategy.setup(StrategyContext(model, ["a", "b"], optimizer("sgd", lr=0.05, momentum=0)))

    def compute_losses(batch):
        a, b = model.losses()
        return ForwardResult({"a": a, "b": b})

    expected = by_hand(0.5, steps=25, eta=0.05)
    for k, (w, xi, theta) in enumerate(expected):
        report = strategy.step(None, compute_losses, k)
        assert report.weights["a"] == pytest.approx(w[0], rel=1e-12)
        assert report.weights["b"] == pytest.approx(w[1], rel=1e-12)
        assert float(model.theta.detach()) == pytest.approx(theta, rel=1e-12)
        torch.testing.assert_close(
            method.logits, torch.tensor(xi, dtype=F64), rtol=1e-12, atol=1e-15
        )
    assert not bool(method.has_previous)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(-5.0, 5.0))
def test_weights_are_the_gradient_of_the_official_objective(m, seed, shift):
    """The official step is on Σ z_i log D_i / c with c = Σ z_i / D_i held constant; its
    gradient w.r.t. the losses is the returned weights, which lie on the simplex."""
    gen = torch.Generator().manual_seed(seed)
    method = FAMO(min_loss=shift, num_tasks=m).double()
    method.logits.copy_(torch.randn(m, generator=gen, dtype=F64))
    values = shift + torch.exp(2 * torch.randn(m, generator=gen, dtype=F64))
    weights = method(values).weights
    z = torch.softmax(method.logits, dim=0)
    leaf = values.clone().requires_grad_(True)
    gaps = leaf - shift + 1e-8
    c = (z / gaps).sum().detach()
    expected = torch.autograd.grad((z * gaps.log() / c).sum(), leaf)[0]
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-12) and bool((weights > 0).all())


def test_losses_below_zero_with_a_known_lower_bound():
    """A loss that can be negative (e.g. a log-likelihood bounded below by -3): with
    min_loss=-3 FAMO works on log(L + 3); at or below the bound it refuses."""
    method = FAMO(min_loss=-3.0)
    w = method(torch.tensor([-2.0, 1.0], dtype=F64)).weights
    torch.testing.assert_close(
        w, torch.tensor([0.8, 0.2], dtype=F64), rtol=1e-7, atol=0
    )  # ∝ 1/1, 1/4
    method.after_step(torch.tensor([-2.5, 1.0], dtype=F64))
    assert bool(torch.isfinite(method.logits).all()) and method.logits[0] < 0
    with pytest.raises(ConfigError, match=r"loss > -3; task 0 has loss -3"):
        method(torch.tensor([-3.0, 1.0], dtype=F64))
    method(torch.tensor([-2.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"task 1 has loss -4.*min_loss"):
        method.after_step(torch.tensor([-2.0, -4.0], dtype=F64))
    with pytest.raises(ConfigError, match="task 0 has loss 0"):
        FAMO()(torch.tensor([0.0, 1.0]))
    per_task = FAMO(min_loss=[0.0, -10.0])
    torch.testing.assert_close(
        per_task(torch.tensor([0.5, -9.5])).weights, torch.tensor([0.5, 0.5])
    )
    with pytest.raises(ValueError, match="2 min_loss values for 3 tasks"):
        FAMO(min_loss=[0.0, -10.0]).setup(3)


def test_hook_contract():
    method = FAMO()
    assert method.needs_losses_after and list(method.parameters()) == []
    with pytest.raises(RuntimeError, match="forward"):
        method.after_step(torch.ones(2))
    method(torch.tensor([1.0, 2.0]))
    assert list(method.parameters()) == []  # the logits are not the model optimizer's
    with pytest.raises(ValueError, match="after_step\\(losses_after\\)"):
        method.after_step(None)
    with pytest.raises(ValueError, match="set up for 2 tasks, got 3"):
        method.after_step(torch.ones(3))
    with pytest.raises(NonFiniteError, match="task 1"):
        method.after_step(torch.tensor([1.0, math.nan]))
    method.after_step(torch.tensor([0.5, 2.0]))
    with pytest.raises(RuntimeError, match="forward"):
        method.after_step(torch.tensor([0.5, 2.0]))  # one update per forward


def test_arguments():
    for kwargs in (
        {"lr": 0.0},
        {"lr": -1.0},
        {"weight_decay": -1e-3},
        {"eps": math.nan},
        {"min_loss": math.inf},
        {"min_loss": []},
    ):
        with pytest.raises(ValueError):
            FAMO(**kwargs)
        with pytest.raises(ConfigError, match="'famo'"):
            methods.get("famo", **kwargs)
    method = methods.get("famo", lr=0.01, weight_decay=0.0)
    assert isinstance(method, FAMO)
    assert repr(method) == "FAMO(lr=0.01, weight_decay=0.0, min_loss=0.0, eps=1e-08)"
    default = FAMO(num_tasks=3)
    group = default._optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.025, 1e-3)


def test_state_round_trip_keeps_the_adam_state():
    events = random_events(0, 3, 6, after=True)
    future = random_events(1, 3, 6, after=True)
    check_round_trip(FAMO, events, future)
    check_round_trip(FAMO, events[:-1], future[1:])  # saved between forward and after_step
    check_reset(FAMO, events, 3)
    # Without the Adam moments the restored method would take different steps.
    method = FAMO()
    drive(method, events)
    state = method.state_dict()
    state["_extra_state"]["optimizer"]["state"] = {}
    bare = FAMO()
    bare.load_state_dict(saved_and_loaded(state))
    assert not torch.equal(torch.stack(drive(bare, future)), torch.stack(drive(method, future)))


def test_casting_and_copying_keep_the_optimizer_on_the_logits():
    events = random_events(2, 2, 4, after=True)
    method = FAMO()
    drive(method, events)
    twin = copy.deepcopy(method).double()
    assert twin.logits.dtype == F64 and twin._optimizer.param_groups[0]["params"][0] is twin.logits
    assert twin._optimizer.state[twin.logits]["exp_avg"].dtype == F64
    future = random_events(3, 2, 4, after=True)
    a, b = drive(method, future), drive(twin, future)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)  # float32 vs float64 logits
    assert not torch.equal(method.logits, torch.zeros(2))


def test_through_the_engine():
    def make():
        method = FAMO()
        drive(method, random_events(4, 3, 5, after=True))
        return method

    check_loss_engine_routes(make)
