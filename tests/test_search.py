"""Method search at a fixed budget (mtlkit compare --search): halving, full grid, ls weights."""

from __future__ import annotations

import json
import math

import pytest

from mtlkit.app.compare.grid import Entry, load_grid
from mtlkit.app.compare.search import (
    Arm,
    SearchSpec,
    full_grid,
    kendall_tau,
    ls_weights,
    search_command,
    search_markdown,
    successive_halving,
)
from mtlkit.errors import ConfigError


class FakeRunner:
    """Scores an arm by a fixed quality minus a learning curve; records every training."""

    def __init__(self, quality, seeds=(0, 1, 2)):
        self.quality = quality
        self.grid = type("G", (), {"seeds": list(seeds)})()
        self.log = []

    def echo(self, line):
        pass

    def train(self, arm, epochs):
        self.log.append((arm.label, epochs - arm.epochs))
        scores = [self.quality[arm.label] + 1 / epochs + 0.01 * s for s in self.grid.seeds]
        arm.epochs = epochs
        arm.scores.append(scores)
        return scores


def arms(labels):
    strategy = Entry("joint", {}, "joint")
    return [Arm(label, Entry("ew", {}, label), strategy) for label in labels]


def test_halving_spends_at_most_the_budget_and_keeps_the_best():
    quality = {"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.3, "e": 0.7, "f": 0.2}
    runner = FakeRunner(quality)
    ranked = successive_halving(arms(quality), runner, SearchSpec(epochs=180, eta=2))
    # ceil(log2 6) = 3 rounds of 60 epochs: 6 arms x 3 seeds get +3, then 3 get +6, 2 get +10
    assert [a.label for a in ranked] == ["b", "f", "d", "a", "e", "c"]
    assert [a.round for a in ranked] == [3, 3, 2, 1, 1, 1]
    assert [a.epochs for a in ranked] == [19, 19, 9, 3, 3, 3]
    spent = sum(more for _, more in runner.log) * len(runner.grid.seeds)
    assert spent == 6 * 3 * 3 + 3 * 6 * 3 + 2 * 10 * 3 <= 180


def test_halving_refuses_a_budget_below_one_epoch_per_run():
    with pytest.raises(ConfigError, match="give at least 54"):
        successive_halving(arms("abcdef"), FakeRunner(dict.fromkeys("abcdef", 0)), SearchSpec(10))


def test_full_grid_ranks_by_score():
    quality = {"a": 0.5, "b": 0.1, "c": 0.9}
    ranked = full_grid(arms(quality), FakeRunner(quality), SearchSpec(full_epochs=4))
    assert [a.label for a in ranked] == ["b", "a", "c"] and {a.epochs for a in ranked} == {4}


def test_ls_weights_random_and_grid():
    draws = ls_weights(SearchSpec(trials=5, search_seed=3), 3)
    assert len(draws) == 5 and all(math.isclose(sum(w), 3) and min(w) > 0 for w in draws)
    assert draws == ls_weights(SearchSpec(trials=5, search_seed=3), 3)  # seeded
    assert draws != ls_weights(SearchSpec(trials=5, search_seed=4), 3)
    lattice = ls_weights(SearchSpec(mode="grid", resolution=2), 3)
    # the simplex lattice of step 1/2 in 3 dimensions: C(4, 2) = 6 points, scaled to sum 3
    assert sorted(map(tuple, lattice)) == sorted(
        [
            (3.0, 0.0, 0.0),
            (0.0, 3.0, 0.0),
            (0.0, 0.0, 3.0),
            (1.5, 1.5, 0.0),
            (1.5, 0.0, 1.5),
            (0.0, 1.5, 1.5),
        ]
    )


def test_kendall_tau():
    assert kendall_tau(list("abcd"), list("abcd")) == 1.0
    assert kendall_tau(list("abcd"), list("dcba")) == -1.0
    assert kendall_tau(list("abc"), list("acb")) == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="different arms"):
        kendall_tau(list("ab"), list("ac"))


def test_search_settings_are_checked():
    with pytest.raises(ConfigError, match=r"unknown key.*budget.*valid keys: epochs"):
        SearchSpec.parse({"budget": 3})
    with pytest.raises(ConfigError, match=r"search.eta must be an integer >= 2"):
        SearchSpec.parse({"eta": 1})
    with pytest.raises(ConfigError, match=r"search.mode must be random or grid"):
        SearchSpec.parse({"mode": "sobol"})
    with pytest.raises(ConfigError, match=r"needs search\.epochs"):
        successive_halving(arms("ab"), FakeRunner({"a": 0, "b": 0}), SearchSpec())


@pytest.mark.slow
def test_searches_train_and_report_on_multidigits(tmp_path):
    grid = load_grid(
        None,
        [
            f"out={tmp_path}",
            "methods=[ew,{name: ls, args: {weights: [2.5, 0.25, 0.25]}, label: ls_left}]",
            "seeds=[0,1]",
            "progress=false",
            "data_args={n_train: 256, n_val: 128, n_test: 128}",
        ],
    )
    path = search_command(grid, "halving", {"epochs": 8}, echo=lambda line: None)

    report = json.loads(path.read_text())
    # 2 arms, 1 round of 8 epochs: 4 runs of 2 epochs
    assert report["epochs"] == 8 and sorted(report["ranking"]) == ["ew", "ls_left"]
    assert all(a["epochs_per_seed"] == 2 for a in report["arms"])
    assert report["arms"][0]["gap_to_best"] == 0
    ls = json.loads(search_command(grid, "ls", {"epochs": 4, "trials": 3}, echo=print).read_text())
    assert ls["epochs"] == 2 * 4  # trials and final run together: the budget, on each seed
    assert ls["final"]["epochs_per_seed"] == 2 and len(ls["weights"]) == 3
    assert "Selected weights" in search_markdown(ls)
