"""``mtlkit compare``: the grid config, skipping and resuming runs, single-task baselines, the
results table and Δm%, parallel workers, and the TensorBoard mirror of the logs; on tiny
MultiDigits grids (a few optimizer steps per run)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import statistics
import time

import pytest
from conftest import TINY_COMPARE, one_line_error, summary
from scipy.stats import t as student

import mtlkit.app.compare as compare
import mtlkit.app.compare.workers as workers  # where a job calls run and run_stl
from mtlkit.app.cli import main
from mtlkit.app.config import TrainConfig
from mtlkit.errors import ConfigError, MtlkitError, NonFiniteError
from mtlkit.training.logs import CsvLog, TensorBoardLog
from mtlkit.training.trainer import Budget, Trainer

TINY = [
    *TINY_COMPARE,
    "plots=false",
]
GRID = [
    "methods=[ew,mgda]",
    "strategies=[joint]",
    "seeds=[0,1]",
    "budgets=[{epochs: 1}, {forward_backward: 10}]",
]
RUNS = [
    f"{m}-joint-seed{s}-{b}" for s in (0, 1) for b in ("epochs1", "fb10") for m in ("ew", "mgda")
]
TIMING = {"seconds", "seconds_per_epoch", "peak_memory_mb"}


def compare_main(out, *args: str) -> int:
    return main(["compare", "--jobs", "0", "--no-progress", "--out", str(out), *TINY, *args])


def read_rows(out) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


class Counter:
    """Wraps a function and counts the calls."""

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, config, out_dir, *args, **kwargs):
        self.calls.append(out_dir.name)
        return self.function(config, out_dir, *args, **kwargs)


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory):
    """A finished 2 methods x 2 seeds x 2 budgets grid (in this process), with the names of the
    runs and baselines trained."""
    out = tmp_path_factory.mktemp("grid") / "out"
    runs, stls = Counter(workers.run), Counter(workers.run_stl)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workers, "run", runs)
        patch.setattr(workers, "run_stl", stls)
        assert compare_main(out, *GRID) == 0
    return out, runs.calls, stls.calls


# --- results ------------------------------------------------------------------------------------


def test_every_run_and_each_seeds_baselines_are_trained_once(grid_out):
    out, runs, stls = grid_out
    assert sorted(runs) == sorted(RUNS)
    assert stls == ["seed0", "seed1"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(RUNS)
    for seed in (0, 1):
        baseline = json.loads((out / "stl" / f"seed{seed}" / "stl_baseline.json").read_text())
        assert set(baseline) == {"left", "sum"}


def test_results_csv_holds_the_numbers_of_each_runs_summary(grid_out):
    out, _, _ = grid_out
    rows = read_rows(out)
    # grid order: budget, method, strategy, seed
    expected = [
        f"{m}-joint-seed{s}-{b}"
        for b in ("epochs1", "fb10")
        for m in ("ew", "mgda")
        for s in (0, 1)
    ]
    assert [r["run"] for r in rows] == expected
    for row in rows:
        data = summary(out / "runs" / row["run"])
        test, cost = data["results"]["test"], data["cost"]
        assert float(row["left/acc"]) == test["left"]["acc"]
        assert float(row["sum/mae"]) == test["sum"]["mae"]
        assert float(row["sum/loss"]) == test["sum"]["loss"]
        for key in ("steps", "passes", "backwards", "epochs", "batches"):
            assert int(row[key]) == cost[key]
        assert int(row["forward_backward"]) == cost["passes"] + cost["backwards"]
        assert float(row["seconds"]) == cost["seconds"]
        assert float(row["peak_memory_mb"]) == cost["peak_memory_mb"]
        # 64 samples / batch 32 = 2 batches per epoch
        assert float(row["seconds_per_epoch"]) == pytest.approx(
            cost["seconds"] * 2 / cost["batches"]
        )
        config = data["config"]
        assert (config["method"], config["seed"]) == (row["method"], int(row["seed"]))


def test_the_forward_backward_budget_counts_forward_plus_backward_passes(grid_out):
    out, _, _ = grid_out
    rows = {r["run"]: r for r in read_rows(out)}
    # EW: 1 forward + 1 backward per step -> 5 steps (2 batches per epoch: into epoch 3)
    ew = rows["ew-joint-seed0-fb10"]
    assert (ew["steps"], ew["epochs"], ew["forward_backward"]) == ("5", "3", "10")
    for name, row in rows.items():
        if name.endswith("fb10"):  # stopped at the first step that reached the budget
            fb, steps = int(row["forward_backward"]), int(row["steps"])
            assert fb >= 10 > fb - fb / steps
    # MGDA takes a backward per task: more compute per step, so fewer steps at equal compute
    assert int(rows["mgda-joint-seed0-fb10"]["steps"]) < 5
    assert rows["mgda-joint-seed0-epochs1"]["steps"] == "2"
    budget = Budget(epochs=None, forward_backward=10)
    assert not budget.spent(0, 3, 3, 0.0, backwards=6) and budget.spent(0, 4, 4, 0.0, backwards=6)


def test_delta_m_is_the_hand_computed_relative_drop(grid_out):
    out, _, _ = grid_out
    for row in read_rows(out):
        base = json.loads((out / "stl" / f"seed{row['seed']}" / "stl_baseline.json").read_text())
        acc, mae = float(row["left/acc"]), float(row["sum/mae"])
        b_acc, b_mae = base["left"]["acc"], base["sum"]["mae"]
        # accuracy: higher is better (a drop is positive); MAE: lower is better
        by_hand = 100 * (-(acc - b_acc) / b_acc + (mae - b_mae) / b_mae) / 2
        assert float(row["delta_m"]) == pytest.approx(by_hand, rel=1e-12, abs=1e-12)
        # one metric per task: LibMTL's Δp is the same mean, signed so that higher is better
        assert float(row["delta_p"]) == pytest.approx(-by_hand, rel=1e-12, abs=1e-12)


def test_results_md_has_the_mean_std_and_confidence_interval_over_seeds(grid_out):
    out, _, _ = grid_out
    rows = [r for r in read_rows(out) if r["method"] == "mgda" and r["budget"] == "fb10"]
    dm = [float(r["delta_m"]) for r in rows]
    acc = [float(r["left/acc"]) for r in rows]
    mean, std = statistics.fmean(dm), statistics.stdev(dm)
    half = student.ppf(0.975, 1) * std / math.sqrt(2)
    text = (out / "results.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| fb10 | mgda | joint | 2 |"))
    cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
    assert cells[4] == f"{statistics.fmean(acc):.4f} ± {statistics.stdev(acc):.4f}"
    assert cells[6] == f"{mean:+.2f} ± {std:.2f}"
    assert cells[7] == f"[{mean - half:+.2f}, {mean + half:+.2f}]"
    assert "| budget | method | strategy | seeds | left acc ↑ | sum mae ↓ | Δm% ↓ |" in text
    assert "`fb10`: forward_backward=10" in text
    meta = json.loads((out / "compare.json").read_text())
    assert meta["tasks"]["left"]["metrics"] == {"acc": True}
    assert meta["tasks"]["sum"]["metrics"] == {"mae": False}


def test_plot_draws_every_figure_of_a_finished_grid(grid_out, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    shutil.copytree(grid_out[0], out)  # drawn with plots=false: no figure yet
    assert not list(out.glob("*.png"))
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    names = ["delta_m.png", "quality_vs_cost.png", "pareto.png", "curves.png", "weights.png"]
    assert capsys.readouterr().out.split() == [w for n in names for w in ("wrote", str(out / n))]


# --- skipping, resuming, caching ------------------------------------------------------------------


def test_a_second_invocation_skips_every_finished_run(grid_out, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(grid_out[0], out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    table = (out / "results.csv").read_text()
    runs, stls = Counter(workers.run), Counter(workers.run_stl)
    monkeypatch.setattr(workers, "run", runs)
    monkeypatch.setattr(workers, "run_stl", stls)
    capsys.readouterr()
    assert compare_main(out, *GRID) == 0
    assert runs.calls == [] and stls.calls == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == before
    assert (out / "results.csv").read_text() == table
    assert "10 of 10 finished before, skipped" in capsys.readouterr().out
    # a grown grid trains only the new runs; the baselines are reused
    grown = ["methods=[ew,mgda,famo]", "strategies=[joint]", "seeds=[0,1]"]
    assert compare_main(out, *grown, "budgets=[{epochs: 1}]") == 0
    assert sorted(runs.calls) == ["famo-joint-seed0-epochs1", "famo-joint-seed1-epochs1"]
    assert stls.calls == []
    assert [r["method"] for r in read_rows(out)] == ["ew", "ew", "mgda", "mgda", "famo", "famo"]


def test_a_finished_run_of_another_config_stops_the_grid_before_training(
    grid_out, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    shutil.copytree(grid_out[0], out)
    runs = Counter(workers.run)
    monkeypatch.setattr(workers, "run", runs)
    assert compare_main(out, *GRID, "lr=0.01") == 2
    err = one_line_error(capsys)
    assert "was trained with another config (lr: 0.001 -> 0.01)" in err
    assert runs.calls == []


def test_an_interrupted_run_resumes_from_its_checkpoint(grid_out, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    baseline = grid_out[0] / "stl" / "seed0" / "stl_baseline.json"  # no baselines to train
    args = ["methods=[ew]", "seeds=[0]", "epochs=2", f"baseline={baseline}", "--tensorboard"]
    reference = tmp_path / "reference"
    assert compare_main(reference, *args) == 0
    original = Trainer._after_optimizer_step

    def interrupt_at_step_3(trainer):
        original(trainer)
        if trainer._optimizer_steps == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "out"
    monkeypatch.setattr(Trainer, "_after_optimizer_step", interrupt_at_step_3)
    assert compare_main(out, *args) == 130
    run_dir = out / "runs" / "ew-joint-seed0"
    assert (run_dir / "checkpoint.pt").is_file()
    assert not (run_dir / "summary.json").exists()  # written at the end of training
    monkeypatch.setattr(Trainer, "_after_optimizer_step", original)
    capsys.readouterr()
    assert compare_main(out, *args) == 0
    assert "ew-joint-seed0 (resumed): done" in capsys.readouterr().out
    ref, got = read_rows(reference), read_rows(out)
    assert len(got) == 1
    assert {k: v for k, v in got[0].items() if k not in TIMING} == {
        k: v for k, v in ref[0].items() if k not in TIMING
    }
    # TensorBoard: each step once (the redone ones purged), the same values as steps.csv
    steps = read_columns_csv(run_dir / "steps.csv")
    events = scalars(run_dir / "tb" / "steps")
    assert [s for s, _ in events["loss/left"]] == [int(s) for s in steps["step"]]
    assert [v for _, v in events["loss/left"]] == pytest.approx(
        [float(v) for v in steps["loss/left"]], rel=1e-5
    )


# --- baselines ------------------------------------------------------------------------------------


def test_stl_once_trains_one_baseline_for_every_seed(grid_out, tmp_path, monkeypatch):
    out = tmp_path / "out"
    stls = Counter(workers.run_stl)
    monkeypatch.setattr(workers, "run_stl", stls)
    assert compare_main(out, "methods=[ew]", "seeds=[0,1]", "stl=once") == 0
    assert stls.calls == ["seed0"]
    base = json.loads((out / "stl" / "seed0" / "stl_baseline.json").read_text())
    row = read_rows(out)[1]
    assert row["seed"] == "1"
    acc, mae = float(row["left/acc"]), float(row["sum/mae"])
    by_hand = (
        100
        * (
            -(acc - base["left"]["acc"]) / base["left"]["acc"]
            + (mae - base["sum"]["mae"]) / base["sum"]["mae"]
        )
        / 2
    )
    assert float(row["delta_m"]) == pytest.approx(by_hand, rel=1e-12)


def test_a_failed_run_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch, capsys):
    baseline_free = ["methods=[ew,mgda]", "seeds=[0]", "stl=once"]
    real_run = workers.run

    def failing(config, out_dir, **kwargs):
        if config.method == "mgda":
            raise NonFiniteError("task losses are not finite: [nan, 1.0]")
        return real_run(config, out_dir, **kwargs)

    monkeypatch.setattr(workers, "run", failing)
    assert compare_main(tmp_path, *baseline_free) == 1
    captured = capsys.readouterr()
    assert "mgda-joint-seed0: FAILED" in captured.out
    assert "1 run(s) failed: mgda-joint-seed0" in captured.err
    assert "not finite" in (tmp_path / "runs" / "mgda-joint-seed0" / "error.txt").read_text()
    assert [r["run"] for r in read_rows(tmp_path)] == ["ew-joint-seed0"]


# --- parallel workers ---------------------------------------------------------------------------


def test_two_worker_processes_give_the_rows_of_one_process(grid_out, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(grid_out[0] / "stl", out / "stl")  # baselines cached: only runs in workers
    args = ["--out", str(out), *TINY, "methods=[ew,mgda]", "strategies=[joint]", "seeds=[0]"]
    args += ["budgets=[{epochs: 1}]"]
    assert main(["compare", "--jobs", "2", *args]) == 0
    assert "2 job(s) run" in capsys.readouterr().out
    parallel = read_rows(out)
    serial = [r for r in read_rows(grid_out[0]) if r["seed"] == "0" and r["budget"] == "epochs1"]
    assert len(parallel) == 2
    for a, b in zip(parallel, serial):  # equal up to float32 rounding: a worker has 1 thread
        assert a.keys() == b.keys()
        for key in a.keys() - TIMING:
            assert a[key] == b[key] or math.isclose(float(a[key]), float(b[key]), rel_tol=1e-5)


# --- the grid config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["methodz=[ew]"], "unknown config key 'methodz'; valid keys: data, "),
        (["methods=[ew, mgdaa]"], "unknown method 'mgdaa'; valid methods: "),
        (["strategies=[joint, alternate]"], "unknown strategy 'alternate'; valid strateg"),
        (["methods=[{name: cagrad, args: {cc: 1}}]"], "method 'cagrad' has no argument(s) cc"),
        (["methods=[{name: cagrad, args: {c: -1}}]"], "method 'cagrad': "),
        (["methods=[{name: ew, weight: 1}]"], "unknown key(s) weight; valid keys: name, args"),
        (["methods=ew"], "methods must be a non-empty list"),
        (["methods=[ew, {name: ew}]"], "label(s) 'ew' used twice"),
        (["budgets=[{epochs: 0}]"], "budget {'epochs': 0}: epochs must be > 0, got 0"),
        (["budgets=[{epoch: 3}]"], "unknown key(s) epoch; valid keys: name, epochs, steps"),
        (["budgets=[{name: a}]"], "sets no limit; give one or more of epochs"),
        (["budgets=[{epochs: 1, name: a}, {steps: 2, name: a}]"], "budget name(s) 'a' used twice"),
        (["seeds=[0, zero]"], "seeds must be a non-empty list of integers"),
        (["stl=twice"], "stl must be one of per_seed, once; got 'twice'"),
        (["methods=[ew]", "method=mgda"], "give 'methods' or 'method', not both"),
        (["seeds.0=1"], "grid key 'seeds' takes a whole value"),
        (["--jobs", "-1"], "jobs must be >= 0"),
    ],
)
def test_grid_config_errors_are_one_line_before_any_run(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert compare_main(out, *args) == 2
    assert message in one_line_error(capsys)
    assert not (out / "runs").exists()


def test_a_grid_file_is_checked_like_a_train_config(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text("methods: [ew]\nseeds: [0]\nbudgets:\n  - {epochs: 1}\nlearning_rate: 0.1\n")
    assert main(["compare", "--config", str(path)]) == 2
    assert "unknown config key(s) learning_rate; valid keys: data," in one_line_error(capsys)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        compare.load_grid(None, ["lr=0"])


def test_print_config_and_the_default_folder(tmp_path, capsys):
    path = tmp_path / "my-grid.yaml"
    path.write_text("methods: [ew, {name: cagrad, args: {c: 0.4}}]\nbudgets: [{steps: 5}]\n")
    assert main(["compare", "--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "- name: cagrad\n  args:\n    c: 0.4\n  label: cagrad_c0.4\n" in printed
    grid = compare.load_grid(path)
    assert grid.out_dir().as_posix() == "runs/my-grid"
    specs = grid.runs(grid.out_dir())
    assert [s.name for s in specs] == ["ew-joint-seed0-steps5", "cagrad_c0.4-joint-seed0-steps5"]
    assert specs[1].config.method_args == {"c": 0.4}
    assert (specs[1].config.steps, specs[1].config.epochs) == (5, None)


def test_the_shipped_grid_config_is_valid():
    grid = compare.load_grid("configs/multidigits-compare.yaml")
    assert [m.name for m in grid.methods] == ["ew", "mgda", "upgrad", "famo"]
    assert [s.name for s in grid.strategies] == ["joint", "alternating"]
    assert grid.seeds == [0, 1, 2] and len(grid.runs(grid.out_dir())) == 48


# --- TensorBoard --------------------------------------------------------------------------------


def read_columns_csv(path) -> dict[str, list[str]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: [r[k] for r in rows] for k in rows[0]}


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_gets_the_rows_of_both_csv_logs(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    argv = ["train", "--no-progress", "--tensorboard", "--out", str(out), *TINY, "epochs=2"]
    assert main(argv) == 0
    assert TrainConfig(tensorboard=True).tensorboard
    metrics = read_columns_csv(out / "metrics.csv")
    events = scalars(out / "tb" / "metrics")
    numeric = [k for k in metrics if k != "epoch"]
    assert sorted(events) == sorted(numeric)
    for key in numeric:
        assert [s for s, _ in events[key]] == [1, 2]
        assert [v for _, v in events[key]] == pytest.approx(
            [float(v) for v in metrics[key]], rel=1e-5
        )
    steps = scalars(out / "tb" / "steps")
    assert sorted(steps) == ["epoch", "loss/left", "loss/sum", "weight/left", "weight/sum"]
    assert [s for s, _ in steps["weight/sum"]] == [1, 2, 3, 4]


def test_a_resumed_tensorboard_log_hides_the_redone_steps(tmp_path):
    pytest.importorskip("tensorboard")
    path, tb = tmp_path / "steps.csv", tmp_path / "tb"
    log = TensorBoardLog(CsvLog(path, ["step", "loss"]), tb)
    for step in range(1, 6):
        log.append({"step": step, "loss": float(step)})
    log.close()
    time.sleep(1.05)  # event files are read in name order, and their names hold the second
    # resumed from a checkpoint taken after step 3: steps 4 and 5 are redone with new values
    log = TensorBoardLog(CsvLog(path, ["step", "loss"], keep_rows=3), tb, resumed=True)
    for step in range(4, 7):
        log.append({"step": step, "loss": 10.0 * step})
    log.close()
    assert scalars(tb)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    # a new (not resumed) log in the same folder starts afresh
    log = TensorBoardLog(CsvLog(path, ["step", "loss"]), tb)
    log.append({"step": 1, "loss": -1.0})
    log.close()
    assert scalars(tb)["loss"] == [(1, -1.0)]


def test_a_missing_tensorboard_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    with pytest.raises(MtlkitError, match=r'pip install "mtlkit\[tensorboard\]"'):
        TensorBoardLog(CsvLog(tmp_path / "a.csv", ["step"]), tmp_path / "tb")
    argv = ["train", "--no-progress", "--tensorboard", "--out", str(tmp_path / "run"), *TINY]
    assert main(argv) == 2
    assert "mtlkit[tensorboard]" in one_line_error(capsys)
    assert not (tmp_path / "run" / "steps.csv").exists()  # refused before training
