"""Shared test tools for stateful aggregators: several steps through the engine against a twin
that sees the same Jacobians (with the engine's ``blocks``), and ``state_dict`` round trips."""

from __future__ import annotations

from collections.abc import Callable

import torch
from conftest import task_losses, tiny_hps
from torch import Tensor

from mtlkit.engine.backward import method_backward
from mtlkit.methods import GradientAggregator

Prime = Callable[[GradientAggregator, int], None]


def check_route_steps(
    make: Callable[[], GradientAggregator],
    features: bool = False,
    steps: int = 3,
    num_tasks: int = 3,
    prime: Prime | None = None,
) -> None:
    """``steps`` calls of ``mtlkit.backward`` with one method match a twin fed the reference
    Jacobian, ``blocks`` and losses of each step: shared tensors get the twin's direction, heads
    the gradient of ``Σ w_i L_i`` (``w`` the twin's head weights, else its weights, else ones).
    ``prime(method, k)`` runs before step ``k`` on both (e.g. ``observe_extra``)."""
    model = tiny_hps(num_tasks=num_tasks, seed=3)
    encoder = list(model.shared_parameters())
    heads = list(model.heads.parameters())
    method, twin = make(), make()
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(9, num_tasks, generator=gen, dtype=torch.float64)
        losses, z = task_losses(model, x, y, features=True)
        inputs = [z] if features else encoder
        rows = [torch.autograd.grad(loss, inputs, retain_graph=True) for loss in losses]
        jac = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
        blocks = [t.numel() for t in inputs]
        if prime is not None:
            prime(twin, step)
            prime(method, step)
        decision = twin.aggregate(jac, torch.stack(losses).detach(), blocks)
        direction, weights = decision.direction, decision.weights
        heads_w = decision.head_weights if decision.head_weights is not None else weights
        w = torch.ones(num_tasks, dtype=torch.float64) if heads_w is None else heads_w.detach()
        expected_heads = torch.autograd.grad(
            (w * torch.stack(losses)).sum(), heads, retain_graph=True
        )
        if features:
            expected = torch.autograd.grad(z, encoder, direction.view_as(z), retain_graph=True)
        else:
            expected = [direction]
        model.zero_grad()
        returned = method_backward(  # the hooks are primed by hand here
            losses,
            shared=None if features else encoder,
            method=method,
            features=z if features else None,
        )
        assert (returned.weights is None) == (weights is None)
        if weights is not None:
            torch.testing.assert_close(returned.weights, weights, rtol=1e-12, atol=1e-14)
        got = torch.cat([p.grad.reshape(-1) for p in encoder])
        torch.testing.assert_close(
            got, torch.cat([e.reshape(-1) for e in expected]), rtol=1e-10, atol=1e-12
        )
        for p, e in zip(heads, expected_heads):
            torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def check_state_round_trip(
    make: Callable[[], GradientAggregator],
    jacobians: list[Tensor],
    losses: Tensor | None = None,
    blocks: list[int] | None = None,
    prime: Prime | None = None,
) -> None:
    """State saved after all but the last step, loaded into a fresh method, reproduces the last
    step exactly; ``reset()`` reproduces the first step."""
    method = make()
    outputs = []
    state = None
    for k, jac in enumerate(jacobians):
        if k == len(jacobians) - 1:
            state = {
                key: value.clone() if isinstance(value, Tensor) else value
                for key, value in method.state_dict().items()
            }
        if prime is not None:
            prime(method, k)
        outputs.append(method(jac, losses, blocks))
    fresh = make()
    fresh.load_state_dict(state)
    if prime is not None:
        prime(fresh, len(jacobians) - 1)
    assert torch.equal(fresh(jacobians[-1], losses, blocks), outputs[-1])
    method.reset()
    if prime is not None:
        prime(method, 0)
    assert torch.equal(method(jacobians[0], losses, blocks), outputs[0])
