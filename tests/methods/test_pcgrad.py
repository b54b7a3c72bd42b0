"""PCGrad: projecting conflicting gradients, computed on the Gramian."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mtlkit import methods
from mtlkit.methods.projection import PCGrad, project_conflicts

F64 = torch.float64


def random_jacobian(seed: int, m: int, n: int) -> Tensor:
    """Rows of different norms, some zero, duplicated or opposite, depending on the seed."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=gen, dtype=F64)
    jac = jac * torch.exp(torch.randn(m, 1, generator=gen, dtype=F64))
    i, j = torch.randint(m, (2,), generator=gen).tolist()
    if seed % 4 == 1:
        jac[i] = 0
    elif seed % 4 == 2:
        jac[i] = jac[j]
    elif seed % 4 == 3:
        jac[i] = -2 * jac[j]
    return jac


def reference_pcgrad(jac: Tensor, order: Tensor) -> Tensor:
    """A direct transcription of Algorithm 1 of Yu et al. (2020) on the gradients themselves."""
    projected = []
    for i, g_i in enumerate(jac):
        g_pc = g_i.clone()
        for j in order[i].tolist():
            g_j = jac[j]
            inner = g_pc @ g_j
            if inner < 0 and g_j @ g_j > 0:
                g_pc = g_pc - inner / (g_j @ g_j) * g_j
        projected.append(g_pc)
    return torch.stack(projected)


def test_two_conflicting_gradients_known_values() -> None:
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    method = PCGrad(generator=0)
    decision = method.aggregate(jac)
    # g1' = g1 - (-1)/2 g2 = (0.5, 0.5); g2' = g2 - (-1)/1 g1 = (0, 1)
    assert torch.allclose(decision.direction, torch.tensor([0.5, 1.5], dtype=F64), atol=1e-15)
    assert torch.allclose(decision.weights, torch.tensor([2.0, 1.5], dtype=F64), atol=1e-15)


@pytest.mark.parametrize("seed", range(20))
def test_two_conflicting_gradients_formula(seed: int) -> None:
    g1, g2 = torch.randn(2, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)
    if g1 @ g2 > 0:
        g2 = g2 - 2 * (g1 @ g2) / (g1 @ g1) * g1  # reflect: now g1 · g2 < 0
    inner = g1 @ g2
    expected = (g1 - inner / (g2 @ g2) * g2) + (g2 - inner / (g1 @ g1) * g1)
    jac = torch.stack([g1, g2])
    assert torch.allclose(PCGrad(generator=seed)(jac), expected, atol=1e-12)


def test_non_conflicting_gradients_are_summed() -> None:
    jac = torch.rand(5, 7, generator=torch.Generator().manual_seed(0), dtype=F64)  # all ≥ 0
    decision = PCGrad(generator=1).aggregate(jac)
    assert decision.weights.tolist() == [1.0] * 5
    assert torch.allclose(decision.direction, jac.sum(dim=0))


def test_single_task() -> None:
    method = methods.get("pcgrad", generator=3)
    assert isinstance(method, PCGrad)
    assert method.weights(torch.tensor([[2.0]], dtype=F64)).tolist() == [1.0]
    assert method.last_order.shape == (1, 0)


@pytest.mark.parametrize("seed", range(60))
def test_matches_reference_on_the_jacobian(seed: int) -> None:
    m = 2 + seed % 7
    jac = random_jacobian(seed, m, 1 + seed % 10)
    method = PCGrad(generator=seed)
    decision = method.aggregate(jac)
    d = decision.direction
    projected = reference_pcgrad(jac, method.last_order)
    scale = float(jac.norm(dim=1).max()) or 1.0
    assert torch.allclose(d, projected.sum(dim=0), atol=1e-10 * scale)
    coefficients = project_conflicts(jac @ jac.T, method.last_order)
    assert torch.allclose(coefficients @ jac, projected, atol=1e-10 * scale)
    assert torch.allclose(decision.weights, coefficients.sum(dim=0))


@pytest.mark.parametrize("seed", range(30))
def test_no_conflict_with_the_last_gradient_projected_on(seed: int) -> None:
    m = 3 + seed % 6
    jac = random_jacobian(4 * seed, m, 4)  # seed % 4 == 0: no zero rows
    order = PCGrad(generator=seed).draw_order(m)
    projected = project_conflicts(jac @ jac.T, order) @ jac
    last = jac[order[:, -1]]
    scale = float(jac.norm(dim=1).max()) ** 2
    assert ((projected * last).sum(dim=1) >= -1e-12 * scale).all()


def test_draw_order_rows_are_permutations_of_the_other_tasks() -> None:
    method = PCGrad(generator=0)
    for m in (2, 3, 9):
        order = method.draw_order(m)
        for i in range(m):
            assert sorted(order[i].tolist()) == [j for j in range(m) if j != i]
    seen = {tuple(method.draw_order(4)[0].tolist()) for _ in range(300)}
    assert len(seen) == 6  # all 3! orders of the tasks other than 0


def test_seed_reproduces_and_orders_matter() -> None:
    # three gradients for which the order of the projections changes the result
    jac = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, -0.5, 1.0]], dtype=F64)
    a, b = PCGrad(generator=7), PCGrad(generator=7)
    first = [a(jac) for _ in range(10)]
    assert all(torch.equal(x, b(jac)) for x in first)
    assert len({tuple(x.tolist()) for x in first}) > 1
    a.reset()
    assert all(torch.equal(x, a(jac)) for x in first)
    assert a.last_order is not None
    a.reset()
    assert a.last_order is None


def test_generator_object_and_state_dict() -> None:
    jac = random_jacobian(3, 6, 5)
    method = PCGrad(generator=torch.Generator().manual_seed(11))
    assert method.hparams() == {"generator": 11}
    state = method.state_dict()
    first = method(jac)
    method(jac)
    method.load_state_dict(state)
    assert torch.equal(method(jac), first)
    method.reset()
    assert torch.equal(method(jac), first)


def test_zero_gradients_give_finite_output() -> None:
    jac = random_jacobian(0, 5, 3)
    jac[[1, 3]] = 0
    method = PCGrad(generator=0)
    decision = method.aggregate(jac)
    d = decision.direction
    assert torch.isfinite(d).all() and torch.isfinite(decision.weights).all()
    assert torch.allclose(d, reference_pcgrad(jac, method.last_order).sum(dim=0), atol=1e-12)
    assert torch.equal(PCGrad(generator=0)(torch.zeros(3, 4, dtype=F64)), torch.zeros(4, dtype=F64))


def test_dtype_and_bad_input() -> None:
    jac = random_jacobian(2, 4, 5).float()
    assert PCGrad(generator=0).weights(jac @ jac.T).dtype == torch.float32
    with pytest.raises(ValueError, match="square"):
        PCGrad().weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="order"):
        project_conflicts(torch.eye(3), torch.zeros(2, 2, dtype=torch.long))
