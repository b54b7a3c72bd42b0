"""NGDiff: normalized gradient difference, and its GeN learning-rate factor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import check_engine_routes, make_jacobian
from torch import nn

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.base import StepProbe
from mtlkit.methods.ngdiff import NGDiff

F64 = torch.float64


def test_closed_form() -> None:
    jac = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=F64)
    decision = NGDiff().aggregate(jac)
    assert torch.allclose(decision.direction, torch.tensor([1.0, -1.0], dtype=F64))
    assert torch.allclose(decision.weights, torch.tensor([1 / 3, -1 / 4], dtype=F64))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 8),
    kind=st.sampled_from(["generic", "huge", "tiny", "opposite", "duplicate"]),
)
def test_projections_on_the_normalised_gradients(seed: int, n: int, kind: str) -> None:
    """d · ĝ_R = 1 - cos ≥ 0 and d · ĝ_F = cos - 1 ≤ 0: descent on L_R, ascent on L_F."""
    jac = make_jacobian(seed, 2, n, kind)
    d = NGDiff()(jac)
    units = jac / jac.norm(dim=1, keepdim=True)
    cosine = units[0] @ units[1]
    assert torch.allclose(units @ d, torch.stack([1 - cosine, cosine - 1]), atol=1e-12)
    assert float(units[0] @ d) >= -1e-12 and float(units[1] @ d) <= 1e-12


def test_invariant_to_loss_scales_and_zero_gradient() -> None:
    jac = make_jacobian(1, 2, 5)
    d = NGDiff()(jac)
    assert torch.allclose(NGDiff()(jac * torch.tensor([[1e4], [1e-3]], dtype=F64)), d)
    jac[1] = 0
    assert torch.allclose(NGDiff()(jac), jac[0] / jac[0].norm())


class Quadratic(nn.Module):
    """L_R = ½ |A θ - b|² (exactly quadratic), L_F = |θ - c|²·0.1 + θ₀ (any smooth loss)."""

    def __init__(self, concave: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.theta = nn.Parameter(torch.randn(4, generator=gen, dtype=F64))
        self.a = torch.randn(6, 4, generator=gen, dtype=F64)
        self.b = torch.randn(6, generator=gen, dtype=F64)
        self.c = torch.randn(4, generator=gen, dtype=F64)
        self.sign = -1.0 if concave else 1.0

    def forward(self, batch: object) -> torch.Tensor:
        retain = self.sign * 0.5 * (self.a @ self.theta - self.b).square().sum()
        forget = 0.1 * (self.theta - self.c).square().sum() + self.theta[0]
        return torch.stack([retain, forget])


def probe_for(model: Quadratic, learning_rate: float) -> StepProbe:
    return StepProbe(
        batch=None,
        extra=[],
        parameters=[model.theta],
        learning_rate=learning_rate,
        compute=model,
    )


def test_gen_factor_is_the_exact_newton_step_on_a_quadratic_retain_loss() -> None:
    model = Quadratic()
    method = NGDiff(adaptive_lr=True)
    assert method.needs_probe and not NGDiff().needs_probe
    theta = model.theta.detach().clone()
    losses = model(None)
    g_r, g_f = (torch.autograd.grad(loss, model.theta, retain_graph=True)[0] for loss in losses)
    d = g_r / g_r.norm() - g_f / g_f.norm()
    optimum = float(g_r @ d / (d @ model.a.T @ model.a @ d))  # argmin_η L_R(θ - η d)
    method.prepare(probe_for(model, learning_rate=0.01))
    assert torch.equal(model.theta.detach(), theta)  # parameters restored exactly
    assert float(method.scale) == pytest.approx(optimum / 0.01, rel=1e-8)
    # the factor scales the direction (and the weights)
    jac = torch.stack([g_r, g_f])
    assert torch.allclose(method(jac), method.scale * d, atol=1e-12)
    # an SGD step lr · s · d lands on the minimiser of L_R along d
    step = theta - 0.01 * method(jac)
    along = [
        float(model.sign * 0.5 * (model.a @ (theta - t * d) - model.b).square().sum())
        for t in (optimum * 0.99, optimum, optimum * 1.01)
    ]
    assert along[1] <= min(along[0], along[2])
    assert torch.allclose(step, theta - optimum * d)
    # a second probe starts from the previous effective step; still exact on a quadratic
    method.prepare(probe_for(model, learning_rate=0.05))
    assert float(method.scale) == pytest.approx(optimum / 0.05, rel=1e-8)


def test_no_positive_curvature_keeps_the_factor_loudly() -> None:
    model = Quadratic(concave=True)
    method = NGDiff(adaptive_lr=True)
    with pytest.warns(RuntimeWarning, match="no positive step"):
        method.prepare(probe_for(model, learning_rate=0.01))
    assert float(method.scale) == 1.0 and method.skipped == 1
    method.reset()
    assert method.skipped == 0


def test_update_scale_from_three_losses() -> None:
    method = NGDiff(adaptive_lr=True)
    # L(θ + t d) = 5 + 2t + 3t²: η* = 2/6 for the step θ - η d
    method.update_scale(5.0, 5 + 2 * 0.1 + 3 * 0.01, 5 - 2 * 0.1 + 3 * 0.01, 0.1, 0.5)
    assert float(method.scale) == pytest.approx((1 / 3) / 0.5)


def test_state_dict_and_prepare_without_adaptive_lr() -> None:
    method = NGDiff(adaptive_lr=True)
    method.update_scale(5.0, 5.23, 4.83, 0.1, 0.5)
    fresh = NGDiff(adaptive_lr=True)
    fresh.load_state_dict(method.state_dict())
    assert float(fresh.scale) == float(method.scale)
    model = Quadratic()
    plain = NGDiff()
    plain.prepare(probe_for(model, 0.1))  # no-op
    assert float(plain.scale) == 1.0


def test_errors_and_registry() -> None:
    method = methods.get("ngdiff", adaptive_lr=True)
    assert isinstance(method, NGDiff) and method.hparams() == {"adaptive_lr": True}
    with pytest.raises(ValueError, match="exactly two objectives"):
        NGDiff()(make_jacobian(0, 3, 4))
    with pytest.raises(ValueError, match="exactly two objectives"):
        NGDiff()(make_jacobian(0, 1, 4))
    with pytest.raises(NonFiniteError):
        NGDiff()(torch.tensor([[float("nan"), 1.0], [1.0, 0.0]], dtype=F64))
    with pytest.raises(ConfigError):
        methods.get("ngdiff", lr=0.1)


def test_engine_routes() -> None:
    check_engine_routes(NGDiff, num_tasks=2)
