"""The model contract, checked on every registered architecture: output shapes (single- and
multi-input), the parameter partition, gradients under EW and under a gradient aggregator
(MGDA), task isolation, state round trips, errors, and training through the Trainer."""

from __future__ import annotations

import pytest
import torch
from arch_checks import CONFIGS, F64, TASKS, batch, ids, losses, make, names_of, nonzero, zero
from torch.utils.data import DataLoader, TensorDataset

import mtlkit
from mtlkit import Alternating, Budget, Joint, Task, Trainer
from mtlkit.architectures import ARCHITECTURES, BACKBONES, build
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods import EW, MGDA
from mtlkit.metrics import MeanSquaredError
from mtlkit.training.optim import optimizer

KEYS = list(CONFIGS)
NEW = ["cross_stitch", "mmoe", "dselect_k", "mtan", "cgc", "ple", "ltb", "max_roaming"]


def test_every_architecture_is_registered_and_listed():
    assert set(NEW) | {"hps"} <= set(ARCHITECTURES.available())
    for name in NEW:
        args = {a.name: a for a in ARCHITECTURES.arguments(name)}
        assert {"backbone", "widths", "weights"} <= set(args)
        assert all(a.annotation for a in args.values()), name  # typed, for `mtlkit list`
    from mtlkit.app.cli import list_registered

    listing = list_registered()
    assert "mtan(backbone: str = 'mlp'" in listing and "max_roaming(" in listing


@pytest.mark.parametrize("key", KEYS)
def test_output_shapes_single_input(key):
    model = make(key)
    x, targets = batch(key, n=5)
    out = model(x)
    assert list(out) == list(TASKS)
    for t, y in targets.items():
        assert out[t].shape == y.shape and out[t].dtype == F64


@pytest.mark.parametrize("key", KEYS)
def test_multi_input_gives_the_task_output_of_the_same_network(key):
    single = make(key).eval()
    multi = make(key, init_seed=5, multi_input=True)
    multi.load_state_dict(single.state_dict())
    multi.eval()
    x, _ = batch(key, n=4)
    with pytest.raises(MtlkitError, match="needs task="):
        multi(x)
    expected = single(x)
    for t in TASKS:
        out = multi(x, task=t)
        assert list(out) == [t]
        torch.testing.assert_close(out[t], expected[t], rtol=1e-12, atol=1e-12)
    with pytest.raises(MtlkitError, match="unknown task 'z'"):
        multi(x, task="z")


@pytest.mark.parametrize("key", KEYS)
def test_shared_representation_only_where_one_tensor_feeds_every_head(key):
    model = make(key)
    x, _ = batch(key, n=3)
    if key.startswith(("hps", "multi_lenet")):  # one encoder output feeds every head
        assert model.has_shared_representation
        _, z = model(x, return_features=True)
        assert z.shape[0] == 3
    else:
        assert model.has_shared_representation is False
        with pytest.raises(MtlkitError, match="no single shared representation"):
            model(x, return_features=True)


@pytest.mark.parametrize("key", KEYS)
def test_shared_and_task_parameters_partition_all_parameters(key):
    model = make(key)
    everything = ids(model.parameters())
    shared = list(model.shared_parameters())
    per_task = {t: list(model.task_parameters(t)) for t in TASKS}
    assert shared and all(per_task.values())
    groups = [ids(shared)] + [ids(ps) for ps in per_task.values()]
    assert sum(len(g) for g in groups) == len(everything)  # no overlap ...
    assert set().union(*groups) == everything  # ... and none missing
    assert len(shared) == len(ids(shared))


def _check_every_parameter_trains(model, shared_ids, weights=None):
    for name, p in model.named_parameters():
        assert nonzero(p), f"{name} got no gradient"


@pytest.mark.parametrize("key", KEYS)
def test_every_parameter_gets_a_gradient_under_ew(key):
    model = make(key)
    x, targets = batch(key)
    task_losses = losses(model, x, targets)
    mtlkit.backward(list(task_losses.values()), method=EW())
    _check_every_parameter_trains(model, ids(model.shared_parameters()))


MGDA_INTERIOR_INIT = {"multi_lenet": 2}
"""Initialisations on which MGDA's min-norm point weights every task (with init 0, MultiLeNet's
first task gets weight 0 on this batch, a boundary solution MGDA may rightly return; its head
then gets no gradient, which is not what this test is about)."""


@pytest.mark.parametrize("key", KEYS)
def test_every_parameter_gets_a_gradient_under_mgda(key):
    """LibMTL's MTAN leaves its attention modules untrained under gradient methods; here every
    task module gets the gradient of the weighted losses and the shared ones MGDA's direction."""
    model = make(key, init_seed=MGDA_INTERIOR_INIT.get(key, 0))
    x, targets = batch(key)
    task_losses = list(losses(model, x, targets).values())
    shared = list(model.shared_parameters())
    jac = mtlkit.jacobian(task_losses, shared)
    weights = mtlkit.backward(task_losses, shared=shared, method=MGDA()).weights
    assert weights is not None and bool((weights > 1e-6).all()), weights  # every task counts
    _check_every_parameter_trains(model, ids(shared))
    # the shared parameters hold exactly MGDA's direction w @ J
    direction = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(direction, weights.to(F64) @ jac, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("key", KEYS)
def test_task_parameters_get_only_their_task_gradient(key):
    model = make(key)
    x, targets = batch(key)
    for t in TASKS:
        model.zero_grad(set_to_none=True)
        losses(model, x, targets)[t].backward()
        own = list(model.task_parameters(t))
        assert all(nonzero(p) for p in own), names_of(model, [p for p in own if zero(p)])
        for other in TASKS:
            if other != t:
                leaked = [p for p in model.task_parameters(other) if not zero(p)]
                assert not leaked, (t, names_of(model, leaked))


@pytest.mark.parametrize("key", KEYS)
def test_state_dict_round_trip(key):
    source = make(key, init_seed=0)
    target = make(key, init_seed=3)
    target.load_state_dict(source.state_dict())
    x, _ = batch(key, n=4)
    source.eval(), target.eval()
    for t, out in source(x).items():
        torch.testing.assert_close(target(x)[t], out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("cross_stitch", {"alpha_self": 1.5}, "alpha_self must be in [0, 1]"),
        ("cross_stitch", {"widths": [4]}, "at least 2 stages"),
        ("mmoe", {"num_experts": 0}, "num_experts must be >= 1"),
        ("mmoe", {"backbone": "cnn", "stem": 0}, "needs stem >= 1"),
        ("mmoe", {"stem": 2}, "stem must be in [0, 1]"),
        ("dselect_k", {"num_experts": 4, "k": 5}, "k must be in [1, num_experts=4]"),
        ("dselect_k", {"gamma": 0.0}, "gamma must be > 0"),
        ("dselect_k", {"entropy_reg": -1.0}, "entropy_reg must be >= 0"),
        ("ple", {"widths": [4], "levels": 2}, "levels=2 needs at least 2 backbone stages"),
        ("ple", {"task_experts": 0}, "task_experts and shared_experts must be >= 1"),
        ("ltb", {"branches": [1]}, "branches must give a positive node count"),
        ("ltb", {"temperature": 1.0, "min_temperature": 2.0}, "min_temperature <= temperature"),
        ("ltb", {"temperature_decay": 0.0}, "temperature_decay must be in (0, 1]"),
        ("max_roaming", {"p": 0.0}, "sharing ratio p must be in (0, 1]"),
        ("max_roaming", {"update_interval": 0}, "update_interval must be >= 1"),
        ("max_roaming", {"interval_unit": "batches"}, "interval_unit must be"),
        ("max_roaming", {"update_ratio": 2.0}, "update_ratio must be in [0, 1]"),
        ("mtan", {"widths": [0]}, "positive widths"),
        ("hps", {"backbone": "cnn"}, "needs a [C, H, W] input shape"),
    ],
)
def test_bad_arguments_are_config_errors(name, args, message):
    shape = (1, 8, 8) if "stem" in args and args.get("backbone") == "cnn" else (6,)
    with pytest.raises(ConfigError) as error:
        build(name, shape, TASKS, **args)
    assert message in str(error.value)


def test_unknown_backbone_names_the_valid_ones():
    valid = BACKBONES.available()
    assert {"cnn", "lenet", "mlp", "resnet", "segnet"} <= set(valid)
    with pytest.raises(MtlkitError, match=f"valid backbones: {', '.join(valid)}$"):
        build("mtan", (6,), TASKS, backbone="vgg")


# ---------------------------------------------------------------- through the Trainer
class Targets(TensorDataset):
    def __getitem__(self, index):
        x, *ys = super().__getitem__(index)
        return x, dict(zip(TASKS, ys))


def trainer_setup(key: str, n: int = 24):
    x, targets = batch(key, n=n, seed=2)
    data = Targets(x, *targets.values())
    tasks = [
        Task(t, lambda out, y: ((out - y) ** 2).mean(), {"mse": MeanSquaredError}) for t in TASKS
    ]
    return DataLoader(data, batch_size=8), tasks


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("strategy", ["joint_mgda", "alternating"])
def test_trains_with_the_trainer_and_every_strategy(key, strategy):
    model = make(key)
    loader, tasks = trainer_setup(key)
    plan = Joint(MGDA()) if strategy == "joint_mgda" else Alternating(groups="each")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model, tasks, plan, optimizer("sgd", lr=0.05), budget=Budget(epochs=1), progress=False
    )
    trainer.fit(loader)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every parameter was updated at least once
    results = trainer.evaluate(loader, write=False)
    assert set(results) == set(TASKS)


@pytest.mark.parametrize("name", NEW)
def test_trainer_refuses_the_features_route_before_training(name):
    model = build(name, (6,), TASKS)
    _, tasks = trainer_setup("hps")
    with pytest.raises(MtlkitError, match="rep_grad needs a model with one shared representation"):
        Trainer(model, tasks, Joint(MGDA()), rep_grad=True, progress=False)
