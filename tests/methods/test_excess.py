"""ExcessMTL: AdaGrad estimate of the excess risks, multiplicative weight updates."""

from __future__ import annotations

import pytest
import torch
from method_checks import make_jacobian
from stateful_checks import check_route_steps, check_state_round_trip

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.excess import ExcessMTL

F64 = torch.float64


def reference_excess(jacobians, step_size, eps=1e-7):
    """LibMTL's ExcessMTL.backward (from the authors' code), step by step."""
    m = jacobians[0].shape[0]
    loss_weight = torch.ones(m, dtype=F64)
    grad_sum = torch.zeros_like(jacobians[0])
    initial = None
    directions, weights = [], []
    for grads in jacobians:
        w = torch.zeros(m, dtype=F64)
        for i in range(m):
            grad_sum[i] += grads[i] ** 2
            h_i = torch.sqrt(grad_sum[i] + eps)
            w[i] = grads[i] * (1 / h_i) @ grads[i]
        if initial is None:
            initial = w
        else:
            loss_weight = loss_weight * torch.exp(w / initial * step_size)
            loss_weight = loss_weight / loss_weight.sum() * m
        directions.append(loss_weight @ grads)
        weights.append(loss_weight.clone())
    return directions, weights


@pytest.mark.parametrize("step_size", [1e-2, 0.5])
def test_matches_reference(step_size: float) -> None:
    jacobians = [make_jacobian(k, 3, 6) for k in range(6)]
    method = ExcessMTL(robust_step_size=step_size)
    expected, weights = reference_excess(jacobians, step_size)
    for jac, d, w in zip(jacobians, expected, weights):
        decision = method.aggregate(jac)
        assert torch.allclose(decision.direction, d, atol=1e-12)
        assert torch.allclose(decision.weights, w, atol=1e-12)
        assert float(decision.weights.sum()) == pytest.approx(3.0)


def test_first_step_is_the_sum_and_equal_ratios_keep_equal_weights() -> None:
    jac = make_jacobian(1, 3, 5)
    method = ExcessMTL(robust_step_size=1.0, eps=1e-30)
    assert torch.allclose(method(jac), jac.sum(dim=0))
    # the same J again: every e_i / e_i⁰ is 1/√2, so the weights stay equal
    assert torch.allclose(method.aggregate(jac).weights, torch.ones(3, dtype=F64), atol=1e-12)


def test_task_with_larger_relative_excess_gains_weight() -> None:
    jac = make_jacobian(2, 3, 5)
    method = ExcessMTL(robust_step_size=0.5, eps=1e-30)
    method(jac)
    later = jac.clone()
    later[1] *= 3.0  # task 1's gradient grows relative to its history: larger excess risk
    w = method.aggregate(later).weights
    assert w[1] > w[0] and w[1] > w[2] and w[0] == pytest.approx(float(w[2]))


def test_invariant_to_each_task_loss_scale() -> None:
    jacobians = [make_jacobian(k, 3, 5) for k in range(4)]
    c = torch.tensor([[100.0], [0.01], [1.0]], dtype=F64)
    plain, scaled = ExcessMTL(eps=1e-30), ExcessMTL(eps=1e-30)
    for jac in jacobians:
        expected = plain.aggregate(jac).weights
        assert torch.allclose(scaled.aggregate(jac * c).weights, expected, atol=1e-12)


def test_zero_gradient_at_the_first_step_sets_its_reference_later() -> None:
    first = make_jacobian(3, 2, 4)
    first[1] = 0
    method = ExcessMTL(robust_step_size=0.5)
    method(first)
    assert method.reference[1] == 0 and method.reference[0] > 0
    decision = method.aggregate(make_jacobian(4, 2, 4))
    assert method.reference[1] > 0 and torch.isfinite(decision.weights).all()


def test_state_round_trip_and_reset() -> None:
    jacobians = [make_jacobian(k, 3, 6) for k in range(4)]
    check_state_round_trip(lambda: ExcessMTL(robust_step_size=0.3), jacobians)


def test_errors_and_registry() -> None:
    method = methods.get("excess_mtl", robust_step_size=0.1)
    assert isinstance(method, ExcessMTL)
    assert method.hparams() == {"robust_step_size": 0.1, "eps": 1e-7}
    method(make_jacobian(0, 3, 4))
    with pytest.raises(ValueError, match="parameter route"):
        method(make_jacobian(0, 3, 5))
    with pytest.raises(NonFiniteError):
        ExcessMTL()(torch.tensor([[float("inf"), 1.0]], dtype=F64))
    for bad in ({"robust_step_size": 0.0}, {"eps": -1.0}):
        with pytest.raises(ConfigError):
            methods.get("excess_mtl", **bad)


def test_engine_parameter_route() -> None:
    check_route_steps(lambda: ExcessMTL(robust_step_size=0.5))


def test_a_reference_taken_on_a_plateau_does_not_overflow_the_weights() -> None:
    """The 2-D toy from (9, 9) gave NaN at step 2812: the first excess of task 1 was tiny (its
    gradient almost zero on the plateau), a later one 1e6 times larger, exp(η ratio) = inf and
    the weights inf / inf. The softmax form gives the limit: task 1 takes all the weight."""
    method = ExcessMTL(robust_step_size=1e-2)
    method.setup(2)
    first = torch.tensor([[1.0, 0.0], [0.0, 1e-9]], dtype=torch.float64)
    method.aggregate(first)
    later = torch.tensor([[1.0, 0.0], [0.0, 1e-2]], dtype=torch.float64)
    decision = method.aggregate(later)
    assert torch.isfinite(decision.weights).all() and torch.isfinite(decision.direction).all()
    torch.testing.assert_close(decision.weights, torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_the_softmax_form_is_the_papers_update() -> None:
    method = ExcessMTL(robust_step_size=0.5)
    method.setup(3)
    jacs = [make_jacobian(s, 3, 5) for s in range(4)]
    weights = torch.ones(3, dtype=torch.float64)
    accumulator = torch.zeros_like(jacs[0])
    reference = None
    for jac in jacs:
        accumulator = accumulator + jac.square()
        excess = (jac.square() / (accumulator + 1e-7).sqrt()).sum(dim=1)
        reference = excess if reference is None else reference
        weights = weights * torch.exp(0.5 * excess / reference)
        weights = 3 * weights / weights.sum()
        got = method.aggregate(jac).weights
        torch.testing.assert_close(got, weights)
