"""The step driver (``mtlkit.Step``): a user's own loop trains every method as the Trainer does;
``mtlkit.backward`` refuses the methods that need more than one call; the README's own-loop
example runs for every registered method."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_hps

import mtlkit
from mtlkit import Budget, Joint, Step, Task, Trainer, methods
from mtlkit.errors import ConfigError
from mtlkit.methods import METHODS

TASKS = ["t0", "t1", "t2"]


def _batches(count: int = 6, size: int = 8, seed: int = 4) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(size, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(size, 3, generator=gen, dtype=torch.float64).abs() + 0.1
        out.append((x, {t: y[:, i] for i, t in enumerate(TASKS)}))
    return out


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output.squeeze(-1) - target) ** 2).mean()


def _own_loop(method, batches, epochs: int, lr: float = 1e-2):
    """The README's own loop with the driver: Adam over the model, one step per batch."""
    model = tiny_hps(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def task_losses(batch):
        x, y = batch
        outputs = model(x)
        return {t: _mse(outputs[t], y[t]) for t in TASKS}

    step = Step(method, optimizer, task_losses, shared=model.shared_parameters())
    for _ in range(epochs):
        for batch in batches:
            step(batch)
        step.end_epoch()
    return model, method


def _trainer(method, batches, epochs: int, lr: float = 1e-2):
    model = tiny_hps(seed=0)
    tasks = [Task(t, _mse) for t in TASKS]

    def factory(params):
        return torch.optim.Adam(params, lr=lr), None

    trainer = Trainer(
        model,
        tasks,
        Joint(method),
        factory,
        budget=Budget(epochs=epochs),
        select="last",
        progress=False,
        track_exploration=False,
    )
    trainer.fit(batches)
    return model, trainer.strategy.methods()[0]


def _state(method) -> dict:
    return {k: v.clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("famo", {}),  # adapts in after_step(losses after the step)
        ("dwa", {}),  # weights from the previous epochs' losses (on_epoch_end)
        ("gradnorm", {}),  # learns its weights from the gradient norms
        ("stch", {"warmup_epochs": 1}),  # a warm-up counted in epochs
        ("slaw", {}),
        ("uw", {}),  # learnable parameters the driver adds to the user's optimizer
        ("mgda", {}),
    ],
)
def test_own_loop_equals_the_trainer(name, args):
    batches = _batches()
    epochs = 3
    own_model, own = _own_loop(METHODS.get(name, **args), batches, epochs)
    ref_model, ref = _trainer(METHODS.get(name, **args), batches, epochs)
    own_state, ref_state = _state(own), _state(ref)
    assert own_state.keys() == ref_state.keys()
    for key in ref_state:
        torch.testing.assert_close(own_state[key], ref_state[key], rtol=1e-9, atol=1e-12)
    for a, b in zip(own_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_famo_adapts_in_the_own_loop():
    """The bug this driver fixes: FAMO's weights never moved in a hand-written loop."""
    method = methods.FAMO()
    _own_loop(method, _batches(), epochs=1)
    weights = method(torch.ones(3, dtype=torch.float64)).weights
    assert not torch.allclose(weights, torch.full_like(weights, weights.mean()))


def test_dwa_state_moves_with_epochs():
    method = methods.DWA()
    _own_loop(method, _batches(), epochs=3)
    loss = torch.ones(3, dtype=torch.float64)
    assert not torch.allclose(method(loss).weights, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("famo", {}),
        ("dwa", {}),
        ("stch", {}),
        ("modo", {}),
        ("sdmgrad", {}),
        ("ngdiff", {"adaptive_lr": True}),
        ("auto_lambda", {}),
        ("forum", {}),
    ],
)
def test_backward_refuses_methods_that_need_the_protocol(name, kwargs):
    model = tiny_hps()
    x, y = _batches(1)[0]
    out = model(x)
    losses = [_mse(out[t], y[t]) for t in TASKS]
    method = METHODS.get(name, **kwargs)
    assert method.protocol()
    with pytest.raises(ConfigError, match=r"mtlkit\.Step"):
        mtlkit.backward(losses, shared=model.shared_parameters(), method=method)
    assert all(p.grad is None for p in model.parameters())  # refused before any backward


def test_ngdiff_needs_its_probe_only_with_the_adaptive_learning_rate():
    assert methods.NGDiff().protocol() == ()
    assert methods.NGDiff(adaptive_lr=True).protocol() == ("prepare",)
    assert methods.AutoLambda().protocol()[0] == "prepare"


@pytest.mark.parametrize("name", ["ew", "uw", "mgda", "upgrad", "pcgrad", "cagrad", "imtl_l"])
def test_backward_takes_methods_of_one_call(name):
    method = METHODS.get(name)
    assert method.protocol() == ()
    method.setup(3)
    model = tiny_hps()
    x, y = _batches(1)[0]
    out = model(x)
    decision = mtlkit.backward(
        [_mse(out[t], y[t]) for t in TASKS], shared=model.shared_parameters(), method=method
    )
    assert all(p.grad is not None for p in model.shared_parameters())
    if decision.weights is not None:
        assert decision.weights.shape == (3,) and not decision.weights.requires_grad


def test_protocol_names_the_hooks():
    assert methods.FAMO().protocol() == ("after_step",)
    assert methods.DWA().protocol() == ("on_epoch_end",)
    assert "extra_batches" in methods.MoDo().protocol()
    assert methods.get("auto_lambda").protocol() == ("prepare", "extra_batches")
    assert methods.get("smoothed", inner="modo").protocol() == ("extra_batches",)
    assert methods.get("smoothed", inner="mgda").protocol() == ()


def _readme_loop(method, tasks: int, steps: int = 3) -> tuple:
    """The README's own-loop example, with an extra loader for the methods that need one."""
    torch.manual_seed(0)
    names = [f"t{i}" for i in range(tasks)]
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh())
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(8, 1) for t in names})
    optimizer = torch.optim.SGD([*encoder.parameters(), *heads.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(8, 5, generator=gen), torch.rand(8, tasks, generator=gen) + 0.1)
        for _ in range(6)
    ]

    def task_losses(batch):
        x, y = batch
        z = encoder(x)
        return [_mse(heads[t](z), y[:, i]) for i, t in enumerate(names)]

    step = Step(method, optimizer, task_losses, shared=encoder.parameters(), extra_batches=batches)
    before = [p.detach().clone() for p in encoder.parameters()]
    results = [step(batches[i % len(batches)]) for i in range(steps)]
    step.end_epoch()
    results.append(step(batches[0]))
    return before, list(encoder.parameters()), results


@pytest.mark.parametrize("name", METHODS.available())
def test_readme_own_loop_runs_every_method(name):
    tasks = {"krum": 4, "ngdiff": 2}.get(name, 3)  # Krum needs 4 tasks, NGDiff exactly 2
    kwargs = {}
    if any(a.name == "min_loss" for a in METHODS.arguments(name)):
        kwargs["min_loss"] = [0.0] * tasks  # squared errors are >= 0
    if name in ("constant", "ls"):
        kwargs["weights"] = [1.0, 2.0, 0.5]
    method = METHODS.get(name, **kwargs)
    before, after, results = _readme_loop(method, tasks)
    assert len(results) == 4 and all(r.stepped for r in results)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the encoder trained
    for r in results:
        assert set(r.losses) == {str(i) for i in range(tasks)}
        assert all(torch.isfinite(torch.tensor(v)) for v in r.weights.values())


def test_step_adds_learnable_method_parameters_to_the_optimizer():
    model = tiny_hps()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = methods.UW()
    x, y = _batches(1)[0]
    step = Step(method, optimizer, lambda b: [_mse(model(b[0])[t], b[1][t]) for t in TASKS])
    step((x, y))
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(method.log_vars) in held and method.log_vars.grad is not None
    start = method.log_vars.detach().clone()
    step((x, y))
    assert not torch.equal(method.log_vars.detach(), start)


def test_step_errors_name_what_is_missing():
    model = tiny_hps()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="shared="):
        Step(methods.MGDA(), opt, lambda b: b)
    with pytest.raises(ConfigError, match="extra_batches="):
        Step(methods.MoDo(), opt, lambda b: b, shared=model.shared_parameters())
    step = Step(methods.EW(), opt, lambda b: "not losses")
    with pytest.raises(ConfigError, match="list of scalar task losses"):
        step(None)


def test_step_state_dict_round_trip_continues_identically():
    batches = _batches()
    method = methods.FAMO()
    model = tiny_hps()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def losses(b):
        out = model(b[0])
        return [_mse(out[t], b[1][t]) for t in TASKS]

    step = Step(method, opt, losses, shared=model.shared_parameters())
    for b in batches[:3]:
        step(b)
    saved = copy.deepcopy(step.state_dict())
    twin = Step(methods.FAMO(), opt, losses, shared=model.shared_parameters())
    twin.load_state_dict(saved)
    assert twin.index == 3 and _state(twin.method).keys() == _state(method).keys()
    for key, value in _state(method).items():
        torch.testing.assert_close(_state(twin.method)[key], value)


def test_nan_gradient_raises_for_a_loss_weighting_in_the_own_loop():
    """Issue 27 item 10: a finite loss with a NaN gradient is refused for every method."""
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([weight], lr=0.1)

    def losses(_):
        nan_grad = torch.sqrt(weight[0] - 1.0)  # finite value 0, gradient inf at 0
        return [nan_grad, (weight**2).sum()]

    for method in (methods.EW(), methods.FAMO(min_loss=[-1.0, -1.0])):
        step = Step(method, opt, losses)
        with pytest.raises(mtlkit.NonFiniteError, match="gradient"):
            step(None)
        assert torch.equal(weight.detach(), torch.tensor([1.0, 2.0]))  # no step was taken
