"""Learning to Branch: Gumbel-softmax branching (the Gumbel-max frequencies, straight-through
one-hot samples), the deterministic argmax tree at evaluation, the temperature schedule, and
its seeded, saved noise."""

from __future__ import annotations

import torch
from arch_checks import F64, TASKS, batch, losses, make, nonzero, zero
from torch.utils.data import DataLoader, TensorDataset

from mtlkit import Budget, Joint, Task, Trainer
from mtlkit.architectures.ltb import default_branches
from mtlkit.methods import EW
from mtlkit.metrics import MeanSquaredError
from mtlkit.training.optim import optimizer


def test_default_tree_doubles_up_to_the_task_count():
    assert default_branches(4, 3) == [1, 2, 3, 3]
    assert default_branches(2, 5) == [1, 2]


def test_logits_exist_only_where_a_child_has_a_choice():
    model = make("ltb", branches=[1, 2])
    assert list(model.branch_logits) == []  # stage 0 has a single node
    assert set(model.head_logits) == set(TASKS) and model.head_logits["a"].shape == (2,)
    wide = make("ltb", branches=[2, 3])
    assert wide.branch_logits["1"].shape == (3, 2)
    single = make("ltb", branches=[1, 1])  # a chain: hard parameter sharing
    assert len(single.head_logits) == 0 and len(list(single.task_parameters("a"))) == 2


def set_logits(model, generator):
    with torch.no_grad():
        for p in [*model.branch_logits.values(), *model.head_logits.values()]:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=F64))


def test_evaluation_is_the_deterministic_argmax_tree():
    model = make("ltb", branches=[2, 3])
    set_logits(model, torch.Generator().manual_seed(0))
    model.eval()
    x, _ = batch("ltb", n=4)
    first, second = model(x), model(x)
    tree = model.branching()
    stage0 = [node(x) for node in model.nodes[0]]
    stage1 = [model.nodes[1][k](stage0[parent]) for k, parent in enumerate(tree["parents"][0])]
    for t in TASKS:
        assert torch.equal(first[t], second[t])
        torch.testing.assert_close(first[t], model.heads[t](stage1[tree["tasks"][t]]))


def test_training_samples_are_one_hot_with_straight_through_gradients():
    model = make("ltb", branches=[2, 3], hard=True)
    x, targets = batch("ltb")
    choices = model.choices(torch.zeros(4, 3, dtype=F64))
    assert torch.equal(choices.sum(-1), torch.ones(4, dtype=F64))
    assert set(choices.flatten().tolist()) <= {0.0, 1.0}
    losses(model, x, targets)["a"].backward()
    assert nonzero(model.branch_logits["1"]) and nonzero(model.head_logits["a"])
    # only the sampled path trains: task a's head read one stage-1 node
    used = [k for k, node in enumerate(model.nodes[1]) if nonzero(node[0][0].weight)]
    unused = [k for k, node in enumerate(model.nodes[1]) if zero(node[0][0].weight)]
    assert len(used) == 1 and len(unused) == 2


def test_hard_samples_follow_the_softmax_of_the_logits():
    """Gumbel-max: argmax(θ + g) is distributed as softmax(θ), at any temperature."""
    model = make("ltb", branches=[1, 3], hard=True)
    logits = torch.tensor([[1.0, 0.0, -1.0]], dtype=F64).expand(4000, 3)
    for temperature in (0.5, 5.0):
        model.temperature = temperature
        counts = model.choices(logits).detach().sum(0)
        probs = torch.softmax(logits[0], 0)
        sigma = (4000 * probs * (1 - probs)).sqrt()
        assert ((counts - 4000 * probs).abs() < 4 * sigma).all(), (counts, probs)


def test_temperature_anneals_per_step_to_its_floor():
    model = make("ltb", temperature=4.0, temperature_decay=0.5, min_temperature=0.3)
    assert model.temperature == 4.0
    for step, expected in [(1, 2.0), (2, 1.0), (3, 0.5), (4, 0.3), (10, 0.3)]:
        model.on_train_step(step)
        assert model.temperature == expected


class Targets(TensorDataset):
    def __getitem__(self, index):
        x, *ys = super().__getitem__(index)
        return x, dict(zip(TASKS, ys))


def test_the_trainer_anneals_the_temperature_each_step():
    model = make("ltb", temperature=2.0, temperature_decay=0.9, min_temperature=0.1)
    x, targets = batch("ltb", n=24)
    loader = DataLoader(Targets(x, *targets.values()), batch_size=8)
    tasks = [Task(t, lambda o, y: ((o - y) ** 2).mean(), {"mse": MeanSquaredError}) for t in TASKS]
    trainer = Trainer(
        model,
        tasks,
        Joint(EW()),
        optimizer("sgd", lr=0.01),
        budget=Budget(epochs=2),
        progress=False,
    )
    trainer.fit(loader)
    assert model.temperature == 2.0 * 0.9**6  # 3 batches x 2 epochs


def test_noise_is_seeded_and_saved_with_the_model():
    a, b = make("ltb", seed=0), make("ltb", seed=0)
    logits = torch.zeros(5, 2, dtype=F64)
    assert torch.equal(a.choices(logits), b.choices(logits))
    a.on_train_step(7)
    state = a.state_dict()
    expected = a.choices(logits)
    c = make("ltb", seed=9)
    c.load_state_dict(state)
    assert c.temperature == a.temperature and torch.equal(c.choices(logits), expected)
    many = torch.zeros(50, 2, dtype=F64)
    assert not torch.equal(make("ltb", seed=1).choices(many), make("ltb", seed=0).choices(many))
