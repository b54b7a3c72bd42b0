"""Task subsets (``tasks``), single-task baselines (``mtlkit train --stl``), Δm% against a
baseline (``baseline=PATH``), ``scheduler_args`` and ``--data-root``, on tiny embedded data."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import one_line_error, summary

import mtlkit.app.runner as runner
from mtlkit.app.cli import main
from mtlkit.app.config import TrainConfig, load_config
from mtlkit.app.runner import load_problem, run, select_tasks
from mtlkit.errors import ConfigError

TINY = [
    "data_args.n_train=64",
    "data_args.n_val=32",
    "data_args.n_test=32",
    "epochs=1",
    "batch_size=32",
    "progress=false",
]
TWO_DOMAINS = [
    "data=two_domain_digits",
    "data_args.n_per_domain=[48, 32]",
    "data_args.n_val=16",
    "data_args.n_test=16",
    "epochs=1",
    "batch_size=16",
    "progress=false",
]


# --- tasks: a subset of the problem's tasks ------------------------------------------------------


def test_a_task_subset_trains_and_tests_only_those_tasks_in_the_given_order(tmp_path):
    config = load_config(None, [*TINY, "tasks=[sum, left]"])
    results = run(config, tmp_path)
    assert list(results) == ["sum", "left"]
    assert list(summary(tmp_path)["results"]["test"]) == ["sum", "left"]
    heads = {k.split(".")[1] for k in torch.load(tmp_path / "model.pt")["model"] if "heads" in k}
    assert heads == {"sum", "left"}


def test_select_tasks_filters_tasks_outputs_and_multi_input_splits():
    problem = load_problem(load_config(None, TWO_DOMAINS), None)
    subset = select_tasks(problem, ["inverted"])
    assert [t.name for t in subset.tasks] == ["inverted"]
    assert subset.task_outputs == {"inverted": 10}
    for split in ("train", "val", "test"):
        assert list(subset.splits[split]) == ["inverted"]
        assert subset.splits[split]["inverted"] is problem.splits[split]["inverted"]
    assert [t.name for t in problem.tasks] == ["plain", "inverted"]  # the original is unchanged


def test_a_multi_input_task_subset_trains(tmp_path):
    results = run(load_config(None, [*TWO_DOMAINS, "tasks=[plain]"]), tmp_path)
    assert list(results) == ["plain"] and 0.0 <= results["plain"]["acc"] <= 1.0


def test_an_unknown_task_is_one_error_listing_the_valid_ones(capsys):
    assert main(["train", *TINY, "tasks=[left, middle]"]) == 2
    err = one_line_error(capsys)
    assert (
        "unknown task(s) 'middle' for dataset 'multidigits'; valid tasks: left, right, sum" in err
    )


@pytest.mark.parametrize(
    "value, message",
    [
        ("[]", "tasks must name at least one task"),
        ("[left, left]", "tasks lists 'left' more than once"),
        ("left", "config key 'tasks' must be list or null, got 'left'"),
    ],
)
def test_malformed_task_lists_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [f"tasks={value}"])


# --- --stl: single-task baselines ---------------------------------------------------------------


def test_stl_trains_one_model_per_task_and_writes_the_baseline(tmp_path, capsys):
    out = tmp_path / "o"
    # the method and strategy of the config are replaced by EW on the joint strategy
    argv = ["train", "--stl", *TINY, "method=mgda", "strategy=alternating", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    baseline = json.loads((out / "stl_baseline.json").read_text())
    assert list(baseline) == ["left", "right", "sum"]
    for task in baseline:
        run_dir = out / "stl" / task
        test = summary(run_dir)["results"]["test"]
        assert list(test) == [task]  # trained on that task alone
        assert baseline[task] == {m: v for m, v in test[task].items() if m != "loss"}
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["tasks"] == [task] and saved["method"] == "ew"
        assert saved["strategy"] == "joint" and saved["out"] == str(run_dir)
    assert set(baseline["left"]) == {"acc"} and set(baseline["sum"]) == {"mae"}
    # the table: one row per task with its metrics
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    assert rows["left"] == [f"{baseline['left']['acc']:.4f}"]
    assert rows["sum"] == [f"{baseline['sum']['mae']:.4f}"]
    assert f"baseline written to {out / 'stl_baseline.json'}" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == "mgda"


def test_an_stl_run_is_the_same_as_training_that_task_alone(tmp_path):
    baseline = runner.run_stl(load_config(None, [*TINY, "tasks=[right]"]), tmp_path / "stl")
    assert list(baseline) == ["right"]
    alone = run(load_config(None, [*TINY, "tasks=[right]"]), tmp_path / "alone")
    assert baseline["right"]["acc"] == alone["right"]["acc"]
    stl_summary = summary(tmp_path / "stl" / "stl" / "right")["results"]["test"]
    assert stl_summary == summary(tmp_path / "alone")["results"]["test"]


def test_stl_on_a_multi_input_problem_shares_one_split_folder(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--stl", *TWO_DOMAINS, "--out", str(out)]) == 0
    baseline = json.loads((out / "stl_baseline.json").read_text())
    assert list(baseline) == ["plain", "inverted"]
    assert all(set(m) == {"acc"} for m in baseline.values())


def test_stl_default_folder_and_no_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--stl", *TINY, "tasks=[sum]"]) == 0
    assert (tmp_path / "runs" / "multidigits-hps-stl-s0" / "stl_baseline.json").is_file()
    assert main(["train", "--stl", "--resume", "runs/x"]) == 2
    assert "--stl cannot resume" in one_line_error(capsys)


# --- baseline=PATH: Δm% of a run ----------------------------------------------------------------


def write_baseline(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_a_run_prints_its_delta_m_against_a_baseline(tmp_path, capsys):
    baseline = {"left": {"acc": 0.5}, "right": {"acc": 0.25}, "sum": {"mae": 2.0}}
    path = write_baseline(tmp_path / "b.json", baseline)
    out = tmp_path / "run"
    assert main(["train", *TINY, f"baseline={path}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    test = summary(out)["results"]["test"]
    # by hand: accuracies are higher-is-better, the MAE lower-is-better
    drops = [
        -(test["left"]["acc"] - 0.5) / 0.5,
        -(test["right"]["acc"] - 0.25) / 0.25,
        (test["sum"]["mae"] - 2.0) / 2.0,
    ]
    flat = 100 * sum(drops) / 3
    line = next(line for line in printed.splitlines() if line.startswith("vs "))
    # one metric per task: the mean over metrics and the mean over tasks agree, and LibMTL's
    # Δp is signed the other way (higher is better)
    assert line == (
        f"vs {path}: Δm% {flat:+.2f} (Nash-MTL, FAMO: the mean over all metrics, lower is "
        f"better); Δp {-flat:+.2f}% (LibMTL: the mean over tasks of each task's mean, higher "
        "is better)"
    )


def test_delta_m_is_zero_against_the_stl_baseline_of_the_same_single_task_run(tmp_path, capsys):
    assert main(["train", "--stl", *TINY, "tasks=[left]", "--out", str(tmp_path / "s")]) == 0
    path = tmp_path / "s" / "stl_baseline.json"
    argv = ["train", *TINY, "tasks=[left]", f"baseline={path}", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    assert f"vs {path}: Δm% +0.00 (Nash-MTL" in capsys.readouterr().out


def test_two_metric_tasks_weigh_differently_in_the_two_means():
    from mtlkit.tasks import Task

    class M:
        def __init__(self, higher):
            self.higher_is_better = higher

    tasks = [
        Task("a", loss=None, metrics={"x": lambda: M(True), "y": lambda: M(False)}),
        Task("b", loss=None, metrics={"z": lambda: M(True)}),
    ]
    results = {"a": {"loss": 9.0, "x": 1.1, "y": 2.0}, "b": {"loss": 9.0, "z": 0.5}}
    baseline = {"a": {"x": 1.0, "y": 1.0}, "b": {"z": 1.0}}
    line = runner.format_delta_m(results, tasks, baseline, "B")
    # drops: x -10%, y +100%, z +50%; flat mean 46.67; task mean (45 + 50) / 2 = 47.5, which
    # LibMTL's Δp signs the other way
    assert line.startswith("vs B: Δm% +46.67 (Nash-MTL, FAMO") and "; Δp -47.50% (LibMTL" in line


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "baseline file '{p}' does not exist"),
        ("{not json", "baseline file '{p}' is not valid JSON"),
        ('{"left": 0.5}', "must hold {task: {metric: number}}"),
        ('{"left": {"acc": 0.5}}', "baseline '{p}' has no task 'right'; it has left"),
        ('{"left": {"acc": 0.5}, "right": {}, "sum": {"mae": 1}}', "no metric right/acc"),
        ('{"left": {"acc": 0}, "right": {"acc": 1}, "sum": {"mae": 1}}', "left/acc = 0.0"),
    ],
)
def test_a_bad_baseline_is_one_error_before_training(tmp_path, capsys, content, message):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    assert main(["train", *TINY, f"baseline={path}", "--out", str(out)]) == 2
    assert message.replace("{p}", str(path)) in one_line_error(capsys)
    assert not (out / "summary.json").exists()


# --- scheduler_args and --data-root -------------------------------------------------------------


def test_scheduler_args_reach_the_optimizer_factory(tmp_path, monkeypatch):
    seen = {}
    factory = runner.optimizer

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return factory(*args, **kwargs)

    monkeypatch.setattr(runner, "optimizer", spy)
    overrides = [*TINY, "scheduler=step", "scheduler_args.step_size=3", "scheduler_args.gamma=0.1"]
    run(load_config(None, overrides), None)
    assert seen["scheduler"] == "step" and seen["step_size"] == 3 and seen["gamma"] == 0.1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheduler_args.step_size=3"], "scheduler 'none' takes none"),
        (["scheduler=step", "scheduler_args.warmup=3"], "has no argument(s) warmup"),
        (["scheduler=step", "scheduler_args.step_size=0"], "step_size must be > 0"),
        (["scheduler=step", "scheduler_args.step_size=2.5"], "step_size' must be int"),
    ],
)
def test_bad_scheduler_args_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_data_root_flag_sets_data_args_root(capsys):
    assert main(["train", "--data", "nyuv2", "--data-root", "/x/nyu", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data_args"] == {"root": "/x/nyu"}
    assert TrainConfig(**config).data_args["root"] == "/x/nyu"
