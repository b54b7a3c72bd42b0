"""ConFIG: equal projections on the unit gradients, length from the projections."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from method_checks import check_engine_routes, jacobians, make_jacobian
from torch import Tensor

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.config_grad import ConFIG

F64 = torch.float64


def reference_config(jac: Tensor, targets: Tensor | None = None, length="projection") -> Tensor:
    """A transcription of the reference implementation (``conflictfree.ConFIG_update``): least
    squares on the unit gradients themselves, then the length model."""
    m = jac.shape[0]
    targets = torch.ones(m, dtype=jac.dtype) if targets is None else targets
    norms = jac.norm(dim=1)
    units = torch.nan_to_num(jac / norms[:, None], 0.0)
    best = torch.linalg.lstsq(units, targets[:, None], driver="gelsd").solution[:, 0]
    if best.norm() <= 1e-10 * targets.norm():  # exactly opposing gradients: v = 0 up to rounding
        return torch.zeros_like(best)
    unit = best / best.norm()
    if length == "projection":
        size = (jac @ unit).sum()
    else:
        tracked = {"min": norms.min(), "max": norms.max(), "arithmetic": norms.mean()}[length]
        size = tracked * (units @ unit).sum()
    return size * unit


def test_two_orthogonal_gradients_closed_form() -> None:
    method = ConFIG()
    d = method(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64))
    assert torch.allclose(d, torch.tensor([1.0, 1.0], dtype=F64), atol=1e-14)
    # |g2| = 2: the direction stays on the bisector, the length is (1 + 2) / √2
    decision = method.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64))
    assert torch.allclose(decision.direction, torch.tensor([1.5, 1.5], dtype=F64), atol=1e-14)
    assert torch.allclose(decision.weights, torch.tensor([1.5, 0.75], dtype=F64), atol=1e-14)


def test_conflicting_pair_closed_form() -> None:
    # g1 = (1, 0), g2 = (-1, 1)/√2·2: unit gradients at 135°, v solves ĝ_i · v = 1
    g1 = torch.tensor([1.0, 0.0], dtype=F64)
    g2 = torch.tensor([-2.0, 2.0], dtype=F64) / 2**0.5
    d = ConFIG()(torch.stack([g1, g2]))
    v = torch.tensor([1.0, 1.0 + 2**0.5], dtype=F64)  # ĝ1·v = 1, ĝ2·v = (-1 + 1 + √2)/√2 = 1
    u = v / v.norm()
    assert torch.allclose(d, (g1 @ u + g2 @ u) * u, atol=1e-14)
    assert (torch.stack([g1, g2]) @ d > 0).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 6), extra=st.integers(0, 5))
def test_equal_positive_projections_on_unit_gradients(seed: int, m: int, extra: int) -> None:
    """The paper's claim (m ≤ n, independent gradients): ĝ_i · d is the same for every task and
    positive, and d agrees with the reference implementation."""
    jac = make_jacobian(seed, m, m + extra)
    d = ConFIG()(jac)
    projections = (jac / jac.norm(dim=1, keepdim=True)) @ d
    assert torch.allclose(projections, projections.mean().expand(m), rtol=1e-8, atol=0)
    assert (projections > 0).all()
    assert torch.allclose(d, reference_config(jac), rtol=1e-8, atol=1e-10 * float(jac.norm()))


@settings(max_examples=40, deadline=None)
@given(jac=jacobians(dtypes=(F64,)))
def test_matches_reference_on_adversarial_jacobians(jac: Tensor) -> None:
    """Rank-deficient (m > n, collinear, opposite, duplicated, zero rows) and extreme scales:
    the least-squares direction of the reference implementation."""
    units = torch.nan_to_num(jac / jac.norm(dim=1, keepdim=True), 0.0)
    singular = torch.linalg.svdvals(units)
    tiny = singular[singular < 1e-6 * singular.max()]
    # nearly (not exactly) dependent: the Gramian's cutoff differs (see the docstring)
    assume(not bool((tiny > 1e-12 * singular.max()).any()))
    d = ConFIG()(jac)
    scale = float(jac.norm(dim=1).max()) or 1.0
    assert torch.allclose(d, reference_config(jac), rtol=1e-7, atol=1e-7 * scale)


@settings(max_examples=30, deadline=None)
@given(jac=jacobians(dtypes=(torch.float32,)))
def test_float32(jac: Tensor) -> None:
    d = ConFIG()(jac)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()


@pytest.mark.parametrize("seed", range(5))
def test_float32_agrees_with_float64(seed: int) -> None:
    jac = make_jacobian(seed, 3, 10)
    d64 = ConFIG()(jac)
    d32 = ConFIG()(jac.float())
    assert torch.allclose(d32.double(), d64, rtol=1e-4, atol=1e-5 * float(d64.norm()))


def test_opposite_gradients_give_zero() -> None:
    jac = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=F64)
    assert torch.allclose(ConFIG()(jac), torch.zeros(2, dtype=F64), atol=1e-12)


def test_zero_gradient_gets_zero_weight() -> None:
    jac = make_jacobian(3, 4, 7)
    jac[2] = 0
    decision = ConFIG().aggregate(jac)
    d = decision.direction
    assert decision.weights[2] == 0
    kept = jac[[0, 1, 3]]
    # the other three still get equal projections (the zero row cannot be matched: least squares)
    projections = (kept / kept.norm(dim=1, keepdim=True)) @ d
    assert torch.allclose(projections, projections.mean().expand(3), rtol=1e-8)
    assert torch.equal(ConFIG()(torch.zeros(3, 4, dtype=F64)), torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("seed", range(5))
def test_direction_weights_set_the_projection_ratios(seed: int) -> None:
    jac = make_jacobian(seed, 3, 8)
    p = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    d = ConFIG(direction_weights=p.tolist())(jac)
    projections = (jac / jac.norm(dim=1, keepdim=True)) @ d
    assert torch.allclose(projections / projections[0], p, rtol=1e-9)
    assert torch.allclose(d, reference_config(jac, p), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("length", ["min", "max", "arithmetic"])
def test_length_models_match_reference(length: str) -> None:
    jac = make_jacobian(11, 3, 6)
    assert torch.allclose(ConFIG(length=length)(jac), reference_config(jac, length=length))


def test_tracked_lengths() -> None:
    jac = make_jacobian(2, 3, 6)
    norms = jac.norm(dim=1)
    base = ConFIG(length="max")(jac) / norms.max()  # (Σ ĝ_i · u) u
    harmonic = 3 / (1 / norms).sum()
    geometric = norms.prod() ** (1 / 3)
    assert torch.allclose(ConFIG(length="harmonic")(jac), harmonic * base)
    assert torch.allclose(ConFIG(length="geometric")(jac), geometric * base)
    assert torch.allclose(ConFIG(length=1)(jac), norms[1] * base)


@pytest.mark.parametrize("seed", range(5))
def test_scale_invariance_of_the_direction_and_permutation_equivariance(seed: int) -> None:
    jac = make_jacobian(seed, 4, 9)
    d = ConFIG()(jac)
    rescaled = ConFIG()(jac * torch.tensor([[3.0], [0.1], [1.0], [20.0]], dtype=F64))
    assert torch.allclose(rescaled / rescaled.norm(), d / d.norm(), atol=1e-10)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    decision = ConFIG().aggregate(jac[perm])
    assert torch.allclose(decision.direction, d, atol=1e-10)
    assert torch.allclose(decision.weights, ConFIG().weights(jac @ jac.T)[perm], atol=1e-10)


def test_single_task_returns_the_gradient() -> None:
    jac = torch.tensor([[3.0, -4.0]], dtype=F64)
    assert torch.allclose(methods.get("config")(jac), jac[0])


def test_bad_input_and_arguments() -> None:
    with pytest.raises(NonFiniteError):
        ConFIG()(torch.tensor([[1.0, float("inf")], [0.0, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match="direction weights"):
        ConFIG(direction_weights=[1.0, 1.0])(make_jacobian(0, 3, 4))
    with pytest.raises(ValueError, match="tracks the norm"):
        ConFIG(length=5)(make_jacobian(0, 3, 4))
    with pytest.raises(ConfigError, match="direction_weights"):
        methods.get("config", direction_weights=[1.0, -1.0])
    with pytest.raises(ConfigError, match="length"):
        methods.get("config", length="median")
    method = methods.get("config", length="min")
    assert method.hparams() == {"direction_weights": None, "length": "min"}
    assert "length='min'" in repr(method)


def test_engine_routes() -> None:
    check_engine_routes(ConFIG)
