"""Alternating task steps (Pascal et al. 2021), task groups and the exploration diagnostics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtlkit import Alternating, Budget, Joint, RandomGroups, Trainer, methods
from mtlkit.architectures import HPS
from mtlkit.errors import ConfigError
from mtlkit.training.forward import ForwardResult
from mtlkit.training.groups import GroupSchedule
from mtlkit.training.optim import optimizer
from mtlkit.training.strategies import STRATEGIES, StrategyContext

TASKS = ["a", "b", "c"]


def linear_hps(seed: int = 0) -> HPS:
    """Encoder W [2x3] (no bias), heads h_t [1x2] (no bias): output_t = h_t W x."""
    torch.manual_seed(seed)
    heads = {t: nn.Linear(2, 1, bias=False) for t in TASKS}
    return HPS(nn.Linear(3, 2, bias=False), heads).double()


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    return x, {t: torch.randn(5, generator=gen, dtype=torch.float64) for t in TASKS}


def closure(model, log=None):
    def compute_losses(b):
        x, y = b
        out = model(x)
        if log is not None:
            log.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return ForwardResult({t: ((out[t].squeeze(-1) - y[t]) ** 2).mean() for t in TASKS})

    return compute_losses


def set_up(strategy, model, factory=None):
    strategy.setup(StrategyContext(model, TASKS, factory or optimizer("sgd", lr=0.1, momentum=0)))
    return strategy


def test_one_group_of_all_tasks_takes_the_joint_ew_step():
    model_a, model_b = linear_hps(), linear_hps()
    joint = set_up(Joint(methods.EW()), model_a, optimizer("adam", lr=0.01))
    alt = set_up(Alternating(groups=[TASKS]), model_b, optimizer("adam", lr=0.01))
    for i in range(3):
        ra = joint.step(batch(i), closure(model_a), i)
        rb = alt.step(batch(i), closure(model_b), i)
        assert ra.losses == rb.losses and rb.steps == 1
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_each_group_steps_at_the_weights_left_by_the_previous_one():
    """Closed form for SGD: W' = W - lr ∂L_a(W, h_a), then W'' = W' - lr ∂L_b(W', h_b), ..."""
    model = linear_hps()
    W = model.encoder.weight.detach().clone()
    h = {t: model.heads[t].weight.detach().clone() for t in TASKS}
    x, y = batch()
    lr = 0.1
    for t in TASKS:  # the default groups: one task each, in order
        r = (x @ W.T @ h[t].T).squeeze(-1) - y[t]  # residuals [B]
        grad_h = 2 / len(r) * (r[:, None] * (x @ W.T)).sum(0, keepdim=True)
        grad_W = 2 / len(r) * h[t].T @ (r[None, :] @ x)
        W, h[t] = W - lr * grad_W, h[t] - lr * grad_h
    strategy = set_up(Alternating(), model)
    report = strategy.step((x, y), closure(model), 0)
    assert report.steps == 3 and report.backwards == 3
    torch.testing.assert_close(model.encoder.weight, W, rtol=0, atol=1e-14)
    for t in TASKS:
        torch.testing.assert_close(model.heads[t].weight, h[t], rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["shared", "per_group"])
def test_idle_heads_never_move(mode):
    """With momentum optimizers, a head must stay bit-identical through other groups' steps."""
    model = linear_hps()
    strategy = set_up(Alternating(optimizers=mode), model, optimizer("adam", lr=0.05))
    seen = []
    for i in range(3):
        strategy.step(batch(i), closure(model, seen), i)
    # Forward k of batch i happens after steps of groups 0..k-1; head "a" changes only at the
    # step of group 0, so it is the same at forwards 1, 2 and the next batch's forward 0.
    for i in range(3):
        after_own_step = seen[3 * i + 1]["heads.a.weight"]
        assert torch.equal(seen[3 * i + 2]["heads.a.weight"], after_own_step)
        if i < 2:
            assert torch.equal(seen[3 * i + 3]["heads.a.weight"], after_own_step)
        assert not torch.equal(seen[3 * i]["heads.a.weight"], after_own_step)


def test_per_group_optimizer_states_cover_shared_and_own_heads_only():
    model = linear_hps()
    strategy = set_up(
        Alternating(groups=[["a", "c"], ["b"]], optimizers="per_group"),
        model,
        optimizer("adam", lr=0.01),
    )
    strategy.step(batch(), closure(model), 0)
    shared = {id(p) for p in model.shared_parameters()}
    for opt, group in zip(strategy.optimizers, strategy.groups):
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        heads = {id(p) for t in group for p in model.task_parameters(t)}
        assert params == shared | heads
        assert set(map(id, opt.state)) == params  # every state entry belongs to the group
    # The shared parameters have one Adam step count per group, each stepped once.
    w = model.encoder.weight
    assert [float(opt.state[w]["step"]) for opt in strategy.optimizers] == [1.0, 1.0]


def test_random_groups_partition_deterministic_and_resampled_when_asked():
    tasks = [f"t{i}" for i in range(10)]
    for resample in ["never", "epoch", "step"]:
        spec = RandomGroups(size=4, resample=resample, seed=3)
        a, b = GroupSchedule(spec, tasks), GroupSchedule(spec, tasks)
        assert a.groups == b.groups and [len(g) for g in a.groups] == [4, 4, 2]
        assert sorted(t for g in a.groups for t in g) == sorted(tasks)
        history = [a.groups]
        for event in ["step", "step", "epoch", "step", "epoch"]:
            changed = a.maybe_resample(event)
            assert changed == (event == resample)
            history.append(a.groups)
        distinct = {str(h) for h in history}
        expected = {"never": 1, "epoch": 3, "step": 4}[resample]
        assert len(distinct) == expected  # a redraw of 10 tasks repeats with tiny probability
    other = GroupSchedule(RandomGroups(size=4, seed=4), tasks)
    assert other.groups != GroupSchedule(RandomGroups(size=4, seed=3), tasks).groups


def test_random_order_is_redrawn_each_batch():
    model = linear_hps()
    strategy = set_up(Alternating(order="random", seed=1), model)
    orders = []
    for i in range(6):
        log = []
        strategy.step(batch(i), closure(model, log), i)
        # Which head changed between consecutive forwards tells the group order.
        order = []
        for k in range(1, 3):
            order += [
                t
                for t in TASKS
                if not torch.equal(log[k][f"heads.{t}.weight"], log[k - 1][f"heads.{t}.weight"])
            ]
        orders.append(tuple(order))
    assert len(set(orders)) > 1


def test_learning_rate_scaling_and_per_batch_weight_decay():
    model = linear_hps()
    strategy = set_up(
        Alternating(optimizers="per_group", lr_scaling="sqrt", shared_decay="per_batch"),
        model,
        optimizer("adamw", lr=0.04, weight_decay=0.3, scheduler="step"),
    )
    for opt in strategy.optimizers:
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.04 / 3**0.5] * 2)
        assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.1, 0.3])
    strategy.step(batch(), closure(model), 0)
    strategy.on_epoch_end(1)  # StepLR(step_size=10) keeps the scaled rate
    assert strategy.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.04 / 3**0.5)


def test_a_method_inside_each_group():
    model = linear_hps()
    strategy = set_up(Alternating(methods.MGDA(), groups=[["a", "b"], ["c"]]), model)
    report = strategy.step(batch(), closure(model), 0)
    assert report.weights["a"] + report.weights["b"] == pytest.approx(1.0)
    assert report.weights["c"] == pytest.approx(1.0)
    assert strategy.group_methods[0] is not strategy.group_methods[1]
    assert report.backwards == 2 + 1  # MGDA's Jacobian of 2 tasks, then 1 task


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"groups": [["a"], ["b"]]}, "in no group"),
        ({"groups": [["a", "b"], ["b", "c"]]}, "more than one group"),
        ({"groups": [["a", "z"], ["b", "c"]]}, "unknown task"),
        ({"groups": RandomGroups(2, "epoch"), "optimizers": "per_group"}, "fixed groups"),
        ({"groups": "all"}, "groups must be 'each'"),
        ({"optimizers": "per_task"}, "optimizers must be one of shared, per_group"),
    ],
)
def test_bad_groups_and_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        set_up(Alternating(**kwargs), linear_hps())


def test_registered_builder_makes_random_groups():
    strategy = STRATEGIES.get("alternating", group_size=2, group_seed=5, optimizers="per_group")
    set_up(strategy, linear_hps())
    assert sorted(len(g) for g in strategy.groups) == [1, 2]
    with pytest.raises(ConfigError, match="either groups or group_size"):
        STRATEGIES.get("alternating", groups=[["a"]], group_size=2)


def test_trainer_reports_passes_and_exploration(tmp_path):
    """Alternating with 3 groups takes 3 forwards per batch; path length >= distance."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    data = [
        (x[i : i + 16], {t: torch.randn(16, generator=gen, dtype=torch.float64) for t in TASKS})
        for i in range(0, 64, 16)
    ]
    tasks = [methods_task(t) for t in TASKS]
    results = {}
    for name, strategy in [("joint", Joint()), ("alternating", Alternating())]:
        trainer = Trainer(
            linear_hps(),
            tasks,
            strategy,
            optimizer("sgd", lr=0.05),
            budget=Budget(epochs=2),
            progress=False,
            out_dir=tmp_path / name,
        )
        trainer.fit(data)
        results[name] = trainer.summary()["cost"]
    alt, joint = results["alternating"], results["joint"]
    assert alt["forwards_per_batch"] == 3 and joint["forwards_per_batch"] == 1
    assert alt["backwards_per_batch"] == 3 and alt["steps"] == 3 * 8
    for cost in (alt, joint):
        assert cost["path_length"] >= cost["distance_from_init"] > 0
    # The alternating run takes three times the steps: it travels further.
    assert alt["path_length"] > joint["path_length"]


def methods_task(name):
    from mtlkit import Task

    return Task(name, lambda out, y: ((out.squeeze(-1) - y) ** 2).mean())


def test_exploration_excludes_heads_and_normalisation_layers():
    from mtlkit.training.diagnostics import exploration_parameters

    encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.LayerNorm(4))
    model = HPS(encoder, {"a": nn.Linear(4, 1)})
    params = exploration_parameters(model, model.shared_parameters())
    assert [tuple(p.shape) for p in params] == [(4, 3), (4,)]


def test_alternating_from_the_cli(tmp_path, capsys):
    from mtlkit.app.cli import main

    out = tmp_path / "alt"
    code = main(
        [
            "train",
            "strategy=alternating",
            "strategy_args.optimizers=per_group",
            "strategy_args.group_size=2",
            "--epochs",
            "1",
            "--out",
            str(out),
            "data_args.n_train=256",
            "data_args.n_val=64",
            "data_args.n_test=64",
            "--no-progress",
        ]
    )
    assert code == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost"]["forwards_per_batch"] == 2  # 3 tasks in groups of 2 and 1
    assert "Alternating" in summary["strategy"] and "per_group" in summary["strategy"]
    assert copy.deepcopy(summary["config"]["strategy_args"]) == {
        "optimizers": "per_group",
        "group_size": 2,
    }
