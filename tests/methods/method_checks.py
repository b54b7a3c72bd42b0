"""Shared test tools for aggregators: adversarial Jacobians (hypothesis) and a check of both
routes of the engine (``mtlkit.backward`` on the shared parameters and on the features)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from conftest import task_losses, tiny_hps
from hypothesis import strategies as st
from torch import Tensor

import mtlkit
from mtlkit.engine.backward import method_backward
from mtlkit.engine.contract import Decision
from mtlkit.errors import ConfigError
from mtlkit.methods import GradientAggregator, Method

KINDS = ("generic", "collinear", "opposite", "zero", "duplicate", "huge", "tiny")


def make_jacobian(
    seed: int, m: int, n: int, kind: str = "generic", dtype: torch.dtype = torch.float64
) -> Tensor:
    """Rows of widely different norms; ``kind`` adds degeneracy or an extreme scale."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=gen, dtype=torch.float64)
    jac = jac * torch.exp(torch.randn(m, 1, generator=gen, dtype=torch.float64))
    i, j = torch.randint(m, (2,), generator=gen).tolist()
    if kind == "collinear":
        jac[i] = 2.5 * jac[j]
    elif kind == "opposite":
        jac[i] = -0.5 * jac[j]
    elif kind == "zero":
        jac[i] = 0
    elif kind == "duplicate":
        jac[i] = jac[j]
    elif kind == "huge":
        jac = jac * 1e6
    elif kind == "tiny":
        jac = jac * 1e-6
    return jac.to(dtype)


@st.composite
def jacobians(
    draw: st.DrawFn,
    min_m: int = 1,
    max_m: int = 8,
    max_n: int = 9,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
) -> Tensor:
    """Random Jacobians with m = 1, m > n, collinear, opposite, zero and duplicated rows, huge and
    tiny scales, in float32 and float64."""
    m = draw(st.integers(min_m, max_m))
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(KINDS))
    dtype = draw(st.sampled_from(dtypes))
    return make_jacobian(draw(st.integers(0, 2**31 - 1)), m, n, kind, dtype)


def flat_grads(params) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def one_call_backward(
    losses: Sequence[Tensor], method: Method, params: Sequence[Tensor], **kwargs: Any
) -> Decision:
    """``mtlkit.backward(losses, method=method, **kwargs)``. A method that depends on more of the
    step protocol (``method.protocol()``: hooks that a test drives by hand) must be refused by
    ``mtlkit.backward`` before any backward (the ``.grad`` of ``params`` unchanged); it then
    runs through :func:`~mtlkit.engine.backward.method_backward`, the same engine without that
    check."""
    if not method.protocol():
        return mtlkit.backward(losses, method=method, **kwargs)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    with pytest.raises(ConfigError, match=type(method).__name__):
        mtlkit.backward(losses, method=method, **kwargs)
    for p, grad in zip(params, before):
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)
    return method_backward(losses, method=method, **kwargs)


def check_engine_routes(make: Callable[[], GradientAggregator], num_tasks: int = 3) -> None:
    """``mtlkit.backward`` with a method from ``make()`` on both routes matches a reference: the
    shared tensors get ``method(J)`` (a twin from ``make()`` on the reference Jacobian) and the
    heads the gradient of ``Σ w_i L_i`` (``w`` the twin's weights, ones if it has none)."""
    for features in (False, True):
        model = tiny_hps(num_tasks=num_tasks, seed=3)
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(9, num_tasks, generator=gen, dtype=torch.float64)
        encoder = list(model.shared_parameters())
        heads = list(model.heads.parameters())
        losses, z = task_losses(model, x, y, features=True)
        inputs = [z] if features else encoder
        rows = [torch.autograd.grad(loss, inputs, retain_graph=True) for loss in losses]
        jac = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
        twin = make()
        decision = twin.aggregate(jac, torch.stack(losses).detach())
        direction, weights = decision.direction, decision.weights
        w = torch.ones(num_tasks, dtype=torch.float64) if weights is None else weights.detach()
        expected_heads = torch.autograd.grad(
            (w * torch.stack(losses)).sum(), heads, retain_graph=True
        )
        if features:
            expected_encoder = torch.autograd.grad(
                z, encoder, direction.view_as(z), retain_graph=True
            )
        else:
            expected_encoder = [direction]
        returned = one_call_backward(
            losses,
            make(),
            list(model.parameters()),
            shared=None if features else encoder,
            features=z if features else None,
        )
        assert (returned.weights is None) == (weights is None)
        if weights is not None:
            torch.testing.assert_close(returned.weights, weights, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            flat_grads(encoder),
            torch.cat([e.reshape(-1) for e in expected_encoder]),
            rtol=1e-10,
            atol=1e-12,
        )
        for p, e in zip(heads, expected_heads):
            torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def check_gramian_weighting_routes(problem, make: Callable[[], GradientAggregator], features: bool):
    """For a Gramian weighting, through ``mtlkit.backward`` on one route: the returned weights are
    ``make().weights(J Jᵀ, losses)`` of the Jacobian w.r.t. the shared parameters (or the
    features), and every parameter gets the gradient of ``Σ w_i L_i`` with those weights."""
    model, x, y = problem
    if features:
        losses, z = task_losses(model, x, y, features=True)
        inputs = [z]
    else:
        losses = task_losses(model, x, y)
        inputs = list(model.shared_parameters())
    jac = mtlkit.jacobian(losses, inputs)
    expected = make().weights(jac @ jac.T, torch.stack(losses).detach())
    params = list(model.parameters())
    grads = torch.autograd.grad((expected * torch.stack(losses)).sum(), params, retain_graph=True)
    if features:
        returned = mtlkit.backward(losses, method=make(), features=z)
    else:
        returned = mtlkit.backward(losses, inputs, make())
    torch.testing.assert_close(returned.weights, expected)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
