"""The Trainer with the Joint strategy, and the strategy interface (a test-only strategy)."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from mtlkit import Budget, Joint, Trainer, methods
from mtlkit.architectures import build
from mtlkit.data.benchmarks import DATASETS
from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.errors import MtlkitError, NonFiniteError
from mtlkit.training.forward import ComputeLosses
from mtlkit.training.optim import optimizer
from mtlkit.training.strategies import StepReport, Strategy, StrategyContext

SMALL = {"n_train": 512, "n_val": 256, "n_test": 256}


def digits_setup(seed: int = 0, backbone: str = "mlp", **data: Any):
    torch.manual_seed(seed)
    problem = DATASETS.get("multidigits", seed=seed, **{**SMALL, **data})
    model = build("hps", problem.input_shape, problem.task_outputs, backbone=backbone)
    loaders = {
        split: DataLoader(
            ds,
            batch_size=64,
            shuffle=split == "train",
            generator=torch.Generator().manual_seed(seed),
        )
        for split, ds in problem.splits.items()
    }
    return problem, model, loaders


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_fit_learns_multidigits_and_writes_results(tmp_path):
    problem, model, loaders = digits_setup(noise=0.2, n_train=1024)
    trainer = Trainer(
        model,
        problem.tasks,
        Joint(methods.EW()),
        optimizer("adam", lr=5e-3),
        budget=Budget(epochs=6),
        out_dir=tmp_path,
        progress=False,
        config={"note": "test"},
    )
    trainer.fit(loaders["train"], loaders["val"])
    test = trainer.evaluate(loaders["test"])
    assert test["left"]["acc"] > 0.7 and test["right"]["acc"] > 0.6  # chance: 0.1
    assert test["sum"]["mae"] < 2.5  # predicting the mean: about 3.3
    epochs = read_csv(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in epochs] == list(range(1, 7))
    # The kept model is the one with the lowest summed validation loss.
    sums = [sum(float(r[f"val/{t}/loss"]) for t in ("left", "right", "sum")) for r in epochs]
    assert trainer.best_epoch == 1 + sums.index(min(sums))
    steps = read_csv(tmp_path / "steps.csv")
    assert len(steps) == 6 * 16 and float(steps[0]["weight/left"]) == 1.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"] == {"note": "test"}
    assert summary["results"]["test"]["left"]["acc"] == pytest.approx(test["left"]["acc"])
    assert summary["cost"]["steps"] == 96 and summary["cost"]["passes"] == 96


def test_fit_is_deterministic_for_a_seed():
    states = []
    for _ in range(2):
        problem, model, loaders = digits_setup(seed=3)
        Trainer(
            model,
            problem.tasks,
            Joint(methods.PCGrad(generator=1)),
            progress=False,
            budget=Budget(epochs=2),
            seed=3,
        ).fit(loaders["train"], loaders["val"])
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize(
    "budget, steps, passes",
    [
        (Budget(epochs=None, steps=5), 5, 5),
        (Budget(epochs=None, passes=9), 9, 9),
        (Budget(epochs=1, steps=100), 8, 8),
    ],
)
def test_budget_stops_at_the_first_limit(budget, steps, passes):
    problem, model, loaders = digits_setup()
    progress = Trainer(model, problem.tasks, budget=budget, progress=False).fit(loaders["train"])
    assert (progress.steps, progress.passes) == (steps, passes)


def test_budget_and_selection_errors():
    with pytest.raises(MtlkitError, match="at least one"):
        Budget(epochs=None)
    with pytest.raises(MtlkitError, match="epochs must be > 0"):
        Budget(epochs=0)
    problem, model, _ = digits_setup()
    with pytest.raises(MtlkitError, match="left/acc"):
        Trainer(model, problem.tasks, select="left/f1")


def test_learnable_method_parameters_are_optimised():
    problem, model, loaders = digits_setup()
    uw = methods.UW()
    Trainer(model, problem.tasks, Joint(uw), budget=Budget(epochs=1), progress=False).fit(
        loaders["train"]
    )
    # Cross-entropies of about 2.3 > 1 push s = log σ² up by about lr per Adam step (8 steps).
    assert uw.log_vars is not None and torch.all(uw.log_vars != 0)
    assert uw.log_vars[0] > 0.007 and uw.log_vars[1] > 0.007


def test_non_finite_loss_names_task_and_step():
    problem, model, loaders = digits_setup()
    with torch.no_grad():
        model.heads["sum"].bias.fill_(float("nan"))
    trainer = Trainer(model, problem.tasks, budget=Budget(epochs=1), progress=False)
    with pytest.raises(NonFiniteError, match=r"task 2 .*'sum'.*batch 0, step 0"):
        trainer.fit(loaders["train"])


class TwoOptimizerSteps(Strategy):
    """Test-only: two steps per batch with two optimizer states; the first on task 0, the
    second on the other tasks, each over the shared parameters and its tasks' heads."""

    name = "two_steps"

    def setup(self, context: StrategyContext) -> None:
        self.context = context
        model, tasks = context.model, context.tasks
        self.groups = [tasks[:1], tasks[1:]]
        self.optimizers = []
        for group in self.groups:
            params = list(model.shared_parameters())
            params += [p for t in group for p in model.task_parameters(t)]
            self.optimizers.append(context.optimizer_factory(params)[0])

    def step(self, batch: Any, compute_losses: ComputeLosses, step: int) -> StepReport:
        first = None
        for group, opt in zip(self.groups, self.optimizers):
            opt.zero_grad(set_to_none=True)
            result = compute_losses(batch)
            first = first or {t: float(v.detach()) for t, v in result.losses.items()}
            sum(result.losses[t] for t in group).backward()
            opt.step()
        return StepReport(losses=first, weights={}, steps=2)

    def methods(self):
        return []

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def test_a_new_strategy_plugs_in_without_changing_the_trainer():
    problem, model, loaders = digits_setup()
    reference = build("hps", problem.input_shape, problem.task_outputs)
    reference.load_state_dict(model.state_dict())
    strategy = TwoOptimizerSteps()
    progress = Trainer(
        model,
        problem.tasks,
        strategy,
        optimizer("sgd", lr=0.05),
        budget=Budget(epochs=1),
        progress=False,
        select="last",
    ).fit(loaders["train"])
    assert (progress.steps, progress.passes) == (16, 16)
    assert len(strategy.optimizers) == 2 and strategy.optimizers[0] is not strategy.optimizers[1]
    # The same updates written by hand give the same weights.
    ref_groups = [["left"], ["right", "sum"]]
    ref_opts = []
    for group in ref_groups:
        params = list(reference.shared_parameters())
        params += [p for t in group for p in reference.task_parameters(t)]
        ref_opts.append(torch.optim.SGD(params, lr=0.05, momentum=0.9))
    tasks = {t.name: t for t in problem.tasks}
    torch.manual_seed(0)
    for x, y in DataLoader(
        problem.splits["train"],
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    ):
        for group, opt in zip(ref_groups, ref_opts):
            opt.zero_grad()
            out = reference(x)
            sum(tasks[t].loss(out[t], y[t]) for t in group).backward()
            opt.step()
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["ew", "mgda"])
def test_multi_input_with_rep_grad(method):
    torch.manual_seed(0)
    problem = DATASETS.get("two_domain_digits")
    model = build("hps", problem.input_shape, problem.task_outputs, multi_input=True)
    loaders = {
        split: {t: DataLoader(d, batch_size=50, shuffle=split == "train") for t, d in data.items()}
        for split, data in problem.splits.items()
    }
    train = MultiInputLoader(loaders["train"])
    assert len(train) == 12  # the longer domain: 600 / 50; the other (400) cycles
    trainer = Trainer(
        model,
        problem.tasks,
        Joint(methods.get(method)),
        rep_grad=True,
        budget=Budget(epochs=4),
        progress=False,
    )
    progress = trainer.fit(train, loaders["val"])
    assert progress.steps == 48
    test = trainer.evaluate(loaders["test"])
    assert test["plain"]["acc"] > 0.6 and test["inverted"]["acc"] > 0.6


def test_rep_grad_needs_a_model_with_one_representation():
    problem, model, _ = digits_setup()
    model.has_shared_representation = False
    with pytest.raises(MtlkitError, match="rep_grad"):
        Trainer(model, problem.tasks, rep_grad=True)
