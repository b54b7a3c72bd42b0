"""route="auto" in the Trainer: the loop or the Gramian route, chosen by timing both on the first
steps (mtlkit.training.route_choice), with a deterministic fake clock that the engines advance."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlkit.engine.backward as engine_backward
from mtlkit import Budget, Joint, Task, Trainer, methods
from mtlkit.architectures import HPS
from mtlkit.engine.layer_capture import LayerCapture
from mtlkit.training.optim import optimizer
from mtlkit.training.route_choice import AutoRoute

TASKS = ["a", "b", "c"]
STEPS = 2 + 3  # the loop's steps before the choice applies (trials=3)


class Costs:
    """A fake clock: the Jacobian (loop) and the layer-wise Gramian advance it by their cost."""

    def __init__(self, monkeypatch, loop: float, gramian: float) -> None:
        self.now, self.calls = 0.0, {"loop": 0, "gramian": 0}
        jacobian, task_gradients = engine_backward.jacobian, LayerCapture.task_gradients

        def timed_jacobian(*args, **kwargs):
            self.now += loop
            self.calls["loop"] += 1
            return jacobian(*args, **kwargs)

        def timed_gramian(capture, *args, **kwargs):
            self.now += gramian
            self.calls["gramian"] += 1
            return task_gradients(capture, *args, **kwargs)

        monkeypatch.setattr(engine_backward, "jacobian", timed_jacobian)
        monkeypatch.setattr(LayerCapture, "task_gradients", timed_gramian)

    def __call__(self) -> float:
        return self.now


def batches(count=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(count * 16, 6, generator=g)
    y = {t: torch.randn(count * 16, 1, generator=g) for t in TASKS}
    return [(x[i * 16 : (i + 1) * 16], {t: v[i * 16 : (i + 1) * 16] for t, v in y.items()})
            for i in range(count)]  # fmt: skip


def trainer(route="auto", steps=8, inplace=False, method=None, **kwargs):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 8), nn.Tanh())
    model = HPS(encoder, {t: nn.Linear(8, 1) for t in TASKS})
    tasks = [Task(t, F.mse_loss) for t in TASKS]
    strategy = Joint(method if method is not None else methods.PCGrad(generator=4))
    return Trainer(model, tasks, strategy, optimizer("sgd", lr=0.05), budget=Budget(steps=steps),
                   route=route, progress=False, track_exploration=False, **kwargs)  # fmt: skip


def fit(run, clock=None, cache=None):
    data = batches()
    run.validate(data)
    auto = run.strategy.context.auto_route
    if auto is not None:
        auto.cache = {} if cache is None else cache
        if clock is not None:
            auto.clock = clock
            clock.calls = dict.fromkeys(clock.calls, 0)  # count the training steps' calls only
    run.fit(data)
    return auto


def weights(run):
    return [p.detach().clone() for p in run.model.parameters()]


def test_the_faster_route_is_kept_and_the_first_steps_are_the_loops(monkeypatch):
    costs = Costs(monkeypatch, loop=2.0, gramian=1.0)
    run = trainer()
    auto = fit(run, costs)
    assert auto.choice == "gramian"
    assert auto.seconds == {"loop": [2.0] * 3, "gramian": [1.0] * 3}
    # the loop on steps 0-4; the Gramian as a trial on steps 1-4 (step 1 untimed, checked
    # against J Jᵀ), then for the update from step 5 on
    assert costs.calls == {"loop": STEPS, "gramian": 4 + (8 - STEPS)}
    summary = run.summary()["route"]
    assert summary["requested"] == "auto" and summary["measured"]["choice"] == "gramian"
    assert "2000.000 ms (loop), 1000.000 ms (gramian)" in summary["measured"]["reason"]
    json.dumps(summary)  # summary.json takes it
    # the measured steps trained as the loop does: the trials left no trace (PCGrad's generator,
    # the gradients, the method's state)
    pinned, measured = trainer("loop", steps=STEPS), trainer(steps=STEPS)
    fit(pinned)
    fit(measured, Costs(monkeypatch, loop=2.0, gramian=1.0))
    assert all(torch.equal(a, b) for a, b in zip(weights(pinned), weights(measured)))


def test_a_gramian_route_not_clearly_faster_keeps_the_loop_and_removes_the_hooks(monkeypatch):
    costs = Costs(monkeypatch, loop=2.0, gramian=1.9)  # within the 0.9 margin
    run = trainer()
    auto = fit(run, costs)
    assert auto.choice == "loop" and auto.capture is None
    assert all(not m._forward_hooks for m in run.model.modules())
    assert costs.calls["gramian"] == 4  # trials only
    pinned = trainer("loop")
    fit(pinned)
    assert all(torch.equal(a, b) for a, b in zip(weights(pinned), weights(run)))


def test_the_choice_is_cached_so_runs_in_one_process_are_equal(monkeypatch):
    cache = {}
    first = trainer()
    fit(first, Costs(monkeypatch, loop=2.0, gramian=1.0), cache)
    assert list(cache.values()) == ["gramian"]
    second = trainer()
    costs = Costs(monkeypatch, loop=1.0, gramian=5.0)  # would choose the loop
    auto = fit(second, costs, cache)
    assert auto.choice == "gramian" and auto.reason.startswith("cached")
    assert auto.seconds == {"loop": [], "gramian": []}
    assert all(torch.equal(a, b) for a, b in zip(weights(first), weights(second)))


def test_a_model_the_gramian_route_cannot_take_keeps_the_loop(monkeypatch):
    run = trainer(inplace=True)  # ReLU(inplace=True) modifies a captured output
    auto = fit(run, Costs(monkeypatch, loop=2.0, gramian=1.0))
    assert auto.choice == "loop" and "cannot take this model" in auto.reason
    pinned = trainer("loop", inplace=True)
    fit(pinned)
    assert all(torch.equal(a, b) for a, b in zip(weights(pinned), weights(run)))


def test_a_shared_part_without_linear_layers_keeps_the_loop():
    """The layer-wise Gramian records nn.Linear layers only: a convolutional encoder has none,
    so there is nothing to measure (the CNN of benchmarks/bench_route.py ended its measurement
    with no trial and raised StatisticsError)."""

    def conv_trainer(route):
        run = trainer(route)
        encoder = nn.Sequential(
            nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Tanh()
        )
        run.model.encoder = encoder
        return run

    run = conv_trainer("auto")
    auto = fit(run)
    assert auto.choice == "loop" and "no nn.Linear layer" in auto.reason
    pinned = conv_trainer("loop")
    fit(pinned)
    assert all(torch.equal(a, b) for a, b in zip(weights(pinned), weights(run)))


def test_other_methods_are_not_measured():
    for method in (methods.EW(), methods.get("graddrop")):
        run = trainer(method=method, steps=2)
        fit(run)
        assert run.route_choice() == {"requested": "auto", "measured": None}


def test_a_resumed_run_keeps_the_choice(monkeypatch, tmp_path):
    run = trainer(steps=7, out_dir=tmp_path, checkpoint_every=1)
    fit(run, Costs(monkeypatch, loop=2.0, gramian=1.0))
    resumed = trainer(steps=8, out_dir=tmp_path)
    data = batches()
    resumed.validate(data)
    auto = resumed.strategy.context.auto_route
    auto.cache, auto.clock = {}, Costs(monkeypatch, loop=1.0, gramian=5.0)
    resumed.fit(data, resume=True)
    assert auto.choice == "gramian" and auto.seconds["gramian"] == [1.0] * 3
    assert auto.capture is not None  # the hooks came back before the resumed forward pass
    state = auto.state_dict()
    again = AutoRoute(resumed.model, list(resumed.model.shared_parameters()), torch.device("cpu"))
    again.load_state_dict(state)
    assert again.choice == "gramian" and again.capture is not None
    with pytest.raises(ValueError, match="route choice must be"):
        again.load_state_dict({**state, "choice": "fast"})
