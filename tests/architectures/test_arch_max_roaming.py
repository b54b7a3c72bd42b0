"""Maximum Roaming: the masks keep the sharing ratio, every update swaps one unit per task for
one it has not used, the updates stop once every unit has visited every task (or at the update
ratio), the schedule in steps or epochs, and the masked forward pass and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from arch_checks import TASKS, batch, losses, make, nonzero, zero
from torch.utils.data import DataLoader, TensorDataset

from mtlkit import Budget, Joint, Task, Trainer
from mtlkit.architectures import build
from mtlkit.methods import EW
from mtlkit.metrics import MeanSquaredError
from mtlkit.training.optim import optimizer


def model_with(p: float = 0.6, widths=(10, 7), **args):
    torch.manual_seed(0)
    return build("max_roaming", (4,), TASKS, widths=list(widths), p=p, **args)


@pytest.mark.parametrize("p, widths", [(0.6, (10, 7)), (0.8, (20, 5)), (0.1, (12, 9)), (1.0, (4,))])
def test_initial_masks_have_the_sharing_ratio_and_cover_every_unit(p, widths):
    model = model_with(p, widths)
    for mask, visited, units in zip(model.masks(), model.visited(), widths, strict=True):
        active = min(units, max(math.ceil(p * units - 1e-9), math.ceil(units / 3)))
        assert mask.shape == (3, units)
        assert mask.sum(dim=1).tolist() == [active] * 3  # ⌈p C⌉ (at least ⌈C / m⌉) per task
        assert bool((mask.sum(dim=0) >= 1).all())  # every unit starts with a task
        assert torch.equal(visited, mask.bool())


def test_an_update_swaps_one_unit_per_task_for_an_unvisited_one():
    model = model_with(widths=(10, 9))  # 4 and 3 units free: three updates change both stages
    for _ in range(3):
        before = [m.clone() for m in model.masks()]
        seen = [v.clone() for v in model.visited()]
        assert model.update_masks()
        for old, new, old_seen, new_seen in zip(before, model.masks(), seen, model.visited()):
            assert torch.equal(new.sum(1), old.sum(1))  # the ratio never changes
            for t in range(3):
                added = torch.nonzero((new[t] == 1) & (old[t] == 0)).flatten().tolist()
                removed = torch.nonzero((new[t] == 0) & (old[t] == 1)).flatten().tolist()
                assert len(added) == 1 and len(removed) == 1
                assert not old_seen[t, added[0]] and new_seen[t, added[0]]
            assert torch.equal(new_seen.sum(1), old_seen.sum(1) + 1)


def test_roaming_ends_when_every_unit_has_visited_every_task():
    model = model_with(p=0.6, widths=(10, 7))  # free units: 4 and 2
    for update in range(1, 7):
        model.update_masks()
        visited = [v.sum(1).tolist() for v in model.visited()]
        assert visited == [[min(6 + update, 10)] * 3, [min(5 + update, 7)] * 3]
    assert all(bool(v.all()) for v in model.visited())
    frozen = [m.clone() for m in model.masks()]
    assert not model.update_masks()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.masks()))


def test_update_ratio_stops_roaming_early():
    model = model_with(p=0.6, widths=(10, 7), update_ratio=0.5)  # round(0.5 * 4), round(0.5 * 2)
    for _ in range(5):
        model.update_masks()
    assert [v.sum(1).tolist() for v in model.visited()] == [[8] * 3, [6] * 3]


def test_schedule_in_steps_or_epochs():
    steps = model_with(update_interval=3)
    for step in range(1, 11):
        steps.on_train_step(step)
        steps.on_epoch_end(step)  # ignored: the unit is steps
    assert steps.updates == 3  # steps 3, 6, 9
    epochs = model_with(update_interval=2, interval_unit="epochs")
    for epoch in range(1, 5):
        epochs.on_train_step(epoch)  # ignored
        epochs.on_epoch_end(epoch)
    assert epochs.updates == 2


def test_forward_masks_each_stage_per_task_and_evaluation_uses_the_current_masks():
    model = make("max_roaming-cnn")
    x, _ = batch("max_roaming-cnn", n=4)
    model.update_masks()
    model.eval()
    out = model(x)
    names = list(TASKS)
    for t in TASKS:
        i = names.index(t)
        m0, m1 = (mask[i] for mask in model.masks())
        h = model.backbone.stages[0](x) * m0.view(1, -1, 1, 1)
        h = model.backbone.stages[1](h) * m1.view(1, -1)
        torch.testing.assert_close(out[t], model.heads[t](h))


def test_a_task_loss_never_reaches_the_units_it_does_not_use():
    model = make("max_roaming")
    x, targets = batch("max_roaming")
    losses(model, x, targets)["b"].backward()
    mask = model.masks()[0][1]  # task b, first stage
    weight = model.backbone.stages[0][1].weight  # rows = the first stage's units
    assert all(zero_row(weight, u) for u in torch.nonzero(mask == 0).flatten().tolist())
    assert all(not zero_row(weight, u) for u in torch.nonzero(mask == 1).flatten().tolist())
    assert nonzero(model.heads["b"].weight) and zero(model.heads["a"].weight)


def zero_row(weight, unit) -> bool:
    return bool(weight.grad[unit].abs().max() == 0)


class Targets(TensorDataset):
    def __getitem__(self, index):
        x, *ys = super().__getitem__(index)
        return x, dict(zip(TASKS, ys))


def test_the_trainer_drives_the_schedule_and_the_state_is_saved():
    model = make("max_roaming", update_interval=2)
    initial = [m.clone() for m in model.masks()]
    x, targets = batch("max_roaming", n=24)
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
    assert model.updates == 3  # 6 steps, every 2
    assert not all(torch.equal(a, b) for a, b in zip(initial, model.masks()))
    clone = make("max_roaming", init_seed=4, seed=7)
    clone.load_state_dict(model.state_dict())
    assert clone.updates == 3
    assert all(torch.equal(a, b) for a, b in zip(clone.masks(), model.masks()))
    model.update_masks(), clone.update_masks()  # the same generator state: the same draws
    assert all(torch.equal(a, b) for a, b in zip(clone.masks(), model.masks()))
