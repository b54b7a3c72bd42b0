"""One contract over every registered method (a new method is covered by registering it):
decisions of the right shape and finite on normal, low-rank, conflicting, zero and badly scaled
inputs; the direction is the decision's weights times J where the method has weights; the
losses matter only to the methods that declare ``needs_losses``; state_dict round trip;
``reset``; determinism under a seed; ``repr`` round-trips the constructor arguments."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlkit.engine.contract import Decision, WeightedLoss
from mtlkit.methods import METHODS
from mtlkit.methods.base import StepProbe, constructor_arguments

F64 = torch.float64
NAMES = METHODS.available()


def _tasks(name: str) -> int:
    return {"krum": 4, "ngdiff": 2}.get(name, 3)


def _build(name: str):
    kwargs = {}
    arguments = {a.name for a in METHODS.arguments(name)}
    if "generator" in arguments:
        kwargs["generator"] = 7
    if name in ("constant", "ls"):
        kwargs["weights"] = [1.0, 2.0, 0.5]
    method = METHODS.get(name, **kwargs).double()
    method.setup(_tasks(name))
    return method


def _jacobians(m: int, n: int = 10) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    normal = torch.randn(m, n, generator=gen, dtype=F64)
    direction = torch.randn(n, generator=gen, dtype=F64)
    scales = torch.logspace(-3, 3, m, dtype=F64)
    conflicting = normal.clone()
    conflicting[1] = -conflicting[0] + 1e-3 * conflicting[1]
    return {
        "normal": normal,
        "low_rank": torch.outer(torch.linspace(0.5, 2.0, m, dtype=F64), direction),
        "conflicting": conflicting,
        "zero": torch.zeros(m, n, dtype=F64),
        "badly_scaled": scales[:, None] * normal,
    }


def _losses(m: int, seed: int = 5) -> torch.Tensor:
    return torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5


def _probe(m: int) -> StepProbe:
    """A probe on losses ``c_i exp(a_i · x)`` of four parameters, one ``(a, c)`` per batch."""
    gen = torch.Generator().manual_seed(13)
    directions = torch.randn(2, m, 4, generator=gen, dtype=F64)
    scales = torch.rand(2, m, generator=gen, dtype=F64) + 0.5
    x = torch.zeros(4, dtype=F64, requires_grad=True)
    return StepProbe(
        batch=0,
        extra=[1],
        parameters=[x],
        learning_rate=1e-2,
        compute=lambda b: list((scales[b] * torch.exp(directions[b] @ x)).unbind()),
    )


def _prime(method, m: int, n: int = 10) -> None:
    """What the step driver gives before a call: the probe, the extra batches' Jacobians."""
    if method.needs_probe:
        method.prepare(_probe(m))
    elif method.kind == "gradient" and method.extra_batches:
        gen = torch.Generator().manual_seed(11)
        method.observe_extra(
            [torch.randn(m, n, generator=gen, dtype=F64) for _ in range(method.extra_batches)]
        )


def _decide(method, jac: torch.Tensor, losses: torch.Tensor):
    _prime(method, jac.shape[0], jac.shape[1])
    if method.kind == "gradient":
        return method.aggregate(jac, losses, blocks=[4, jac.shape[1] - 4])
    return method(losses)


def _values(decision) -> list[torch.Tensor]:
    if isinstance(decision, WeightedLoss):
        return [decision.weights.detach()]
    return [
        t for t in (decision.direction, decision.weights, decision.head_weights) if t is not None
    ]


@pytest.mark.parametrize("name", NAMES)
def test_decisions_are_finite_and_shaped(name):
    m = _tasks(name)
    for case, jac in _jacobians(m).items():
        method = _build(name)
        decision = _decide(method, jac, _losses(m))
        if method.kind == "gradient":
            assert isinstance(decision, Decision), case
            assert decision.direction.shape == (jac.shape[1],), case
            if decision.weights is not None:
                assert decision.weights.shape == (m,), case
            if getattr(method, "gramian_weighting", False) and decision.weights is not None:
                expected = decision.weights.to(jac.dtype) @ jac
                scale = float(jac.abs().max()) + 1.0
                torch.testing.assert_close(
                    decision.direction, expected, rtol=1e-6, atol=1e-9 * scale
                )
        else:
            assert isinstance(decision, WeightedLoss) and decision.weights.shape == (m,), case
        for value in _values(decision):
            assert torch.isfinite(value).all(), (case, value)


@pytest.mark.parametrize("name", NAMES)
def test_losses_matter_only_when_declared(name):
    method = _build(name)
    if method.kind != "gradient" or method.needs_losses:
        pytest.skip("a loss weighting, or a method that declares needs_losses")
    m = _tasks(name)
    jac = _jacobians(m)["normal"]
    a, b = copy.deepcopy(method), copy.deepcopy(method)
    first = _decide(a, jac, _losses(m, seed=1))
    second = _decide(b, jac, _losses(m, seed=2) * 10)
    for x, y in zip(_values(first), _values(second), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _run(method, m: int, steps: int) -> list[list[torch.Tensor]]:
    jacs = [
        torch.randn(m, 10, generator=torch.Generator().manual_seed(s), dtype=F64)
        for s in range(steps)
    ]
    return [_values(_decide(method, jac, _losses(m, seed=s))) for s, jac in enumerate(jacs)]


def _assert_same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    m = _tasks(name)
    method = _build(name)
    _run(method, m, 3)
    twin = _build(name)
    twin.load_state_dict(copy.deepcopy(method.state_dict()))
    _assert_same(_run(method, m, 3), _run(twin, m, 3))


@pytest.mark.parametrize("name", NAMES)
def test_reset_returns_to_the_constructed_state(name):
    m = _tasks(name)
    method = _build(name)
    _run(method, m, 3)
    method.reset()
    method.setup(m)
    _assert_same(_run(method, m, 3), _run(_build(name), m, 3))


@pytest.mark.parametrize("name", NAMES)
def test_seeded_methods_are_deterministic(name):
    m = _tasks(name)
    _assert_same(_run(_build(name), m, 3), _run(_build(name), m, 3))


@pytest.mark.parametrize("name", NAMES)
def test_repr_round_trips_the_constructor_arguments(name):
    method = _build(name)
    hparams = method.hparams()
    assert list(hparams) == constructor_arguments(type(method))  # every argument, in order
    again = METHODS.get(name, **hparams)
    assert repr(again) == repr(method)
    assert repr(method).startswith(type(method).__name__ + "(")


def test_an_aggregator_written_against_forward_is_refused_at_definition():
    from mtlkit.methods.base import GradientAggregator

    with pytest.raises(TypeError, match=r"OldStyle overrides forward\(\).*aggregate\(jacobian"):

        class OldStyle(GradientAggregator):
            def forward(self, jacobian, losses=None, blocks=None):
                return jacobian.sum(dim=0)

    class NewStyle(GradientAggregator):
        def aggregate(self, jacobian, losses=None, blocks=None):
            return Decision(direction=jacobian.sum(dim=0))

    jac = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    torch.testing.assert_close(NewStyle()(jac), torch.tensor([4.0, 1.0]))


def test_hparams_come_from_the_constructor_and_name_what_is_not_kept():
    from mtlkit.methods.base import GramianWeighting

    class Scaled(GramianWeighting):
        def __init__(self, scale: float = 2.0, num_tasks: int | None = None) -> None:
            super().__init__()
            self.scale = scale

        def weights(self, gramian, losses=None):
            return torch.full((gramian.shape[0],), self.scale)

    assert Scaled(3.5).hparams() == {"scale": 3.5}  # num_tasks is fixed by setup, not shown
    assert repr(Scaled(3.5)) == "Scaled(scale=3.5)"

    class Forgets(GramianWeighting):
        def __init__(self, beta: float = 0.5) -> None:
            super().__init__()
            self._beta = beta

    with pytest.raises(TypeError, match=r"Forgets: the constructor argument 'beta' is not kept"):
        Forgets().hparams()
