"""Task affinities logged during training (TAG look-ahead, gradient cosines) and AffinityGroups."""

from __future__ import annotations

import builtins
import csv
import json

import pytest
import torch
from torch import nn

from mtlkit import AffinityGroups, AffinityOptions, Alternating, Budget, Joint, Task, Trainer
from mtlkit.architectures import HPS
from mtlkit.errors import ConfigError
from mtlkit.parallel.ddp import Parallel
from mtlkit.training.affinity import AffinityTracker, read_affinity_csv
from mtlkit.training.optim import optimizer

TASKS = ["a", "b", "c", "d"]


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def tasks():
    return [Task(t, mse) for t in TASKS]


def linear_hps(seed=0, dropout=0.0, norm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 5)]
    layers += [nn.BatchNorm1d(5)] if norm else []
    layers += [nn.Tanh(), nn.Dropout(dropout)] if dropout else [nn.Tanh()]
    heads = {t: nn.Linear(5, 1) for t in TASKS}
    return HPS(nn.Sequential(*layers), heads).double()


def data(n=96, batch=16, seed=0):
    """Tasks a, b share one target and c, d another (an orthogonal direction)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    u, v = x[:, :3].sum(1), x[:, 3:].sum(1) * 0.7
    noise = lambda: 0.05 * torch.randn(n, generator=g, dtype=torch.float64)  # noqa: E731
    y = {"a": u + noise(), "b": u + noise(), "c": v + noise(), "d": v + noise()}
    return [(x[i : i + batch], {t: y[t][i : i + batch] for t in TASKS}) for i in range(0, n, batch)]


def test_tag_and_cosine_follow_their_definitions():
    """Z_{i→j} = 1 - L_j(θ_s - η ∇_s L_i) / L_j(θ_s) (Fifty et al., Eq. 2), by hand."""
    model = linear_hps()
    batch = data()[0]
    tracker = AffinityTracker(
        AffinityOptions(every=1, lr=0.3, plot=False),
        model,
        tasks(),
        Parallel(False),
        list(model.shared_parameters()),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = tracker.measure(batch)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])  # the look-ahead is undone exactly
    x, y = batch
    shared = list(model.shared_parameters())

    def losses():
        out = model(x)
        return [mse(out[t], y[t]) for t in TASKS]

    base = losses()
    grads = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in base]
    flat = torch.stack([torch.cat([g.flatten() for g in gi]) for gi in grads])
    cos = (flat @ flat.T) / (flat.norm(dim=1)[:, None] * flat.norm(dim=1)[None, :])
    torch.testing.assert_close(got["cosine"], cos, rtol=1e-10, atol=1e-12)
    for i in range(4):
        with torch.no_grad():
            for p, g in zip(shared, grads[i]):
                p.sub_(0.3 * g)
            after = losses()
            for p, n in zip(
                shared, [n for n, _ in model.named_parameters() if n.startswith("encoder")]
            ):
                p.copy_(before[n])
        for j in range(4):
            expected = 1 - after[j].item() / base[j].item()
            assert got["tag"][i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("strategy", "lookahead"),
    [
        (lambda: Joint(), "optimizer"),
        (lambda: Alternating(groups=[["a", "b"], ["c", "d"]]), "sgd"),
    ],
)
def test_affinity_logging_leaves_training_exactly_as_without(tmp_path, strategy, lookahead):
    """Same final weights (dropout, batch norm, Adam): parameters, buffers, optimizer state and
    the random state are restored after every measurement, and its passes are not budgeted."""
    weights = []
    for i, affinity in enumerate([None, AffinityOptions(every=2, lookahead=lookahead, plot=False)]):
        model = linear_hps(dropout=0.3, norm=True)
        trainer = Trainer(
            model,
            tasks(),
            strategy(),
            optimizer("adam", lr=0.01, weight_decay=1e-3),
            budget=Budget(epochs=2),
            progress=False,
            affinity=affinity,
            out_dir=tmp_path / str(i),
        )
        trainer.fit(data(n=64), data(n=32, seed=1))
        weights.append(model.state_dict())
        passes = trainer.progress.passes
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    summary = json.loads((tmp_path / "1" / "summary.json").read_text())
    assert summary["cost"]["passes"] == passes
    cost = summary["affinity"]
    assert cost["measurements"] == 4  # 4 batches per epoch, every 2nd, 2 epochs
    assert cost["passes"] == 4 * 5 and cost["backwards"] == 4 * 4  # 1 + m forwards, m backwards
    with open(tmp_path / "1" / "affinity.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["epoch", "kind", "source", *TASKS]
    assert [(r[0], r[1]) for r in rows[1::4]] == [
        ("1", "tag"),
        ("1", "cosine"),
        ("2", "tag"),
        ("2", "cosine"),
    ]
    matrices = read_affinity_csv(tmp_path / "1" / "affinity.csv")
    torch.testing.assert_close(matrices[2]["cosine"].diagonal(), torch.ones(4, dtype=torch.float64))


def test_affinity_groups_find_the_planted_groups_in_training(tmp_path):
    model = linear_hps()
    strategy = Alternating(groups=AffinityGroups(2, warmup=1, seed=1))
    assert strategy.group_spec.initial(TASKS) != [["a", "b"], ["c", "d"]]  # not given away
    trainer = Trainer(
        model,
        tasks(),
        strategy,
        optimizer("sgd", lr=0.1),
        budget=Budget(epochs=2),
        progress=False,
        affinity=AffinityOptions(every=1, kinds=("tag",), plot=False),
        out_dir=tmp_path,
    )
    trainer.fit(data())
    assert strategy.groups == [["a", "b"], ["c", "d"]]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["affinity"]["selections"] == [{"epoch": 1, "groups": [["a", "b"], ["c", "d"]]}]


def test_affinity_groups_need_affinity_logging_of_their_kind():
    with pytest.raises(ConfigError, match="affinity_every"):
        Trainer(linear_hps(), tasks(), Alternating(groups=AffinityGroups(2)), progress=False).fit(
            data()
        )
    trainer = Trainer(
        linear_hps(),
        tasks(),
        Alternating(groups=AffinityGroups(2, affinity="cosine")),
        progress=False,
        affinity=AffinityOptions(every=1, kinds=("tag",), plot=False),
    )
    with pytest.raises(ConfigError, match="'cosine' affinity, which this run does not measure"):
        trainer.fit(data())


def test_options_are_checked_and_a_plot_without_matplotlib_names_the_extra(monkeypatch):
    with pytest.raises(ConfigError, match=r"affinity_every must be an integer >= 1"):
        AffinityOptions(every=0)
    with pytest.raises(ConfigError, match="among tag, cosine"):
        AffinityOptions(every=1, kinds=("tag", "loss"))
    with pytest.raises(ConfigError, match="lookahead must be one of sgd, optimizer"):
        AffinityOptions(every=1, lookahead="adam")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ConfigError, match=r"mtlkit\[plot\]"):
        AffinityOptions(every=1, plot=True)
    assert not AffinityOptions(every=1).draws()  # plot=None: drawn when matplotlib is there


@pytest.mark.slow
def test_heat_map_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    trainer = Trainer(
        linear_hps(),
        tasks(),
        budget=Budget(epochs=1),
        progress=False,
        affinity=AffinityOptions(every=3, plot=True),
        out_dir=tmp_path,
    )
    trainer.fit(data())
    assert (tmp_path / "affinity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_affinity_state_is_in_the_checkpoint(tmp_path):
    def trainer(epochs, out):
        return Trainer(
            linear_hps(),
            tasks(),
            Alternating(groups=AffinityGroups(2, warmup=1)),
            optimizer("sgd", lr=0.1),
            budget=Budget(epochs=epochs),
            progress=False,
            checkpoint_every=10**9,  # the end-of-fit checkpoint only
            affinity=AffinityOptions(every=2, kinds=("tag",), plot=False),
            out_dir=out,
        )

    first = trainer(1, tmp_path / "run")
    first.fit(data(n=64))
    resumed = trainer(2, tmp_path / "run")
    resumed.fit(data(n=64), resume=True)
    assert [e for e, _ in resumed.affinity.history] == [1, 2]
    torch.testing.assert_close(
        resumed.affinity.history[0][1]["tag"], first.affinity.history[0][1]["tag"]
    )
    assert resumed.affinity.total_count == 4 and resumed.affinity.cost["measurements"] == 4
    assert resumed.strategy.schedule.selections == first.strategy.schedule.selections
    with open(tmp_path / "run" / "affinity.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert [r[0] for r in rows[1:]] == ["1"] * 4 + ["2"] * 4


def test_config_keys_reach_the_trainer_and_are_checked():
    from mtlkit.app.config import TrainConfig
    from mtlkit.app.runner import build_run

    small = {"n_train": 128, "n_val": 64, "n_test": 64}
    grouped = {"affinity_groups": 2, "affinity": "cosine", "affinity_warmup": 2}
    config = TrainConfig(
        strategy="alternating",
        strategy_args=grouped,
        data_args=small,
        affinity_every=3,
        affinity_kinds=["cosine"],
        affinity_plot=False,
        progress=False,
    )
    trainer, _ = build_run(config, None)
    assert trainer.affinity.options == AffinityOptions(3, ("cosine",), plot=False)
    spec = trainer.strategy.group_spec
    assert (spec.k, spec.affinity, spec.warmup) == (2, "cosine", 2)
    without = TrainConfig(strategy="alternating", strategy_args=grouped, data_args=small)
    with pytest.raises(ConfigError, match="affinity_every"):
        build_run(without, None)
    with pytest.raises(ConfigError, match="exceeds the 3 tasks"):
        build_run(
            TrainConfig(
                strategy="alternating",
                strategy_args={"affinity_groups": 4},
                data_args=small,
                affinity_every=1,
            ),
            None,
        )
    with pytest.raises(ConfigError, match="affinity_lookahead need affinity_every"):
        TrainConfig(affinity_lookahead="optimizer")
