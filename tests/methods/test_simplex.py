"""Projection onto the simplex, and lazily-shaped method state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlkit.errors import NonFiniteError
from mtlkit.methods.simplex import project_simplex
from mtlkit.methods.state import LazyBuffers

F64 = torch.float64


def reference_projection(v: torch.Tensor, radius: float) -> torch.Tensor:
    """An independent solve of min |w - v|² s.t. w ≥ 0, Σw = radius: bisection on the threshold
    θ of w = max(v - θ, 0), whose sum decreases in θ (no sorting; SLSQP, used before, stopped
    short on e.g. v = [0, -45, 0, 0, 6e-5])."""
    low, high = float(v.min()) - radius, float(v.max())
    for _ in range(200):
        middle = (low + high) / 2
        if float((v - middle).clamp_min(0).sum()) > radius:
            low = middle
        else:
            high = middle
    return (v - (low + high) / 2).clamp_min(0)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-50, 50), min_size=1, max_size=8),
    radius=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_matches_an_independent_solver_and_kkt(values: list[float], radius: float) -> None:
    v = torch.tensor(values, dtype=F64)
    w = project_simplex(v, radius)
    assert (w >= 0).all() and float(w.sum()) == pytest.approx(radius, abs=1e-12)
    # KKT: w = max(v - θ, 0) for one θ, with v_i ≤ θ where w_i = 0
    theta = (v - w)[w > 0]
    assert torch.allclose(theta, theta[0].expand_as(theta), atol=1e-12)
    assert (v[w == 0] <= theta[0] + 1e-12).all()
    assert torch.allclose(w, reference_projection(v, radius), atol=1e-6)


def test_known_values_batches_and_idempotence() -> None:
    v = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, -1.0], [0.2, 0.3, 0.5]], dtype=F64)
    w = project_simplex(v)
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=F64)
    assert torch.allclose(w, expected, atol=1e-15)
    assert torch.equal(project_simplex(w), w)
    assert project_simplex(torch.tensor([7.0])).tolist() == [1.0]
    assert project_simplex(torch.tensor([0.1, 0.2], dtype=torch.float32)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_values_far_above_the_radius(dtype: torch.dtype) -> None:
    """SDMGrad's weights reached [8.3e21, 2.5e11] on a badly scaled trajectory (the fuzz test of
    issue 19): ``u_1 - (u_1 - 1)`` rounded to 0, no rank held and the threshold was gathered at
    index -1 (RuntimeError). The projection is a vertex there, and shifting all values by one
    constant changes nothing."""
    v = torch.tensor([8.2628e21, 2.5008e11], dtype=dtype)
    assert project_simplex(v).tolist() == [1.0, 0.0]
    tie = torch.tensor([3e30, 3e30 - 2e15, 3e30, -1.0], dtype=F64)  # 2e15 apart: far, too
    assert project_simplex(tie).tolist() == [0.5, 0.0, 0.5, 0.0]
    shifted = torch.tensor([0.2, 0.3, 0.5, -1.0], dtype=F64)
    assert torch.allclose(project_simplex(shifted + 1e6), project_simplex(shifted), atol=1e-9)


def test_bad_input() -> None:
    with pytest.raises(NonFiniteError):
        project_simplex(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="radius"):
        project_simplex(torch.tensor([1.0]), radius=0.0)
    with pytest.raises(ValueError, match="m >= 1"):
        project_simplex(torch.zeros(0))


class Holder(LazyBuffers):
    lazy_buffers = ("state",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("state", None)
        self.register_buffer("fixed", torch.zeros(2))


def test_lazy_buffers_round_trip() -> None:
    source = Holder()
    assert "state" not in source.state_dict()
    source.state = torch.arange(6.0).reshape(2, 3)
    target = Holder()
    target.load_state_dict(source.state_dict())  # created with the saved shape
    assert torch.equal(target.state, source.state)
    target.load_state_dict(Holder().state_dict())  # a saved state without it clears it
    assert target.state is None
    with pytest.raises(RuntimeError, match="fixed"):
        target.load_state_dict({})  # ordinary buffers are still required
    source.clear_lazy_buffers()
    assert source.state is None and source.to(F64).fixed.dtype == F64
