"""The on_nonfinite policy: raise | skip_step | skip_task, for a NaN/inf task loss, a NaN
gradient (injected in the backward) and a failed solver; never an update with NaN weights."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mtlkit import Alternating, Budget, Joint, Trainer, methods
from mtlkit.architectures import HPS
from mtlkit.data.benchmarks import DATASETS
from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.base import GramianWeighting
from mtlkit.methods.solvers import SolverError
from mtlkit.tasks import Task
from mtlkit.training.nonfinite import NonFiniteGuard, first_nonfinite
from mtlkit.training.optim import optimizer

FAULT_STEP = 1  # the second batch (0-based step index)
TASKS = ("left", "right", "sum")


class Faults:
    """Which task misbehaves at which step, and how (read by the tasks' losses)."""

    def __init__(self, kind: str | None = None, task: str = "left", step: int = FAULT_STEP):
        self.kind, self.task, self.step = kind, task, step
        self.current = -1

    def active(self, task: str) -> str | None:
        return self.kind if (task == self.task and self.current == self.step) else None


class PoisonGradient(torch.autograd.Function):
    """Identity forward; the backward sends NaN (a gradient fault the loss value does not
    show)."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def make_tasks(faults: Faults) -> list[Task]:
    def loss_of(name, base):
        def loss(output, target):
            value = base(output, target)
            kind = faults.active(name)
            if kind == "loss":
                return value + float("nan")
            if kind == "inf_loss":
                return value + float("inf")
            if kind == "grad":
                return PoisonGradient.apply(value)
            return value

        loss.__name__ = f"{name}_loss"
        return loss

    def regression(output, target):
        return F.mse_loss(output.squeeze(-1), (target - 9.0) / 4.0)

    bases = {"left": F.cross_entropy, "right": F.cross_entropy, "sum": regression}
    return [Task(t, loss_of(t, bases[t])) for t in TASKS]


class FailingSolver(GramianWeighting):
    """Equal weights, except that the solve 'fails' when ``faults`` says so."""

    def __init__(self, faults: Faults) -> None:
        super().__init__()
        self.faults = faults

    def weights(self, gramian, losses=None):
        if self.faults.current == self.faults.step:
            raise SolverError("DAQP failed on a projection QP: exit flag -4 (test)")
        return torch.ones(gramian.shape[0], dtype=gramian.dtype)


class Recording(Joint):
    """Joint that records the model and optimizer state around every step."""

    def __init__(self, method, faults: Faults) -> None:
        super().__init__(method)
        self.faults = faults
        self.states: list[tuple[dict, dict]] = []
        self.reports: list = []

    def step(self, batch, compute_losses, step):
        self.faults.current = step
        before = snapshot(self)
        report = super().step(batch, compute_losses, step)
        self.states.append((before, snapshot(self)))
        self.reports.append(report)
        return report


def snapshot(strategy) -> dict:
    model = strategy.context.model
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(strategy.optimizer.state_dict()["state"]),
        "method": copy.deepcopy(strategy.method.state_dict()),
    }


def setup(method, kind, policy, tmp_path=None, steps=3):
    faults = Faults(kind)
    problem = DATASETS.get("multidigits", n_train=48, n_val=16, n_test=16)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(96, 16), nn.Tanh())
    heads = {t: nn.Linear(16, k) for t, k in problem.task_outputs.items()}
    model = HPS(encoder, heads)
    if method == "solver":
        method = FailingSolver(faults)
    elif isinstance(method, str):
        method = methods.get(method)
    strategy = Recording(method, faults)
    trainer = Trainer(
        model,
        make_tasks(faults),
        strategy,
        optimizer("adam", lr=1e-2),
        budget=Budget(steps=steps),
        progress=False,
        on_nonfinite=policy,
        out_dir=tmp_path,
        track_exploration=False,
    )
    loader = DataLoader(
        problem.splits["train"], batch_size=16, generator=torch.Generator().manual_seed(0)
    )
    return trainer, strategy, loader


def equal_states(a: dict, b: dict) -> bool:
    flat_a, flat_b = _flatten(a), _flatten(b)
    return flat_a.keys() == flat_b.keys() and all(
        torch.equal(flat_a[k], flat_b[k])
        if isinstance(flat_a[k], torch.Tensor)
        else flat_a[k] == flat_b[k]
        for k in flat_a
    )


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: value}


def head_params(state: dict, task: str) -> dict:
    return {k: v for k, v in state["model"].items() if k.startswith(f"heads.{task}.")}


def all_finite(model: nn.Module) -> bool:
    return first_nonfinite(model.parameters()) is None


FAULTS = ["loss", "grad", "solver"]
COUNTER = {"loss": "nonfinite_losses", "grad": "nonfinite_gradients", "solver": "solver_failures"}


def methods_for(kind):
    return ["solver"] if kind == "solver" else ["ew", "upgrad"]


CASES = [(kind, method) for kind in FAULTS for method in methods_for(kind)]


@pytest.mark.parametrize("kind, method", CASES)
def test_raise_names_task_batch_and_step_and_leaves_the_weights(kind, method):
    trainer, strategy, loader = setup(method, kind, "raise")
    error = SolverError if kind == "solver" else NonFiniteError
    with pytest.raises(error) as caught:
        trainer.fit(loader)
    message = str(caught.value)
    assert f"batch {FAULT_STEP}, step {FAULT_STEP}" in message and "epoch 1" in message
    if kind != "solver":
        assert "'left'" in message
    if kind == "grad":
        assert "non-finite gradient of task(s) 'left'" in message
    # the failing step changed nothing: the weights are those after the previous step
    before = snapshot(strategy)
    assert equal_states(before, strategy.states[-1][1])
    assert all_finite(trainer.model)


@pytest.mark.parametrize("kind, method", CASES)
def test_skip_step_takes_no_update_and_counts_it(tmp_path, kind, method):
    trainer, strategy, loader = setup(method, kind, "skip_step", tmp_path)
    with pytest.warns(RuntimeWarning, match="on_nonfinite=skip_step: skipped a step"):
        trainer.fit(loader)
    before, after = strategy.states[FAULT_STEP]
    assert equal_states(before, after)  # model, optimizer state and method state unchanged
    for i, (b, a) in enumerate(strategy.states):
        if i != FAULT_STEP:
            assert not equal_states(b, a)  # the other steps do update
    counts = trainer.strategy.guard.counts()
    assert counts["skipped_steps"] == 1 and counts[COUNTER[kind]] == 1
    assert counts["skipped_tasks"] == {}
    assert trainer.progress.steps == 3  # a skipped step still counts toward the budget
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nonfinite"]["skipped_steps"] == 1
    assert summary["nonfinite"]["policy"] == "skip_step"
    assert all_finite(trainer.model)


@pytest.mark.parametrize("kind, method", CASES)
def test_skip_task_drops_the_faulty_task_from_the_step(tmp_path, kind, method):
    trainer, strategy, loader = setup(method, kind, "skip_task", tmp_path)
    with pytest.warns(RuntimeWarning, match="on_nonfinite=skip_task"):
        trainer.fit(loader)
    before, after = strategy.states[FAULT_STEP]
    counts = trainer.strategy.guard.counts()
    assert counts[COUNTER[kind]] == 1
    if kind == "solver":  # not a task's fault: the step is skipped
        assert equal_states(before, after)
        assert counts["skipped_steps"] == 1 and counts["skipped_tasks"] == {}
    else:
        # 'left' moved nothing; the other tasks' heads and the shared encoder did move
        assert equal_states(head_params(before, "left"), head_params(after, "left"))
        for task in ("right", "sum"):
            assert not equal_states(head_params(before, task), head_params(after, task))
        shared = {k: v for k, v in before["model"].items() if k.startswith("encoder.")}
        moved = {k: v for k, v in after["model"].items() if k.startswith("encoder.")}
        assert not equal_states(shared, moved)
        assert counts["skipped_steps"] == 0 and counts["skipped_tasks"] == {"left": 1}
        report = strategy.reports[FAULT_STEP]
        if report.weights:
            assert report.weights["left"] == 0.0
    assert all_finite(trainer.model)


@pytest.mark.parametrize("method", ["uw", "dwa", "moco", "gradnorm", "imtl"])
def test_skip_task_with_per_task_state_uses_stand_ins(method):
    """Methods that refuse a changed task count get every task, the dropped one as a constant
    (zero gradient): its head does not move, nothing becomes NaN."""
    trainer, strategy, loader = setup(method, "loss", "skip_task")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(loader)
    before, after = strategy.states[FAULT_STEP]
    assert equal_states(head_params(before, "left"), head_params(after, "left"))
    assert not equal_states(head_params(before, "right"), head_params(after, "right"))
    assert trainer.strategy.guard.counts()["skipped_tasks"] == {"left": 1}
    assert all_finite(trainer.model)
    assert first_nonfinite(strategy.method.buffers()) is None


@pytest.mark.parametrize("method", ["moco", "gradnorm", "dwa"])
def test_skip_step_restores_the_method_state(method):
    trainer, strategy, loader = setup(method, "grad", "skip_step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(loader)
    before, after = strategy.states[FAULT_STEP]
    assert equal_states(before["method"], after["method"])


def test_inf_loss_and_all_tasks_faulty():
    trainer, strategy, loader = setup("ew", "inf_loss", "raise")
    with pytest.raises(NonFiniteError, match=r"loss of task 0 \('left'\) is inf"):
        trainer.fit(loader)
    # every task faulty: skip_task has nothing left and skips the step
    guard = NonFiniteGuard("skip_task")
    assert guard.counts()["skipped_steps"] == 0
    trainer, strategy, loader = setup("ew", "loss", "skip_task")
    strategy.faults.active = lambda task: "loss" if strategy.faults.current == 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(loader)
    assert trainer.strategy.guard.counts()["skipped_steps"] == 1
    assert equal_states(*strategy.states[1])


def test_alternating_skips_only_the_faulty_group():
    faults = Faults("loss")
    problem = DATASETS.get("multidigits", n_train=32, n_val=16, n_test=16)
    torch.manual_seed(0)
    model = HPS(
        nn.Sequential(nn.Flatten(), nn.Linear(96, 8), nn.Tanh()),
        {t: nn.Linear(8, k) for t, k in problem.task_outputs.items()},
    )

    class Tracking(Alternating):
        def step(self, batch, compute_losses, step):
            faults.current = step
            return super().step(batch, compute_losses, step)

    strategy = Tracking(groups="each")
    trainer = Trainer(
        model,
        make_tasks(faults),
        strategy,
        budget=Budget(steps=6),  # 2 batches x 3 groups
        progress=False,
        on_nonfinite="skip_step",
        track_exploration=False,
    )
    faults.step = 0
    loader = DataLoader(problem.splits["train"], batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(loader)
    counts = strategy.guard.counts()
    assert counts["skipped_steps"] == 1  # 'left' group of batch 0 only
    assert trainer._optimizer_steps == 5
    assert all_finite(model)


def test_singular_gramians_are_not_faults():
    """A task with a zero gradient (a rank-deficient Gramian) is handled by the solvers."""
    faults = Faults(None)
    problem = DATASETS.get("multidigits", n_train=32, n_val=16, n_test=16)
    tasks = make_tasks(faults)
    tasks[2] = Task("sum", lambda out, y: 0.0 * out.sum() + 1.0)
    for name in ["mgda", "upgrad", "cagrad", "nash_mtl", "imtl_g", "dualproj"]:
        torch.manual_seed(0)
        model = HPS(
            nn.Sequential(nn.Flatten(), nn.Linear(96, 8), nn.Tanh()),
            {t: nn.Linear(8, k) for t, k in problem.task_outputs.items()},
        )
        trainer = Trainer(
            model,
            tasks,
            Joint(methods.get(name)),
            budget=Budget(steps=2),
            progress=False,
            on_nonfinite="skip_step",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # e.g. Nash-MTL's solver notes
            trainer.fit(DataLoader(problem.splits["train"], batch_size=16))
        counts = trainer.strategy.guard.counts()
        assert counts["skipped_steps"] == 0 and counts["solver_failures"] == 0, name
        assert all_finite(model), name


def test_weights_that_overflow_after_the_step_always_raise():
    class Exploding(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))  # an overflowed update

    trainer, _, loader = setup("ew", None, "skip_step")
    trainer.optimizer_factory = lambda params: (Exploding(params, lr=0.1), None)
    with pytest.raises(NonFiniteError, match="learning rate is probably too large"):
        trainer.fit(loader)


def test_policy_is_validated_and_counters_survive_a_checkpoint():
    with pytest.raises(ConfigError, match="on_nonfinite must be one of"):
        NonFiniteGuard("ignore")
    problem = DATASETS.get("multidigits", n_train=16, n_val=8, n_test=8)
    model = HPS(nn.Flatten(), {t: nn.Linear(96, k) for t, k in problem.task_outputs.items()})
    with pytest.raises(ConfigError, match="on_nonfinite"):
        Trainer(model, problem.tasks, on_nonfinite="ignore")
    with pytest.raises(ConfigError, match="not supported with several processes"):
        NonFiniteGuard("skip_step", distributed=True)
    guard = NonFiniteGuard("skip_task")
    guard.skipped_steps, guard.skipped_tasks, guard.nonfinite_losses = 2, {"left": 3}, 5
    guard._stand_ins = {"left": torch.tensor(1.5)}
    restored = NonFiniteGuard("skip_step")
    restored.load_state_dict(guard.state_dict())
    assert restored.counts() == {**guard.counts(), "policy": "skip_step"}
    assert float(restored._stand_ins["left"]) == 1.5


def test_resumed_run_keeps_the_counters(tmp_path):
    trainer, _, loader = setup("ew", "loss", "skip_step", tmp_path, steps=2)
    trainer.checkpoint_every = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(loader)
    resumed, _, loader = setup("ew", None, "skip_step", tmp_path, steps=3)
    resumed.checkpoint_every = 1
    resumed.fit(loader, resume=True)
    assert resumed.strategy.guard.counts()["skipped_steps"] == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nonfinite"]["skipped_steps"] == 1 and summary["cost"]["steps"] == 3
    assert not math.isnan(summary["results"].get("val", {}).get("left", {}).get("loss", 0.0))


def _stepped_guard(lists, method):
    guard = NonFiniteGuard("raise")
    for params in lists:
        guard.begin(params, method, lambda: None)
        guard.stepped()
    return guard


def test_check_weights_sees_every_list_stepped_in_first_stepped_order():
    """The guard records a step's parameter list once (by identity) and folds the lists into
    single parameters past a few: every parameter stepped is still checked, the first one
    stepped is named, and a clean check forgets them."""
    repeated = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(5))]
    fresh = [[nn.Parameter(torch.zeros(3 + k))] for k in range(20)]  # folded past 16
    guard = _stepped_guard([repeated, *fresh, repeated], methods.EW())
    guard.check_weights()  # all finite
    with torch.no_grad():
        fresh[0][0].fill_(float("nan"))
    guard.check_weights()  # not stepped since the check: not this guard's fault
    guard = _stepped_guard([repeated, *fresh, repeated], methods.EW())
    with torch.no_grad():
        fresh[-1][0][1] = float("inf")
        repeated[1][0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"shape \[5\]"):  # repeated: stepped first
        guard.check_weights()
    with torch.no_grad():
        repeated[1].zero_()
    with pytest.raises(NonFiniteError, match=r"shape \[3\]"):  # fresh[0]: NaN, folded
        guard.check_weights()


def test_gradient_check_covers_the_method_parameters():
    """A learnable weighting's parameters (UW's log-variances) are checked with the model's."""
    uw = methods.get("uw")
    uw.setup(3)
    (own,) = list(uw.parameters())
    model = [nn.Parameter(torch.zeros(4))]
    guard = NonFiniteGuard("raise")
    guard.begin(model, uw, lambda: None)
    model[0].grad = torch.ones(4)
    own.grad = torch.full_like(own, float("nan"))
    with pytest.raises(NonFiniteError, match=rf"shape \[{own.numel()}\]"):
        guard.commit()
    guard.begin(model, methods.EW(), lambda: None)  # no parameters of its own
    assert guard.commit() is True
