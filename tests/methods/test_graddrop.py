"""GradDrop: sign purity, stochastic sign masks, leak."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from method_checks import check_engine_routes, jacobians, make_jacobian
from torch import Tensor

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.graddrop import GradDrop

F64 = torch.float64


def reference_graddrop(jac: Tensor, uniform: Tensor, leak: Tensor) -> Tensor:
    """Lines 10-15 of Algorithm 1 of the paper, element by element."""
    m, n = jac.shape
    out = torch.zeros(n, dtype=jac.dtype)
    for a in range(n):
        column = jac[:, a]
        total = float(column.abs().sum())
        purity = 0.5 * (1 + float(column.sum()) / total) if total > 0 else 0.5
        for i in range(m):
            g = float(column[i])
            keep = (purity > uniform[a] and g > 0) or (purity < uniform[a] and g < 0)
            out[a] += (leak[i] + (1 - leak[i]) * float(keep)) * g
    return out


@settings(max_examples=40, deadline=None)
@given(jac=jacobians())
def test_matches_reference_with_the_same_draws(jac: Tensor) -> None:
    method = GradDrop(leak=0.25, generator=9)
    d = method(jac)
    uniform = torch.rand(jac.shape[1], generator=torch.Generator().manual_seed(9), dtype=F64)
    expected = reference_graddrop(
        jac.double(), uniform, torch.full((jac.shape[0],), 0.25, dtype=F64)
    )
    scale = float(jac.double().abs().sum()) or 1.0
    tol = 1e-6 if jac.dtype == torch.float32 else 1e-12
    assert d.dtype == jac.dtype
    assert torch.allclose(d.double(), expected, rtol=tol, atol=tol * scale)


@settings(max_examples=30, deadline=None)
@given(jac=jacobians())
def test_full_leak_is_the_sum(jac: Tensor) -> None:
    assert torch.equal(GradDrop(leak=1.0, generator=0)(jac), jac.sum(dim=0))


def test_purity_and_sign_consistent_columns() -> None:
    jac = torch.tensor([[1.0, -2.0, 3.0, 0.0], [2.0, -1.0, -1.0, 0.0]], dtype=F64)
    method = GradDrop(generator=0)
    d = method(jac)
    assert method.last_purity.tolist() == [1.0, 0.0, 0.5 * (1 + 2 / 4), 0.5]
    # one sign everywhere: nothing is dropped; zero columns stay zero
    assert d[:2].tolist() == [3.0, -3.0] and d[3] == 0
    assert d[2] in (3.0, -1.0)  # either the positive or the negative gradients survive


def test_positive_sign_kept_with_probability_purity() -> None:
    """At an element with gradients (3, -1), P = 3/4: over many draws the positive gradient is
    kept 3/4 of the time (4000 draws: 5 standard deviations is 0.034)."""
    jac = torch.tensor([[3.0], [-1.0]], dtype=F64).expand(2, 4000).clone()
    d = GradDrop(generator=123)(jac)
    positive = (d == 3.0).double().mean()
    assert set(d.unique().tolist()) == {3.0, -1.0}
    assert abs(float(positive) - 0.75) < 0.034


def test_expected_value_with_per_task_leak() -> None:
    """E[d] = Σ_i (ℓ_i + (1 - ℓ_i) E[M_i]) g_i with E[M_i] = P for g_i > 0 and 1 - P for
    g_i < 0; task 0 (ℓ = 1) always passes."""
    column = torch.tensor([2.0, -1.0, -3.0], dtype=F64)
    jac = column[:, None].expand(3, 20000).clone()
    leak = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    purity = 0.5 * (1 + column.sum() / column.abs().sum())
    keep = torch.where(column > 0, purity, 1 - purity)
    expected = ((leak + (1 - leak) * keep) * column).sum()
    d = GradDrop(leak=leak.tolist(), generator=1)(jac)
    assert abs(float(d.mean()) - float(expected)) < 0.05
    assert set(d.unique().tolist()) == {0.5, -2.0}  # positives kept, or negatives kept


def test_single_task_and_block_diagonal_jacobian_keep_everything() -> None:
    g = torch.tensor([[1.0, -2.0, 0.0, 4.0]], dtype=F64)
    assert torch.equal(GradDrop(generator=0)(g), g[0])
    block = torch.zeros(2, 6, dtype=F64)
    block[0, :3] = torch.tensor([1.0, -1.0, 2.0])
    block[1, 3:] = torch.tensor([-3.0, 0.5, 1.0])
    assert torch.equal(GradDrop(generator=0)(block), block.sum(dim=0))


def test_permutation_equivariance_with_the_same_draws() -> None:
    jac = make_jacobian(2, 4, 30)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(GradDrop(generator=5)(jac[perm]), GradDrop(generator=5)(jac))


def test_generator_reset_and_state_dict() -> None:
    jac = make_jacobian(0, 3, 50)
    method = GradDrop(generator=torch.Generator().manual_seed(4))
    assert method.hparams() == {"leak": 0.0, "generator": 4}
    state = method.state_dict()
    first = method(jac)
    second = method(jac)
    assert not torch.equal(first, second)
    method.load_state_dict(state)
    assert torch.equal(method(jac), first)
    method.reset()
    decision = method.aggregate(jac)
    assert torch.equal(decision.direction, first) and decision.weights is None


def test_errors_and_registry() -> None:
    method = methods.get("graddrop", leak=[0.0, 1.0], generator=0)
    assert isinstance(method, GradDrop)
    with pytest.raises(ValueError, match="2 leak values for 3 tasks"):
        method(make_jacobian(0, 3, 4))
    with pytest.raises(NonFiniteError):
        GradDrop()(torch.tensor([[float("nan"), 1.0]], dtype=F64))
    with pytest.raises(ConfigError, match="leak"):
        methods.get("graddrop", leak=1.5)
    with pytest.raises(ConfigError, match="leak"):
        methods.get("graddrop", leak=[])


def test_engine_routes() -> None:
    check_engine_routes(lambda: GradDrop(leak=0.2, generator=3))
