"""Nash-MTL and FairGrad: the positive solution of G w = w^(-1/α)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import check_gramian_weighting_routes
from scipy.optimize import minimize
from torch import Tensor

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.nash import FairGrad, NashMTL

F64 = torch.float64


def random_jacobian(seed: int, m: int, n: int, kind: str = "generic", dtype=F64) -> Tensor:
    """Rows of widely different norms; ``kind`` adds degeneracy."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=gen, dtype=F64)
    jac = jac * torch.exp(torch.randn(m, 1, generator=gen, dtype=F64))
    i, j = torch.randint(m, (2,), generator=gen).tolist()
    if kind == "duplicate":
        jac[i] = jac[j]
    elif kind == "collinear":
        jac[i] = 2.5 * jac[j]
    elif kind == "zero":
        jac[i] = 0
    return jac.to(dtype)


def relative_residual(gramian: Tensor, w: Tensor, alpha: float = 1.0) -> float:
    """``max_i |w_i^{1/α} (G w)_i - 1|``."""
    return float((w.pow(1 / alpha) * (gramian @ w) - 1).abs().max())


def test_registry_and_arguments() -> None:
    nash = methods.get("nash-mtl", update_weights_every=2, optim_niter=30, max_norm=0.5)
    assert isinstance(nash, NashMTL)
    assert nash.hparams() == {"update_weights_every": 2, "optim_niter": 30, "max_norm": 0.5}
    assert NashMTL().hparams() == {"update_weights_every": 1, "optim_niter": 20, "max_norm": 1.0}
    fair = methods.get("fairgrad", alpha=2.0)
    assert isinstance(fair, FairGrad)
    assert fair.hparams() == {"alpha": 2.0, "max_norm": 1.0, "max_iter": 20}
    for name, kwargs, match in [
        ("nash_mtl", {"update_weights_every": 0}, "update_weights_every"),
        ("nash_mtl", {"optim_niter": 0}, "iteration cap"),
        ("nash_mtl", {"max_norm": -1.0}, "max_norm"),
        ("fairgrad", {"alpha": 0.0}, "alpha"),
        ("fairgrad", {"alpha": float("inf")}, "alpha"),
    ]:
        with pytest.raises(ConfigError, match=match):
            methods.get(name, **kwargs)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 10),
    extra=st.integers(0, 10),
    kind=st.sampled_from(["generic", "duplicate", "collinear"]),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
)
def test_nash_solves_its_equation(seed: int, m: int, extra: int, kind: str, scale: float) -> None:
    """Without clipping, ``G α = 1/α`` to 1e-8 (relative, float64); ``|d|² = αᵀGα = m``."""
    jac = random_jacobian(seed, m, m + extra, kind) * scale
    gramian = jac @ jac.T
    method = NashMTL(max_norm=0.0)
    alpha = method.weights(gramian)
    assert bool((alpha > 0).all())
    assert relative_residual(gramian, alpha) <= 1e-8
    assert float(alpha @ gramian @ alpha) == pytest.approx(m, rel=1e-8)


@pytest.mark.parametrize(("m", "n"), [(2, 4), (4, 9), (8, 20)])
def test_nash_matches_the_papers_convex_problem(m: int, n: int) -> None:
    """Reference: scipy minimises the paper's convex function ``½ αᵀGα - Σ log α_i``, whose
    stationarity condition is ``Gα = 1/α``, from its own start."""

    def objective(a: np.ndarray, g: np.ndarray) -> tuple[float, np.ndarray]:
        return 0.5 * a @ g @ a - np.log(a).sum(), g @ a - 1 / a

    for seed in range(3):
        jac = random_jacobian(seed, m, n)
        gramian = jac @ jac.T
        result = minimize(
            objective,
            np.ones(m),
            args=(gramian.numpy(),),
            jac=True,
            method="L-BFGS-B",
            bounds=[(1e-12, None)] * m,
            options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 10000},
        )
        alpha = NashMTL(max_norm=0.0).weights(gramian).numpy()
        np.testing.assert_allclose(alpha, result.x, rtol=1e-6)


def test_nash_two_orthogonal_tasks() -> None:
    """Orthogonal gradients: α_i = 1/|g_i| and each task improves at rate g_i · d = 1/α_i."""
    jac = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64)
    method = NashMTL(max_norm=0.0)
    torch.testing.assert_close(method.weights(jac @ jac.T), torch.tensor([0.5, 2.0], dtype=F64))
    torch.testing.assert_close(jac @ method(jac), torch.tensor([2.0, 0.5], dtype=F64))


@pytest.mark.parametrize("seed", range(5))
def test_nash_direction_ignores_task_scales_and_permutations(seed: int) -> None:
    jac = random_jacobian(seed, 5, 9)
    d = NashMTL()(jac)  # clipped to norm 1 (|d|² = 5)
    assert float(d.norm()) == pytest.approx(1.0, rel=1e-12)
    scales = torch.exp(3 * torch.randn(5, 1, generator=torch.Generator().manual_seed(seed)))
    torch.testing.assert_close(NashMTL()(jac * scales.to(F64)), d, rtol=1e-8, atol=1e-10)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
    w = NashMTL().weights(jac @ jac.T)
    torch.testing.assert_close(NashMTL().weights((jac @ jac.T)[perm][:, perm]), w[perm])


def test_nash_clipping() -> None:
    jac = random_jacobian(1, 4, 6)
    unclipped = NashMTL(max_norm=0.0)(jac)
    assert float(unclipped.norm()) == pytest.approx(2.0)  # sqrt(m)
    torch.testing.assert_close(NashMTL(max_norm=0.5)(jac), unclipped / 4)
    torch.testing.assert_close(NashMTL(max_norm=10.0)(jac), unclipped)  # shorter than the bound


def test_nash_update_every_state_dict_and_reset() -> None:
    jacs = [random_jacobian(seed, 3, 5) for seed in range(5)]
    method = NashMTL(update_weights_every=2, max_norm=0.0)
    first = method.weights(jacs[0] @ jacs[0].T)
    torch.testing.assert_close(method.weights(jacs[1] @ jacs[1].T), first)  # reused
    third = method.weights(jacs[2] @ jacs[2].T)  # recomputed
    torch.testing.assert_close(third, NashMTL(max_norm=0.0).weights(jacs[2] @ jacs[2].T))
    assert method.last_solve is not None and method.last_solve.converged
    state = method.state_dict()
    clone = NashMTL(update_weights_every=2, max_norm=0.0)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.solution, method.solution)
    # both now reuse the third step's α on the fourth call
    torch.testing.assert_close(clone.weights(jacs[3] @ jacs[3].T), third)
    torch.testing.assert_close(method.weights(jacs[3] @ jacs[3].T), third)
    method.reset()
    assert method.solution is None and method.last_solve is None
    torch.testing.assert_close(
        method.weights(jacs[4] @ jacs[4].T), NashMTL(max_norm=0.0).weights(jacs[4] @ jacs[4].T)
    )


def test_nash_warm_start_uses_few_iterations() -> None:
    jac = random_jacobian(2, 8, 20)
    method = NashMTL()
    method(jac)
    method(jac * 1.01)
    assert method.last_solve is not None and method.last_solve.iterations <= 3


def test_nash_zero_gradient_and_single_task() -> None:
    jac = random_jacobian(3, 4, 7)
    jac[1] = 0
    gramian = jac @ jac.T
    alpha = NashMTL(max_norm=0.0).weights(gramian)
    assert float(alpha[1]) == 0.0
    keep = [0, 2, 3]
    assert relative_residual(gramian[keep][:, keep], alpha[keep]) <= 1e-8
    single = NashMTL(max_norm=0.0).weights(torch.tensor([[4.0]], dtype=F64))
    torch.testing.assert_close(single, torch.tensor([0.5], dtype=F64))


@pytest.mark.parametrize(
    "jac",
    [
        [[1.0, 2.0], [-2.0, -4.0]],  # opposite
        [[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]],  # 0 inside the hull of three
        [[0.0, 0.0], [0.0, 0.0]],  # all zero
    ],
)
def test_stationary_gradients_warn_and_give_zero_weights(jac: list[list[float]]) -> None:
    jac = torch.tensor(jac, dtype=F64)
    for method in (NashMTL(), FairGrad(alpha=2.0)):
        with pytest.warns(RuntimeWarning, match="Pareto-stationary"):
            decision = method.aggregate(jac)
        assert decision.weights.tolist() == [0.0] * jac.shape[0]
        assert decision.direction.tolist() == [0.0] * jac.shape[1]


def test_iteration_cap_warns() -> None:
    jac = random_jacobian(4, 10, 30)
    with pytest.warns(RuntimeWarning, match="stopped after 1 iterations"):
        NashMTL(optim_niter=1)(jac)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NashMTL()(jac)  # the default cap is enough


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_its_equation(alpha: float) -> None:
    for seed in range(5):
        jac = random_jacobian(seed, 6, 6 + seed, ["generic", "duplicate", "collinear"][seed % 3])
        gramian = jac @ jac.T
        w = FairGrad(alpha=alpha, max_norm=0.0).weights(gramian)
        assert bool((w > 0).all())
        assert relative_residual(gramian, w, alpha) <= 1e-8


def test_fairgrad_alpha_one_is_nash() -> None:
    jac = random_jacobian(5, 5, 8)
    torch.testing.assert_close(FairGrad(alpha=1.0)(jac), NashMTL()(jac))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_matches_torchjd(alpha: float) -> None:
    """torchjd's FairGrad (scipy least_squares, the paper's code) on the same Jacobians."""
    from torchjd.aggregation import FairGrad as TorchjdFairGrad

    for seed in range(3):
        jac = random_jacobian(seed, 4, 8)
        expected = TorchjdFairGrad(alpha=alpha)(jac)
        torch.testing.assert_close(
            FairGrad(alpha=alpha, max_norm=0.0)(jac), expected, rtol=1e-5, atol=1e-6
        )


def test_fairgrad_permutation_and_dtype() -> None:
    jac = random_jacobian(6, 5, 9)
    gramian = jac @ jac.T
    perm = torch.tensor([3, 0, 4, 1, 2])
    w = FairGrad(alpha=2.0).weights(gramian)
    torch.testing.assert_close(FairGrad(alpha=2.0).weights(gramian[perm][:, perm]), w[perm])
    w32 = FairGrad(alpha=2.0).weights(gramian.float())
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), w, rtol=1e-4, atol=1e-6)
    with pytest.raises(NonFiniteError):
        FairGrad().weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


@pytest.mark.parametrize("cls", [NashMTL, FairGrad])
@pytest.mark.parametrize("features", [False, True])
def test_engine_routes(problem, cls, features: bool) -> None:
    check_gramian_weighting_routes(problem, cls, features)
