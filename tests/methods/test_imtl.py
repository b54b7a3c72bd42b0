"""IMTL-G (equal projections on the unit task gradients) and the IMTL hybrid."""

from __future__ import annotations

import pytest
import torch
from conftest import task_losses, tiny_hps
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import mtlkit
from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.imtl import IMTL, IMTLG

F64 = torch.float64


def random_jacobian(seed: int, m: int, n: int, dtype=F64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=gen, dtype=F64)
    return (jac * torch.exp(torch.randn(m, 1, generator=gen, dtype=F64))).to(dtype)


def paper_closed_form(jac: Tensor) -> Tensor:
    """Liu et al. (2021), Sec. 3.2: ``α_{2:m} = g_1 Uᵀ (D Uᵀ)^{-1}``, ``α_1 = 1 - Σ α_{2:m}``, with
    ``D`` / ``U`` the differences of the first (unit) gradient to the others."""
    units = jac / jac.norm(dim=1, keepdim=True)
    d = jac[:1] - jac[1:]
    u = units[:1] - units[1:]
    rest = jac[0] @ u.T @ torch.linalg.inv(d @ u.T)
    return torch.cat([1 - rest.sum(dim=0, keepdim=True), rest])


def test_registry_and_arguments() -> None:
    assert isinstance(methods.get("imtl_g"), IMTLG)
    hybrid = methods.get("imtl", num_tasks=3, init=0.5)
    assert isinstance(hybrid, IMTL) and hybrid.hparams() == {"init": 0.5}
    assert [p.shape for p in hybrid.parameters()] == [torch.Size([3])]
    with pytest.raises(ConfigError, match="init"):
        methods.get("imtl", init=float("nan"))


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 8),
    extra=st.integers(0, 8),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
)
def test_equal_projections_on_unit_gradients(seed: int, m: int, extra: int, scale: float) -> None:
    jac = random_jacobian(seed, m, m + extra) * scale  # linearly independent rows
    decision = IMTLG().aggregate(jac)
    d, alpha = decision.direction, decision.weights
    assert float(alpha.sum()) == pytest.approx(1.0, rel=1e-9)
    projections = (jac @ d) / jac.norm(dim=1)
    spread = float(projections.max() - projections.min())
    assert spread <= 1e-7 * float(projections.abs().max())


@pytest.mark.parametrize("seed", range(10))
def test_matches_the_papers_closed_form_and_torchjd(seed: int) -> None:
    from torchjd.aggregation import IMTLG as TorchjdIMTLG

    jac = random_jacobian(seed, 2 + seed % 5, 8)
    alpha = IMTLG().weights(jac @ jac.T)
    torch.testing.assert_close(alpha, paper_closed_form(jac), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(IMTLG()(jac), TorchjdIMTLG()(jac), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_direction_ignores_task_scales_and_permutations(seed: int) -> None:
    jac = random_jacobian(seed, 5, 9)
    d = IMTLG()(jac)
    scales = torch.exp(2 * torch.randn(5, 1, generator=torch.Generator().manual_seed(seed)))
    scaled = IMTLG()(jac * scales.to(F64))
    cosine = float(scaled @ d / (scaled.norm() * d.norm()))
    assert abs(cosine) == pytest.approx(1.0, abs=1e-10)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
    w = IMTLG().weights(jac @ jac.T)
    torch.testing.assert_close(IMTLG().weights((jac @ jac.T)[perm][:, perm]), w[perm])


def test_degenerate_inputs() -> None:
    method = IMTLG()
    assert method.weights(torch.tensor([[9.0]], dtype=F64)).tolist() == [1.0]
    torch.testing.assert_close(
        method.weights(torch.zeros(3, 3, dtype=F64)), torch.full((3,), 1 / 3, dtype=F64)
    )
    jac = random_jacobian(1, 4, 6)
    jac[2] = 0
    alpha = method.weights(jac @ jac.T)
    assert float(alpha[2]) == 0.0
    keep = [0, 1, 3]
    torch.testing.assert_close(alpha[keep], IMTLG().weights(jac[keep] @ jac[keep].T))
    duplicate = torch.cat([jac[:2], jac[:1]])  # g3 = g1: equal projections still hold
    d = IMTLG()(duplicate)
    projections = (duplicate @ d) / duplicate.norm(dim=1)
    torch.testing.assert_close(projections, projections[:1].expand(3), rtol=1e-9, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="equal non-zero projections"):
        w = IMTLG().weights(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64))
    assert w.tolist() == [0.0, 0.0]
    with pytest.raises(NonFiniteError):
        IMTLG().weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    w32 = IMTLG().weights((jac @ jac.T).float())
    assert w32.dtype == torch.float32 and bool(torch.isfinite(w32).all())


def test_hybrid_is_imtl_g_on_the_scaled_gradients() -> None:
    jac = random_jacobian(3, 4, 7)
    losses = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=F64)
    hybrid = IMTL(num_tasks=4)
    torch.testing.assert_close(hybrid.weights(jac @ jac.T, losses), IMTLG().weights(jac @ jac.T))
    with torch.no_grad():
        hybrid.scaling.log_scales.copy_(torch.tensor([0.3, -1.0, 0.0, 2.0]))
    scales = hybrid.scaling.log_scales.detach().double().exp()
    scaled_jac = jac * scales[:, None]
    decision = hybrid.aggregate(jac, losses)
    torch.testing.assert_close(decision.direction, IMTLG()(scaled_jac))
    torch.testing.assert_close(
        decision.weights, scales * IMTLG().weights(scaled_jac @ scaled_jac.T)
    )


def test_hybrid_accumulates_the_gradient_of_its_scales() -> None:
    jac = random_jacobian(4, 3, 5)
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=F64)
    hybrid = IMTL(num_tasks=3, init=0.2)
    hybrid.weights(jac @ jac.T, losses)
    expected = (torch.exp(torch.tensor(0.2)) * losses.float() - 1).float()
    torch.testing.assert_close(hybrid.scaling.log_scales.grad, expected)
    hybrid.weights(jac @ jac.T, losses)
    torch.testing.assert_close(hybrid.scaling.log_scales.grad, 2 * expected)
    with torch.no_grad():
        hybrid.weights(jac @ jac.T, losses)  # no grad mode: nothing accumulated
    torch.testing.assert_close(hybrid.scaling.log_scales.grad, 2 * expected)


def test_hybrid_learns_inverse_loss_scales() -> None:
    """With the gradient it accumulates, SGD drives e^{s_i} L_i to 1."""
    jac = random_jacobian(5, 3, 6)
    losses = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    hybrid = IMTL(num_tasks=3)
    optimizer = torch.optim.SGD(hybrid.parameters(), lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        hybrid.weights(jac @ jac.T, losses)
        optimizer.step()
    torch.testing.assert_close(
        hybrid.scaling.log_scales.detach().double(), -losses.log(), rtol=0, atol=1e-3
    )


def test_hybrid_state_reset_and_errors() -> None:
    hybrid = IMTL(num_tasks=2, init=0.1)
    with torch.no_grad():
        hybrid.scaling.log_scales.add_(1.0)
    clone = IMTL(num_tasks=2, init=0.1)
    clone.load_state_dict(hybrid.state_dict())
    torch.testing.assert_close(clone.scaling.log_scales, hybrid.scaling.log_scales)
    hybrid.reset()
    assert hybrid.scaling.log_scales.tolist() == pytest.approx([0.1, 0.1])
    gramian = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="needs the task losses"):
        hybrid.weights(gramian)
    with pytest.raises(RuntimeError, match="setup"):
        IMTL().weights(gramian, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="losses for a 3x3 Gramian"):
        hybrid.weights(torch.eye(3, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(NonFiniteError):
        hybrid.weights(gramian, torch.tensor([1.0, float("inf")], dtype=F64))
    late = IMTL()
    late.setup(2)
    assert late.scaling.log_scales.shape == (2,)


@pytest.mark.parametrize("kind", ["imtl_g", "imtl"])
@pytest.mark.parametrize("features", [False, True])
def test_engine_routes(kind: str, features: bool) -> None:
    model = tiny_hps()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=gen, dtype=F64)
    y = torch.randn(11, 3, generator=gen, dtype=F64)

    def make() -> IMTLG:
        return IMTLG() if kind == "imtl_g" else IMTL(num_tasks=3, init=0.3)

    if features:
        losses, z = task_losses(model, x, y, features=True)
        inputs = [z]
    else:
        losses = task_losses(model, x, y)
        inputs = list(model.shared_parameters())
    jac = mtlkit.jacobian(losses, inputs)
    values = torch.stack(losses).detach()
    expected = make().weights(jac @ jac.T, values)
    params = list(model.parameters())
    grads = torch.autograd.grad((expected * torch.stack(losses)).sum(), params, retain_graph=True)
    method = make()
    if features:
        returned = mtlkit.backward(losses, method=method, features=z)
    else:
        returned = mtlkit.backward(losses, inputs, method)
    torch.testing.assert_close(returned.weights, expected)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    if kind == "imtl":  # the scales got the gradient of Σ e^{s} L - s
        expected_scale_grad = (torch.exp(torch.tensor(0.3)) * values.float() - 1).float()
        torch.testing.assert_close(method.scaling.log_scales.grad, expected_scale_grad)
