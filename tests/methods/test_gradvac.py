"""GradVac: adaptive similarity targets per task pair and per group of parameters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import make_jacobian
from stateful_checks import check_route_steps, check_state_round_trip
from torch import Tensor

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.gradvac import GradVac
from mtlkit.methods.projection import PCGrad, random_orders

F64 = torch.float64


def reference_gradvac(
    jac: Tensor, groups: list[int], targets: Tensor, order: Tensor, beta: float
) -> Tensor:
    """Algorithm 1 of the paper on the gradient vectors themselves (loops over tasks, partners
    and groups; ``targets [m, m, K]`` updated in place)."""
    projected = jac.clone()
    bounds = [0, *torch.tensor(groups).cumsum(0).tolist()]
    for i in range(jac.shape[0]):
        sizes = [float(jac[i, bounds[k] : bounds[k + 1]].norm()) for k in range(len(groups))]
        for j in order[i].tolist():
            for k in range(len(groups)):
                part = slice(bounds[k], bounds[k + 1])
                g_i, g_j = projected[i, part], jac[j, part]
                norm_i, norm_j = float(g_i.norm()), float(g_j.norm())
                if norm_i <= 1e-7 * sizes[k]:  # zero up to rounding (Σ |coefficient| |g|)
                    norm_i = 0.0
                phi = float(g_i @ g_j) / (norm_i * norm_j) if norm_i > 0 and norm_j > 0 else 0.0
                phi = max(-1.0, min(1.0, phi))
                target = float(targets[i, j, k])
                if norm_i > 0 and norm_j > 0 and phi < target:
                    goal = min(target, 1 - 1e-8)
                    scale = (
                        norm_i
                        * (goal * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - goal**2))
                        / (norm_j * math.sqrt(1 - goal**2))
                    )
                    projected[i, part] = g_i + scale * g_j
                    sizes[k] += abs(scale) * norm_j
                targets[i, j, k] = (1 - beta) * target + beta * phi
    return projected.sum(dim=0)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 5),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    kind=st.sampled_from(["generic", "opposite", "zero", "duplicate", "huge"]),
)
def test_matches_reference_over_several_steps(seed: int, m: int, sizes, kind: str) -> None:
    method = GradVac(beta=0.3, generator=seed)
    targets = torch.zeros(m, m, len(sizes), dtype=F64)
    for step in range(3):
        jac = make_jacobian(seed + step, m, sum(sizes), kind)
        d = method(jac, blocks=sizes)
        expected = reference_gradvac(jac, sizes, targets, method.last_order, 0.3)
        scale = float(jac.norm(dim=1).max()) or 1.0
        # √(1 - φ²) near |φ| = 1 turns rounding of φ (1e-16) into 1e-8: hence the tolerance
        assert torch.allclose(d, expected, rtol=1e-6, atol=1e-6 * scale)
        assert torch.allclose(method.targets, targets, atol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_first_step_is_pcgrad(seed: int) -> None:
    """Zero targets at the start: the correction is PCGrad's projection."""
    jac = make_jacobian(seed, 4, 5)
    method = GradVac(grouping="whole", generator=seed)
    decision = method.aggregate(jac)
    pcgrad = PCGrad()
    pcgrad.draw_order = lambda m: method.last_order  # the same orders
    reference = pcgrad.aggregate(jac)
    assert torch.allclose(decision.direction, reference.direction, atol=1e-10)
    assert torch.allclose(decision.weights, reference.weights, atol=1e-10)


def test_corrected_cosine_reaches_the_target() -> None:
    """Two tasks: after aligned steps raise the target, a conflicting step is corrected so that
    cos(g_0', g_1) equals the target (before its update), and the target then moves by β."""
    method = GradVac(beta=0.5, grouping="whole", generator=0)
    aligned = torch.tensor([[1.0, 0.2], [1.0, 0.0]], dtype=F64)
    for _ in range(3):
        method(aligned)
    cos_aligned = float(aligned[0] @ aligned[1] / (aligned[0].norm() * aligned[1].norm()))
    target = 0.875 * cos_aligned  # EMA from 0 with β = ½, three steps
    assert float(method.targets[0, 1, 0]) == pytest.approx(target, rel=1e-12)
    conflicting = torch.tensor([[-1.0, 1.0], [2.0, 0.0]], dtype=F64)
    rows = _rows(method, conflicting)
    cosine = float(rows[0] @ conflicting[1] / (rows[0].norm() * conflicting[1].norm()))
    assert cosine == pytest.approx(target, rel=1e-10)
    phi = -(2**-0.5)
    assert float(method.targets[0, 1, 0]) == pytest.approx(0.5 * target + 0.5 * phi, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 6))
def test_two_tasks_cosine_at_least_target(seed: int, n: int) -> None:
    """m = 2 (one partner per row): after each step, cos(g_i^PC, g_j) ≥ the target it had."""
    method = GradVac(beta=0.4, grouping="whole", generator=seed)
    for step in range(4):
        jac = make_jacobian(seed + step, 2, n)
        before = method.targets.clone() if method.targets is not None else torch.zeros(2, 2, 1)
        weights_rows = _rows(method, jac)
        for i, j in ((0, 1), (1, 0)):
            g = weights_rows[i]
            cosine = float(g @ jac[j] / (g.norm() * jac[j].norm()))
            assert cosine >= float(before[i, j, 0]) - 1e-9


def _rows(method: GradVac, jac: Tensor) -> Tensor:
    """Run one step and return the corrected rows g_i^PC (two tasks: row i only adds g_j)."""
    targets = (
        method.targets.clone() if method.targets is not None else torch.zeros(2, 2, 1, dtype=F64)
    )
    weights = method.aggregate(jac).weights
    rows = jac.clone()
    for i, j in ((0, 1), (1, 0)):
        norm_i, norm_j = float(jac[i].norm()), float(jac[j].norm())
        phi = float(jac[i] @ jac[j]) / (norm_i * norm_j)
        goal = float(targets[i, j, 0])
        if phi < goal:
            rows[i] = (
                jac[i]
                + norm_i
                * (goal * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - goal**2))
                / (norm_j * math.sqrt(1 - goal**2))
                * jac[j]
            )
    assert torch.allclose(rows.sum(dim=0), weights @ jac, atol=1e-10)
    return rows


def test_blocks_are_independent_problems() -> None:
    """Per-block grouping equals GradVac on each block separately (same orders, own targets)."""
    sizes = [3, 4]
    method = GradVac(grouping="blocks", generator=5)
    parts = [GradVac(grouping="whole", generator=5) for _ in sizes]
    for step in range(3):
        jac = make_jacobian(step, 3, 7)
        decision = method.aggregate(jac, blocks=sizes)
        expected = torch.cat([p(piece) for p, piece in zip(parts, jac.split(sizes, dim=1))])
        assert torch.allclose(decision.direction, expected, atol=1e-10)
        assert decision.weights is None
    assert torch.allclose(method.targets[..., 1], parts[1].targets[..., 0])


def test_grouping_merges_consecutive_blocks_and_whole_ignores_blocks() -> None:
    jac = make_jacobian(1, 3, 9)
    merged = GradVac(grouping=[2, 1], generator=2)(jac, blocks=[3, 2, 4])
    assert torch.allclose(merged, GradVac(grouping="blocks", generator=2)(jac, blocks=[5, 4]))
    whole = GradVac(grouping="whole", generator=2)
    decision = whole.aggregate(jac, blocks=[3, 2, 4])
    assert torch.allclose(decision.direction, GradVac(generator=2)(jac))
    assert decision.weights is not None
    assert whole.groups([3, 2, 4], 9) == [9]
    with pytest.raises(ValueError, match="covers 2 blocks"):
        GradVac(grouping=[1, 1])(jac, blocks=[3, 2, 4])


def test_state_round_trip_and_reset() -> None:
    jacobians = [make_jacobian(k, 3, 6) for k in range(4)]
    check_state_round_trip(lambda: GradVac(generator=3), jacobians, blocks=[2, 4])


def test_zero_rows_and_single_task() -> None:
    jac = make_jacobian(0, 3, 4)
    jac[1] = 0
    d = GradVac(generator=0)(jac)
    assert torch.isfinite(d).all()
    one = GradVac(generator=0)
    assert torch.equal(one(jac[:1]), jac[0])
    assert random_orders(1, torch.Generator()).shape == (1, 0)


def test_target_of_one_is_capped() -> None:
    """Identical gradients drive the target to 1; a later conflict gets a finite correction."""
    method = GradVac(beta=1.0, grouping="whole", generator=0)
    method(torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64))
    assert float(method.targets[0, 1, 0]) == 1.0
    d = method(torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64))
    assert torch.isfinite(d).all()


def test_errors_and_registry() -> None:
    method = methods.get("gradvac", beta=0.1, grouping="whole", generator=4)
    assert isinstance(method, GradVac)
    assert method.hparams() == {"beta": 0.1, "grouping": "whole", "generator": 4}
    method(make_jacobian(0, 3, 4))
    with pytest.raises(ValueError, match="call reset"):
        method(make_jacobian(0, 2, 4))
    with pytest.raises(NonFiniteError):
        GradVac()(torch.tensor([[float("nan"), 1.0]], dtype=F64))
    for bad in ({"beta": 0.0}, {"beta": 1.5}, {"grouping": "layers"}, {"grouping": [0, 2]}):
        with pytest.raises(ConfigError):
            methods.get("gradvac", **bad)


@pytest.mark.parametrize("grouping", ["blocks", "whole"])
def test_engine_parameter_route(grouping: str) -> None:
    check_route_steps(lambda: GradVac(grouping=grouping, generator=7))


def test_engine_features_route() -> None:
    check_route_steps(lambda: GradVac(generator=7), features=True)
