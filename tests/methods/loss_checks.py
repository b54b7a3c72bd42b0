"""Shared test tools for loss weightings: both routes of the engine on the tiny model, and the
state-dict round trip and ``reset`` of stateful methods, driven by a script of hook calls."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import torch
from conftest import task_losses, tiny_hps
from method_checks import one_call_backward
from torch import Tensor

from mtlkit.methods import LossWeighting

F64 = torch.float64
Event = tuple  # ("loss", [m] tensor) | ("epoch",) | ("after", [m] tensor)


def drive(method: LossWeighting, events: Sequence[Event]) -> list[Tensor]:
    """Apply the events in order; return the weights of every ``"loss"`` event."""
    out = []
    for event in events:
        if event[0] == "loss":
            out.append(method(event[1]).weights.detach().clone())
        elif event[0] == "epoch":
            method.on_epoch_end(0)
        elif event[0] == "after":
            method.after_step(event[1])
        else:  # pragma: no cover - test bug
            raise ValueError(event)
    return out


def random_events(seed: int, m: int, steps: int, epoch_every: int = 0, after: bool = False):
    """Positive losses in (0.1, 3) with an ``"epoch"`` every ``epoch_every`` steps and, when
    ``after``, an ``"after"`` event (a slightly smaller loss) after each step."""
    gen = torch.Generator().manual_seed(seed)
    events: list[Event] = []
    for step in range(steps):
        losses = 0.1 + 2.9 * torch.rand(m, generator=gen, dtype=F64)
        events.append(("loss", losses))
        if after:
            events.append(("after", losses * (0.5 + 0.5 * torch.rand(m, generator=gen, dtype=F64))))
        if epoch_every and (step + 1) % epoch_every == 0:
            events.append(("epoch",))
    return events


def saved_and_loaded(state: dict) -> dict:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)`` (checkpoints)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def check_round_trip(
    make: Callable[[], LossWeighting], history: Sequence[Event], future: Sequence[Event]
) -> None:
    """A method that went through ``history``, saved and loaded into a fresh ``make()`` (not set
    up), gives the same weights as the original on ``future``."""
    original = make()
    drive(original, history)
    restored = make()
    restored.load_state_dict(saved_and_loaded(original.state_dict()))
    expected = drive(original, future)
    got = drive(restored, future)
    assert len(expected) == len(got) > 0
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def assert_same_state(got: object, expected: object, where: str = "state") -> None:
    """Equal nested state (tensors bit for bit, e.g. the generator and the Adam moments)."""
    if isinstance(expected, Tensor):
        assert isinstance(got, Tensor) and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key, value in expected.items():
            assert_same_state(got[key], value, f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, type(expected)) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same_state(g, e, f"{where}[{i}]")
    else:
        assert got == expected, where


def check_reset(make: Callable[[], LossWeighting], history: Sequence[Event], m: int) -> None:
    """After ``history`` and ``reset()``, the state equals a fresh method's (set up for ``m``)
    and the method replays ``history`` with the same weights."""
    method = make()
    first = drive(method, history)
    method.reset()
    fresh = make()
    fresh.setup(m)
    assert_same_state(method.state_dict(), fresh.state_dict())
    second = drive(method, history)
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def check_loss_engine_routes(make: Callable[[], LossWeighting], num_tasks: int = 3) -> None:
    """``mtlkit.backward(losses, method=make())``, without and with ``features=``, gives every
    parameter (the method's own included) the gradient of ``Σ_i w_i L_i + extra`` computed by
    hand with a twin ``make()``, returns ``w`` (detached) in its decision, and reaches the
    encoder. A method that depends on more of the step protocol (DWA, FAMO, STCH, whose hooks
    the caller drives by hand) is checked through ``method_backward`` (``one_call_backward``)."""
    for features in (False, True):
        model = tiny_hps(num_tasks=num_tasks, seed=3)
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(9, 5, generator=gen, dtype=F64)
        y = torch.randn(9, num_tasks, generator=gen, dtype=F64)
        twin, method = make(), make()
        losses, z = task_losses(model, x, y, features=True)
        stacked = torch.stack(losses)
        decision = twin(stacked)
        params = list(model.parameters())
        own = list(twin.parameters())
        expected = torch.autograd.grad(decision.total(stacked), params + own, retain_graph=True)
        engine_params = params + list(method.parameters())
        returned = one_call_backward(
            losses, method, engine_params, features=z if features else None
        )
        assert not returned.weights.requires_grad
        torch.testing.assert_close(returned.weights, decision.weights.detach(), rtol=0, atol=0)
        for p, e in zip(engine_params, expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
        encoder = list(model.shared_parameters())
        assert all(p.grad is not None for p in encoder)
        assert sum(float(p.grad.abs().sum()) for p in encoder) > 0
