"""UPGrad and DualProj: projections onto the dual cone of the task gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jacobians import CONE_KINDS, KINDS, cone_jacobian, random_jacobian
from method_checks import check_gramian_weighting_routes
from scipy.optimize import nnls
from torch import Tensor

from mtlkit import methods
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.dual_cone import DualProj, UPGrad

F64 = torch.float64


def projection_reference(jac: Tensor, target: Tensor) -> Tensor:
    """The projection of ``Jᵀu`` onto ``{d : J d ≥ 0}`` in the parameter space, from scipy's NNLS
    on the dual: ``d = Jᵀ(u + z)`` with ``z = argmin_{z ≥ 0} |Jᵀz + Jᵀu|``."""
    a = jac.T.double().numpy()
    z, _ = nnls(a, -a @ target.double().numpy(), maxiter=100 * jac.shape[0])
    return torch.from_numpy(a @ (target.double().numpy() + z))


def assert_non_conflicting(jac: Tensor, weights: Tensor, rtol: float) -> None:
    jac, weights = jac.double(), weights.double()
    scale = float((jac @ jac.T).diagonal().max()) or 1.0
    assert float((jac @ (weights @ jac)).min()) >= -rtol * scale * (1 + float(weights.abs().sum()))


def test_registry_and_arguments() -> None:
    assert isinstance(methods.get("upgrad"), UPGrad)
    assert isinstance(methods.get("dualproj", pref_vector=[1, 2]), DualProj)
    method = methods.get("upgrad", pref_vector=[0.5, 0.5], reg_eps=1e-4)
    assert method.hparams() == {"pref_vector": (0.5, 0.5), "reg_eps": 1e-4}
    assert "reg_eps=0.0001" in repr(method)
    with pytest.raises(ConfigError, match="reg_eps"):
        methods.get("upgrad", reg_eps=-1.0)
    with pytest.raises(ConfigError, match="pref_vector"):
        methods.get("dualproj", pref_vector=[1.0, float("nan")])
    with pytest.raises(ValueError, match="pref_vector of 2 values for 3 tasks"):
        UPGrad(pref_vector=[1.0, 1.0]).weights(torch.eye(3, dtype=F64))


def test_two_tasks_known_values() -> None:
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    # g1/2 projected: (0.5, 0) + 0.25 g2 = (0.25, 0.25); g2/2 projected: (0, 0.5) = g2/2 + g1/2.
    upgrad = UPGrad().aggregate(jac)
    torch.testing.assert_close(upgrad.weights, torch.tensor([1.0, 0.75], dtype=F64))
    torch.testing.assert_close(upgrad.direction, torch.tensor([0.25, 0.75], dtype=F64))
    # the mean (0, 0.5) is on the cone's boundary (g1·d = 0): DualProj keeps it
    torch.testing.assert_close(DualProj().weights(jac @ jac.T), torch.full((2,), 0.5, dtype=F64))
    # with g2 = (-2, 1) the mean (-0.5, 0.5) conflicts with g1: it is projected to (0, 0.5)
    jac = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=F64)
    dualproj = DualProj().aggregate(jac)
    torch.testing.assert_close(dualproj.direction, torch.tensor([0.0, 0.5], dtype=F64))
    torch.testing.assert_close(dualproj.weights, torch.tensor([1.0, 0.5], dtype=F64))


@pytest.mark.filterwarnings("ignore:.*redone with scipy's NNLS:RuntimeWarning")  # tested apart
@pytest.mark.parametrize("method", [UPGrad(), DualProj()])
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 10),
    n=st.integers(1, 12),
    kind=st.sampled_from(KINDS),
    scale=st.sampled_from([1e-8, 1.0, 1e8]),
    dtype=st.sampled_from([torch.float32, F64]),
)
def test_directions_are_non_conflicting(
    method: UPGrad, seed: int, m: int, n: int, kind: str, scale: float, dtype: torch.dtype
) -> None:
    jac = random_jacobian(seed, m, n, kind, dtype) * scale
    decision = method.aggregate(jac)
    d = decision.direction
    assert d.dtype == dtype and bool(torch.isfinite(d).all())
    assert_non_conflicting(jac, decision.weights, 1e-10 if dtype == F64 else 1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 8),
    n=st.integers(1, 10),
    kind=st.sampled_from(KINDS),
)
def test_projections_match_nnls_in_parameter_space(seed: int, m: int, n: int, kind: str) -> None:
    jac = random_jacobian(seed, m, n, kind)
    scale = float(jac.norm(dim=1).max()) or 1.0
    eye = torch.eye(m, dtype=F64) / m
    expected = sum(projection_reference(jac, eye[i]) for i in range(m))
    torch.testing.assert_close(UPGrad()(jac), expected, rtol=0, atol=1e-9 * scale)
    mean = torch.full((m,), 1.0 / m, dtype=F64)
    torch.testing.assert_close(
        DualProj()(jac), projection_reference(jac, mean), rtol=0, atol=1e-9 * scale
    )


@pytest.mark.parametrize("seed", range(6))
def test_non_conflicting_gradients_give_the_mean(seed: int) -> None:
    jac = random_jacobian(seed, 5, 8).abs()  # all inner products >= 0
    mean = torch.full((5,), 0.2, dtype=F64)
    for method in (UPGrad(), DualProj()):
        torch.testing.assert_close(method.weights(jac @ jac.T), mean, rtol=0, atol=1e-15)
        torch.testing.assert_close(method(jac), jac.mean(dim=0), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("m", "n"), [(2, 5), (5, 10), (10, 30), (40, 100)])
def test_match_torchjd(m: int, n: int) -> None:
    """torchjd's UPGrad/DualProj (quadprog) on the same Jacobians: exact with its regularisation
    off, and with its default regularisation (reg_eps = 1e-4 on the trace-normalised Gramian)."""
    from torchjd.aggregation import DualProj as TorchjdDualProj
    from torchjd.aggregation import UPGrad as TorchjdUPGrad
    from torchjd.linalg import QuadprogProjector

    exact = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
    for seed in range(3):
        jac = random_jacobian(seed, m, n)
        scale = float(jac.norm(dim=1).max())
        atol = 1e-9 * scale
        torch.testing.assert_close(
            UPGrad()(jac), TorchjdUPGrad(projector=exact)(jac), rtol=0, atol=atol
        )
        torch.testing.assert_close(
            DualProj()(jac), TorchjdDualProj(projector=exact)(jac), rtol=0, atol=atol
        )
        torch.testing.assert_close(
            UPGrad(reg_eps=1e-4)(jac), TorchjdUPGrad()(jac), rtol=0, atol=atol
        )
        pref = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=F64)
        torch.testing.assert_close(
            DualProj(pref_vector=pref.tolist())(jac),
            TorchjdDualProj(pref_vector=pref, projector=exact)(jac),
            rtol=0,
            atol=atol,
        )


@pytest.mark.parametrize("seed", range(8))
def test_permutation_equivariance_and_scale_invariance(seed: int) -> None:
    jac = random_jacobian(seed, 6, 10)  # full rank: unique weights
    gramian = jac @ jac.T
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
    pref = torch.rand(6, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
    for cls in (UPGrad, DualProj):
        w = cls(pref_vector=pref.tolist()).weights(gramian)
        permuted = cls(pref_vector=pref[perm].tolist()).weights(gramian[perm][:, perm])
        torch.testing.assert_close(permuted, w[perm], rtol=1e-9, atol=1e-12)
        for factor in (1e-12, 1e12):
            torch.testing.assert_close(
                cls(pref_vector=pref.tolist()).weights(factor * gramian), w, rtol=1e-9, atol=1e-12
            )


def test_degenerate_inputs() -> None:
    for cls in (UPGrad, DualProj):
        method = cls()
        assert method.weights(torch.tensor([[4.0]], dtype=F64)).tolist() == [1.0]
        zero = torch.zeros(3, 3, dtype=F64)
        torch.testing.assert_close(method.weights(zero), torch.full((3,), 1 / 3, dtype=F64))
        jac = random_jacobian(0, 4, 3)
        jac[1] = 0
        decision = method.aggregate(jac)
        d = decision.direction
        assert float(decision.weights[1]) == pytest.approx(0.25)  # keeps its share u_1
        assert_non_conflicting(jac, decision.weights, 1e-10)
        assert bool(torch.isfinite(d).all())
        with pytest.raises(NonFiniteError):
            method.weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
        with pytest.raises(ValueError, match="square"):
            method.weights(torch.ones(2, 3))


def test_float32_matches_float64() -> None:
    jac = random_jacobian(3, 8, 20)
    for method in (UPGrad(), DualProj()):
        d32 = method(jac.float())
        assert d32.dtype == torch.float32
        torch.testing.assert_close(d32.double(), method(jac), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize("kind", CONE_KINDS)
@pytest.mark.parametrize(("m", "n", "rank"), [(20, 10, 10), (20, 100, 19)])
def test_float32_degenerate_cones_are_permutation_invariant(cls, kind, m, n, rank) -> None:
    """Issue 19, case 4: float32 matrices with more tasks than rank (torchjd's property tests).
    Solved from a float32 Gramian the direction moved by up to 10% (of |d|, or 2.3 times a
    thousandth of the largest gradient where d is about 0) under a row permutation and against
    the float64 solve of the same numbers; from the float64 Gramian both stay below 1e-6 of
    max(|d|, max_i |g_i| / 10) (measured: at most 3e-8)."""
    for seed in range(2):
        jac = cone_jacobian(kind, m, n, rank, seed)
        method = cls()
        direction = method(jac)
        assert direction.dtype == torch.float32
        exact = method(jac.double())  # the same float32 numbers, solved in float64
        scale = max(float(exact.norm()), 0.1 * float(jac.double().norm(dim=1).max()))
        assert float((direction.double() - exact).norm()) <= 1e-6 * scale
        for k in range(3):
            perm = torch.randperm(m, generator=torch.Generator().manual_seed(100 + k))
            moved = float((method(jac[perm]).double() - direction.double()).norm())
            assert moved <= 1e-6 * scale, (seed, k, moved / scale)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize("features", [False, True])
def test_engine_routes(problem, cls, features: bool) -> None:
    """Through ``mtlkit.backward``: every parameter gets the gradient of ``Σ w_i L_i`` with the
    weights of the Jacobian w.r.t. the shared parameters (or the features)."""
    check_gramian_weighting_routes(problem, cls, features)
