"""GradNorm: learnable task weights with their own gradient step on L_grad."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from method_checks import check_engine_routes, make_jacobian
from stateful_checks import check_route_steps, check_state_round_trip

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.gradnorm import GradNorm

F64 = torch.float64


def diagonal_jacobian(norms: list[float]) -> torch.Tensor:
    return torch.diag(torch.tensor(norms, dtype=F64))


def test_one_step_closed_form() -> None:
    """|g| = (1, 3), L = L(0): r = 1, targets Ḡ = 2; ∇_w L_grad = (-1, 3)."""
    method = GradNorm(alpha=1.5, lr=0.025)
    jac = diagonal_jacobian([1.0, 3.0])
    losses = torch.tensor([2.0, 0.5], dtype=F64)
    decision = method.aggregate(jac, losses)
    assert decision.weights.tolist() == [1.0, 1.0]  # w(0) is used for the step
    assert torch.equal(decision.direction, jac.sum(dim=0))
    updated = torch.tensor([1.025, 0.925], dtype=F64)
    assert torch.allclose(method.task_weights, 2 * updated / updated.sum(), atol=1e-15)
    assert torch.allclose(method.last_norms, torch.tensor([1.0, 3.0], dtype=F64))
    # the next step uses the updated weights
    assert torch.allclose(method.aggregate(jac, losses).weights, 2 * updated / updated.sum())


def test_training_rates_set_the_targets() -> None:
    """Equal norms; task 0's loss ratio is 4 times task 1's: r = (1.6, 0.4), targets
    Ḡ r^α; task 0 is below its target and gains weight."""
    method = GradNorm(alpha=1.0, lr=0.01)
    jac = diagonal_jacobian([1.0, 1.0])
    method(jac, torch.tensor([1.0, 1.0], dtype=F64))
    w = method.task_weights.clone()  # unchanged: equal norms, equal rates
    assert torch.allclose(w, torch.ones(2, dtype=F64))
    method(jac, torch.tensor([0.8, 0.2], dtype=F64))
    assert method.task_weights[0] > 1 > method.task_weights[1]


def frozen_target_gaps(
    weights: torch.Tensor, norms: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor, alpha
) -> torch.Tensor:
    """``T_i - w_i |g_i|`` with the targets ``T_i = Ḡ r_i^α`` of the paper, computed here."""
    scaled = weights * norms
    ratios = losses / initial
    return scaled.mean() * (ratios / ratios.mean()) ** alpha - scaled


def positive_lists(m: int, low: float, high: float) -> st.SearchStrategy[list[float]]:
    return st.lists(st.floats(low, high), min_size=m, max_size=m)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    m=st.integers(2, 4),
    alpha=st.floats(0.0, 3.0),
    lr=st.floats(1e-6, 1e-3),
)
def test_one_update_is_a_frozen_target_gradient_step_then_a_rescaling(data, m, alpha, lr) -> None:
    """What one GradNorm step guarantees, for any m, α and state.

    With the targets ``T_i = Ḡ r_i^α`` frozen at the current weights ``w`` (``Σ w = m``),
    ``L_grad(v) = Σ_i |v_i G_i - T_i|`` (``G_i = |g_i|``) has ``∂L_grad/∂v_i = -s_i G_i`` at
    ``v = w``, ``s_i = sign(T_i - w_i G_i)``. The update is ``v = w + lr s ⊙ G`` (for
    ``lr G_i² < |T_i - w_i G_i|`` no sign flips, so ``L_grad(v) = L_grad(w) - lr Σ G_i²``: a
    strict decrease), then ``w' = c v`` with ``c = m / Σ v > 0``. Hence (i) ``w' ∥ w + lr s ⊙ G``
    and ``Σ w' = m``; (ii) ``w'_i / w_i = c (1 + lr s_i G_i / w_i)``, so every task below its
    target gains relatively more weight than every task above its target (``> c > ``). It does
    NOT follow that ``w_i G_i / w_j G_j`` moves towards ``T_i / T_j``: if ``s_i = s_j`` the
    ratio's move is set by ``G_i / w_i`` vs ``G_j / w_j`` (see the regression test below).
    (i) fails for a wrong sign, for the weighted norm ``w_i G_i`` in the gradient, for targets
    from other norms, or without the rescaling.
    """
    norms = torch.tensor(data.draw(positive_lists(m, 0.1, 10.0)), dtype=F64)
    raw = torch.tensor(data.draw(positive_lists(m, 0.2, 5.0)), dtype=F64)
    initial = torch.tensor(data.draw(positive_lists(m, 0.1, 10.0)), dtype=F64)
    losses = initial * torch.tensor(data.draw(positive_lists(m, 0.2, 2.0)), dtype=F64)
    weights = m * raw / raw.sum()
    gaps = frozen_target_gaps(weights, norms, losses, initial, alpha)
    assume(bool((gaps.abs() > 1e-9 * float((weights * norms).mean())).all()))  # no ties
    method = GradNorm(alpha=alpha, lr=lr)
    method.task_weights = weights.clone()
    method.initial_losses = initial.clone()
    jac = diagonal_jacobian(norms.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lr G_i <= 1e-2 < min w_i: no clamping
        decision = method.aggregate(jac, losses)
    assert torch.equal(decision.weights, weights)  # w(t) is used, then updated
    assert torch.allclose(decision.direction, weights @ jac, rtol=1e-14, atol=0)
    updated = method.task_weights
    assert float(updated.sum()) == pytest.approx(m, abs=1e-12)
    stepped = weights + lr * torch.sign(gaps) * norms
    scale = updated / stepped
    assert torch.allclose(scale, torch.full_like(scale, m / float(stepped.sum())), rtol=1e-12)
    gains = updated / weights
    below, above = gaps > 0, gaps < 0
    if below.any() and above.any():
        assert float(gains[below].min()) > float(gains[above].max())


@settings(max_examples=50, deadline=None)
@given(
    norms=positive_lists(2, 0.1, 10.0),
    raw=positive_lists(2, 0.2, 5.0),
    ratios=positive_lists(2, 0.2, 2.0),
    alpha=st.one_of(st.just(1.0), st.floats(0.0, 3.0)),
)
def test_two_tasks_on_opposite_sides_move_the_norm_ratio_towards_its_target(
    norms, raw, ratios, alpha
) -> None:
    """Two tasks, task i below its target and j above (``s_i = +1 = -s_j``): then
    ``w_i G_i / w_j G_j < T_i / T_j = (r_i / r_j)^α`` and the ratio is multiplied by
    ``(1 + lr G_i / w_i) / (1 - lr G_j / w_j) > 1`` (the rescaling cancels in a ratio): it moves
    towards its target (passing it by less than this small move at most). For ``α = 1`` this
    is always the case: ``T_1 + T_2 = Ḡ (r_1 + r_2) = 2 Ḡ = w_1 G_1 + w_2 G_2``, so the gaps
    have opposite signs. (For ``α ≠ 1`` both gaps can share a sign; the ratio may move away.)"""
    g = torch.tensor(norms, dtype=F64)
    weights = 2 * torch.tensor(raw, dtype=F64) / sum(raw)
    losses = torch.tensor(ratios, dtype=F64)
    gaps = frozen_target_gaps(weights, g, losses, torch.ones(2, dtype=F64), alpha)
    assume(bool((gaps.abs() > 1e-9 * float((weights * g).mean())).all()))  # no ties
    if alpha == 1.0:
        assert float(gaps[0] * gaps[1]) < 0
    assume(float(gaps[0] * gaps[1]) < 0)
    method = GradNorm(alpha=alpha, lr=1e-4)
    method.task_weights = weights.clone()
    method.initial_losses = torch.ones(2, dtype=F64)
    method(diagonal_jacobian(norms), losses)
    after = method.task_weights
    target = (ratios[0] / ratios[1]) ** alpha
    ratio_before = float(weights[0] * g[0] / (weights[1] * g[1]))
    ratio_after = float(after[0] * g[0] / (after[1] * g[1]))
    assert (ratio_after - ratio_before) * (target - ratio_before) > 0
    signs = torch.sign(gaps)
    factor = (1 + 1e-4 * signs[0] * g[0] / weights[0]) / (1 + 1e-4 * signs[1] * g[1] / weights[1])
    assert ratio_after / ratio_before == pytest.approx(float(factor), rel=1e-12)


def test_found_case_both_below_target_moves_the_ratio_away() -> None:
    """Hypothesis' case norms (9, 1), loss ratios (2, 1), α = 3, lr = 1e-4 (after a first step
    at L = L(0)). r = (4/3, 2/3), mean r^3 = 4/3 > 1, so both tasks sit below their targets
    ``Ḡ r^3 ≈ (11.85, 1.48)``; the step adds ``lr (9, 1)`` to both weights, which raises
    ``9 w_1 / w_2`` from 8.9910 to 8.9982 although its target is 2^3 = 8. This is GradNorm's
    rule: L_grad at the frozen targets still drops by ``lr (9² + 1²)``, and LibMTL's
    ``w = m softmax(s)`` step moves the ratio the same way."""
    jac = diagonal_jacobian([9.0, 1.0])
    g = torch.tensor([9.0, 1.0], dtype=F64)
    method = GradNorm(alpha=3.0, lr=1e-4)
    method(jac, torch.ones(2, dtype=F64))
    w1 = torch.tensor([0.9991, 1.0001], dtype=F64) * 2 / 1.9992  # ∇ = (9, -1) at w = (1, 1)
    assert torch.allclose(method.task_weights, w1, rtol=1e-15, atol=0)
    losses = torch.tensor([2.0, 1.0], dtype=F64)
    targets = (w1 * g).mean() * torch.tensor([4 / 3, 2 / 3], dtype=F64) ** 3
    assert torch.allclose(targets, torch.tensor([11.8471092, 1.4808887], dtype=F64), atol=1e-7)
    assert bool((w1 * g < targets).all())  # both below their targets
    method(jac, losses)
    w2 = method.task_weights
    stepped = w1 + 1e-4 * g
    assert torch.allclose(w2, 2 * stepped / stepped.sum(), rtol=1e-15, atol=0)
    assert torch.allclose(w2, torch.tensor([0.99989985, 1.00010015], dtype=F64), atol=1e-8)
    l_grad = (w1 * g - targets).abs().sum()
    assert float((stepped * g - targets).abs().sum()) == pytest.approx(
        float(l_grad) - 1e-4 * 82, rel=1e-12
    )
    ratio_before, ratio_after = float(9 * w1[0] / w1[1]), float(9 * w2[0] / w2[1])
    assert ratio_before == pytest.approx(8.99100090, abs=1e-8)
    assert ratio_after == pytest.approx(8.99819748, abs=1e-8)
    assert abs(ratio_after - 8.0) > abs(ratio_before - 8.0)
    # LibMTL's parametrisation from the same weights: w = 2 softmax(s), s = log w1
    logits = w1.log().requires_grad_(True)
    libmtl = 2 * torch.softmax(logits, dim=0)
    (grad,) = torch.autograd.grad((libmtl * g - targets).abs().sum(), logits)
    moved = 2 * torch.softmax(logits.detach() - 1e-4 * grad, dim=0)
    assert float(9 * moved[0] / moved[1]) > ratio_before


def test_fixed_point_balances_norms_by_training_rates() -> None:
    """Many steps with fixed norms and losses: w_i |g_i| / Ḡ → r_i^α (up to the step size).
    With α = 1 the targets average to Ḡ, so they can all be met (for α ≠ 1, mean r^α ≠ 1 and
    the L1 objective settles on a compromise)."""
    norms = [0.5, 2.0, 4.0]
    jac = diagonal_jacobian(norms)
    method = GradNorm(alpha=1.0, lr=1e-3)
    method(jac, torch.ones(3, dtype=F64))
    losses = torch.tensor([0.9, 0.6, 0.3], dtype=F64)
    for _ in range(4000):
        method(jac, losses)
    scaled = method.task_weights * torch.tensor(norms, dtype=F64)
    rates = losses / losses.mean()
    assert torch.allclose(scaled / scaled.mean(), rates, atol=2e-2)  # sign steps oscillate
    assert float(method.task_weights.sum()) == pytest.approx(3.0)


def test_only_ratios_of_norms_matter() -> None:
    """Norms scaled by c and lr by 1/c: the same weights (the features route and the last layer
    differ by such factors, see the docstring)."""
    jacobians = [make_jacobian(k, 3, 5) for k in range(3)]
    losses = [torch.tensor([1.0, 2.0, 0.5], dtype=F64) * (1 - 0.1 * k) for k in range(3)]
    a, b = GradNorm(lr=0.05), GradNorm(lr=0.05 / 7.0)
    for jac, loss in zip(jacobians, losses):
        a(jac, loss)
        b(7.0 * jac, loss)
    assert torch.allclose(a.task_weights, b.task_weights, atol=1e-12)


def test_last_blocks_measures_the_last_blocks_only() -> None:
    jac = make_jacobian(5, 3, 9)
    losses = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    method = GradNorm(lr=0.1, last_blocks=2)
    reference = GradNorm(lr=0.1)
    method(jac, losses, blocks=[4, 2, 3])
    reference.weights(jac[:, 4:] @ jac[:, 4:].T, losses)  # the same norms, from the Gramian
    assert torch.allclose(method.task_weights, reference.task_weights)
    decision = method.aggregate(jac, losses, blocks=[4, 2, 3])
    assert torch.allclose(decision.direction, decision.weights @ jac)
    with pytest.raises(ValueError, match="Gramian does not give"):
        method.weights(jac @ jac.T, losses)
    with pytest.raises(ValueError, match="needs that many blocks"):
        GradNorm(last_blocks=4)(jac, losses, blocks=[4, 2, 3])


def test_step_too_large_is_clamped_loudly() -> None:
    method = GradNorm(lr=10.0)
    jac = diagonal_jacobian([1.0, 3.0])
    with pytest.warns(RuntimeWarning, match="non-positive"):
        method(jac, torch.ones(2, dtype=F64))
    assert method.clamped == 1 and (method.task_weights > 0).all()
    assert float(method.task_weights.sum()) == pytest.approx(2.0)


def test_state_round_trip_and_reset() -> None:
    jacobians = [make_jacobian(k, 3, 6) for k in range(4)]
    check_state_round_trip(
        lambda: GradNorm(lr=0.01), jacobians, torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    )


def test_errors_and_registry() -> None:
    method = methods.get("gradnorm", alpha=0.5, lr=0.01, last_blocks=1)
    assert method.hparams() == {"alpha": 0.5, "lr": 0.01, "last_blocks": 1}
    assert method.needs_losses and list(method.parameters()) == []
    jac = make_jacobian(0, 2, 3)
    with pytest.raises(ValueError, match="needs the task losses"):
        GradNorm()(jac)
    with pytest.raises(ValueError, match="positive initial losses"):
        GradNorm()(jac, torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(NonFiniteError):
        GradNorm()(jac, torch.tensor([1.0, float("nan")], dtype=F64))
    started = GradNorm()
    started(jac, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="non-negative task losses"):
        started(jac, torch.tensor([-1.0, 2.0], dtype=F64))  # r^1.5 of a negative ratio
    grad_norm = GradNorm()
    grad_norm(jac, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="call reset"):
        grad_norm(make_jacobian(0, 3, 3), torch.ones(3, dtype=F64))
    for bad in ({"alpha": -1.0}, {"lr": 0.0}, {"last_blocks": 0}):
        with pytest.raises(ConfigError):
            methods.get("gradnorm", **bad)


def test_engine_routes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_engine_routes(lambda: GradNorm(lr=0.1))
        check_route_steps(lambda: GradNorm(lr=0.1))
        check_route_steps(lambda: GradNorm(lr=0.1), features=True)
        check_route_steps(lambda: GradNorm(lr=0.1, last_blocks=2))
