"""Trainer plumbing shared by methods and architectures: independent extra batches for methods
that ask for them, and the optional model hooks (auxiliary losses, per-step, per-epoch)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import mtlkit
from mtlkit import Budget, Joint, Trainer
from mtlkit.architectures import HPS
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods import Decision, GradientAggregator
from mtlkit.metrics import MeanSquaredError
from mtlkit.tasks import Task
from mtlkit.training.batches import BatchStream
from mtlkit.training.optim import optimizer

TASKS = [
    Task(
        f"t{i}", lambda out, y, i=i: ((out.squeeze(-1) - y) ** 2).mean(), {"mse": MeanSquaredError}
    )
    for i in range(2)
]


class Targets(TensorDataset):
    """(x, {t0: y0, t1: y1}) samples."""

    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        return x, {"t0": y[0], "t1": y[1]}


def data(n: int = 40, seed: int = 0) -> Targets:
    gen = torch.Generator().manual_seed(seed)
    return Targets(torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen))


def model(seed: int = 0) -> HPS:
    torch.manual_seed(seed)
    return HPS(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), {t.name: nn.Linear(4, 1) for t in TASKS})


class RecordingExtra(GradientAggregator):
    """The mean direction; records the extra Jacobians it observes."""

    extra_batches = 2

    def __init__(self) -> None:
        super().__init__()
        self.observed: list[list[Tensor]] = []

    def observe_extra(self, jacobians: Sequence[Tensor]) -> None:
        self.observed.append([j.clone() for j in jacobians])

    def aggregate(self, jacobian: Tensor, losses=None, blocks=None) -> Decision:
        assert len(self.observed[-1]) == 2 and self.observed[-1][0].shape == jacobian.shape
        return Decision(direction=jacobian.mean(dim=0))


def loader(dataset, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def frozen(params):
    return torch.optim.SGD(params, lr=0.0), None


class Mean(GradientAggregator):
    def aggregate(self, jacobian: Tensor, losses=None, blocks=None) -> Decision:
        return Decision(direction=jacobian.mean(dim=0))


def test_extra_batches_come_from_an_independent_stream_and_leave_the_main_order_alone(tmp_path):
    train = data()
    method = RecordingExtra()
    net = model()
    trainer = Trainer(
        net,
        TASKS,
        Joint(method),
        frozen,
        budget=Budget(epochs=1),
        progress=False,
        out_dir=tmp_path / "extra",
    )
    trainer.fit(loader(train))
    assert len(method.observed) == 5  # 40 samples / batch 8
    # lr 0: the parameters never move, so the observed Jacobians are those of the stream's batches
    stream = BatchStream(loader(train), seed=trainer.seed + 7919)
    for observed, batches in zip(method.observed, [stream.draw(2) for _ in range(5)]):
        for jac, (x, y) in zip(observed, batches):
            out = net(x)
            losses = [TASKS[i].loss(out[t], y[t]) for i, t in enumerate(["t0", "t1"])]
            expected = mtlkit.jacobian(losses, list(net.shared_parameters()))
            torch.testing.assert_close(jac, expected)
    # each step: 1 forward of the batch + 2 extra forwards; 2 tasks x 3 batches backwards
    assert trainer.progress.passes == 15
    assert trainer.backwards == 5 * 6
    # the main batches are the loader's own order: the same losses as a run without extras
    plain = Trainer(
        model(),
        TASKS,
        Joint(Mean()),
        frozen,
        budget=Budget(epochs=1),
        progress=False,
        out_dir=tmp_path / "plain",
    )
    plain.fit(loader(train))
    steps = [(tmp_path / name / "steps.csv").read_text() for name in ("extra", "plain")]
    assert steps[0] == steps[1] and steps[0].count("\n") == 6


def test_extra_batches_are_refused_on_the_features_route():
    trainer = Trainer(model(), TASKS, Joint(RecordingExtra()), rep_grad=True, progress=False)
    with pytest.raises(ConfigError, match="rep_grad"):
        trainer.fit(loader(data()))


class HookedHPS(HPS):
    """HPS with an auxiliary loss on task t1 and counters for the step and epoch hooks."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(
            nn.Sequential(nn.Linear(3, 4), nn.Tanh()), {t.name: nn.Linear(4, 1) for t in TASKS}
        )
        self.gate = nn.Parameter(torch.tensor(2.0))
        self.steps: list[int] = []
        self.epochs: list[int] = []

    def task_parameters(self, task: str):
        yield from super().task_parameters(task)
        if task == "t1":
            yield self.gate

    def auxiliary_losses(self) -> dict[str, Tensor]:
        return {"t1": self.gate**2}

    def on_train_step(self, step: int) -> None:
        self.steps.append(step)

    def on_epoch_end(self, epoch: int) -> None:
        self.epochs.append(epoch)


@pytest.mark.parametrize("strategy", [Joint(), mtlkit.Alternating()])
def test_model_hooks_are_called_and_the_auxiliary_loss_is_optimised(strategy):
    net = HookedHPS()
    trainer = Trainer(
        net,
        TASKS,
        strategy,
        optimizer("sgd", lr=0.1, momentum=0.0),
        budget=Budget(epochs=2),
        progress=False,
    )
    trainer.fit(loader(data()))
    steps_per_batch = 1 if isinstance(strategy, Joint) else 2
    assert net.steps == list(range(1, 10 * steps_per_batch + 1))
    assert net.epochs == [1, 2]
    # only the auxiliary loss reaches the gate: SGD lr 0.1 on gate² multiplies it by 0.8 per
    # step that includes task t1 (one per batch under both strategies)
    assert float(net.gate.detach()) == pytest.approx(2.0 * 0.8**10, rel=1e-5)


def test_auxiliary_losses_must_name_known_tasks():
    class Bad(HookedHPS):
        def auxiliary_losses(self):
            return {"nope": self.gate}

    trainer = Trainer(Bad(), TASKS, progress=False, budget=Budget(epochs=1))
    with pytest.raises(MtlkitError, match="nope"):
        trainer.fit(loader(data()))


class Probing(mtlkit.methods.EW):
    """EW that inspects its probe: perturbs the parameters, evaluates, restores them."""

    needs_probe = True
    extra_batches = 1

    def __init__(self) -> None:
        super().__init__()
        self.probes: list[tuple[int, float, int, Tensor]] = []

    def prepare(self, probe) -> None:
        with torch.no_grad():
            saved = [p.detach().clone() for p in probe.parameters]
            for p in probe.parameters:
                p.add_(1.0)
            shifted = probe.losses(probe.batch)
            for p, value in zip(probe.parameters, saved):
                p.copy_(value)
        self.probes.append((len(probe.parameters), probe.learning_rate, len(probe.extra), shifted))
        # the strategies give the losses as separate scalars, not rows of a stack (per-task
        # Jacobians of stack rows would backpropagate through every task's head)
        separate = probe.loss_list(probe.batch)
        self.separate = all(
            loss.dim() == 0 and loss.grad_fn.name() not in ("UnbindBackward0", "SelectBackward0")
            for loss in separate
        )


@pytest.mark.parametrize("alternating", [False, True])
def test_probe_gives_the_step_parameters_and_restored_weights_train_like_ew(alternating):
    make = (lambda m: mtlkit.Alternating(m)) if alternating else Joint
    runs = []
    for method in (Probing(), mtlkit.methods.EW()):
        net = model()
        trainer = Trainer(
            net,
            TASKS,
            make(method),
            optimizer("sgd", lr=0.05),
            budget=Budget(epochs=1),
            progress=False,
        )
        trainer.fit(loader(data()))
        runs.append((net, trainer))
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(a, b)  # the probe restored every parameter exactly
    probing = (
        [m for m in runs[0][1].strategy.methods()] if alternating else [runs[0][1].strategy.method]
    )
    shared = 2  # encoder weight and bias
    for method in probing:
        for count, lr, extra, shifted in method.probes:
            assert count == shared + (2 if alternating else 4)  # + the step's heads
            assert lr == 0.05 and extra == 1
            assert shifted.shape == (1 if alternating else 2,)
        assert method.separate
    # the probe's two forwards are counted as passes: 5 batches x (1 + 2) per step (the extra
    # batch is drawn but this method does not evaluate it)
    steps = 2 if alternating else 1
    assert runs[0][1].progress.passes == 5 * steps * 3


def test_probe_methods_with_extra_batches_work_on_the_features_route():
    trainer = Trainer(
        model(), TASKS, Joint(Probing()), rep_grad=True, progress=False, budget=Budget(epochs=1)
    )
    trainer.fit(loader(data()))
    assert trainer.progress.steps == 5
