"""``mtlkit compare --launcher submitit`` on submitit's local executor (subprocesses, as SLURM
jobs would be): the same results.csv as ``--jobs 1``, finished runs skipped; the options."""

from __future__ import annotations

import math
import shutil

import pytest
from conftest import TINY_COMPARE, one_line_error

from mtlkit.app.cli import main
from mtlkit.app.compare.cluster import check_submitit_options, executor_parameters
from mtlkit.errors import ConfigError, MtlkitError

TINY = [
    *TINY_COMPARE,
    "plots=false",
    "methods=[ew,mgda]",
    "strategies=[joint]",
    "seeds=[0]",
]
TIMING = {"seconds", "seconds_per_epoch", "peak_memory_mb"}


def read_rows(out):
    import csv

    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_submitit_debug_executor_collects_the_results_of_jobs_0(tmp_path, capsys):
    """The plumbing (submission, outcomes, skipping) with submitit's in-process executor."""
    pytest.importorskip("submitit")
    reference, out = tmp_path / "jobs0", tmp_path / "submitit"
    assert main(["compare", "--jobs", "0", "--no-progress", "--out", str(reference), *TINY]) == 0
    capsys.readouterr()
    args = ["compare", "--launcher", "submitit", "--cluster", "debug", "--out", str(out), *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 job(s) run, 0 skipped" in printed and printed.count("submitted as job") == 3
    rows, expected = read_rows(out), read_rows(reference)
    assert [r["run"] for r in rows] == ["ew-joint-seed0", "mgda-joint-seed0"]
    for a, b in zip(rows, expected):
        assert a.keys() == b.keys()
        assert {k: a[k] for k in a.keys() - TIMING} == {k: b[k] for k in b.keys() - TIMING}
    assert main(args) == 0
    assert "0 job(s) run, 3 skipped" in capsys.readouterr().out


@pytest.mark.slow  # five fresh processes that import torch (70 s on a loaded 2-core machine)
def test_submitit_local_executor_collects_the_results_of_jobs_1(tmp_path, capsys):
    pytest.importorskip("submitit")
    reference, out = tmp_path / "jobs1", tmp_path / "submitit"
    assert main(["compare", "--jobs", "1", "--no-progress", "--out", str(reference), *TINY]) == 0
    shutil.copytree(reference / "stl", out / "stl")  # the baselines: skipped as finished
    capsys.readouterr()
    args = ["compare", "--launcher", "submitit", "--cluster", "local", "--cpus", "2"]
    assert main([*args, "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "2 job(s) run, 1 skipped" in printed
    assert printed.count("submitted as job") == 2
    assert len(list((out / "submitit").glob("*_submitted.pkl"))) == 2
    rows, expected = read_rows(out), read_rows(reference)
    assert (
        [r["run"] for r in rows]
        == [r["run"] for r in expected]
        == [
            "ew-joint-seed0",
            "mgda-joint-seed0",
        ]
    )
    for a, b in zip(rows, expected):
        assert list(a) == list(b)
        for key in a.keys() - TIMING:  # the same seeds: the same numbers (float32 rounding)
            assert a[key] == b[key] or math.isclose(float(a[key]), float(b[key]), rel_tol=1e-5)
    # Invoked again: every run is finished, nothing is submitted.
    assert main([*args, "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "0 job(s) run, 3 skipped" in printed and "submitted" not in printed
    assert len(list((out / "submitit").glob("*_submitted.pkl"))) == 2
    assert read_rows(out) == rows


@pytest.mark.slow  # three local submitit jobs (about 12 s)
def test_the_slurm_example_runs_on_the_local_executor(tmp_path, capsys):
    import runpy
    from pathlib import Path

    pytest.importorskip("submitit")
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "grid_on_slurm.py"))
    assert example["main"]([str(tmp_path / "grid")]) == 0
    assert "3 job(s) run, 0 skipped" in capsys.readouterr().out
    assert [r["run"] for r in read_rows(tmp_path / "grid")] == [
        "ew-joint-seed0",
        "mgda-joint-seed0",
    ]
    assert example["main"]([]) == 2  # no folder: the usage


def test_the_options_become_sbatch_lines(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # no srun
    options = check_submitit_options(
        {"partition": "gpu", "time": 90, "gpus": 1, "cpus": 8, "mem_gb": 32, "account": "lab"}
    )
    executor = submitit.AutoExecutor(folder=str(tmp_path), cluster="slurm")
    executor.update_parameters(name="mtlkit", **executor_parameters(options))
    script = executor._executor._make_submission_file_text("python -c pass", "0")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --account=lab",
        "#SBATCH --nodes=1",
    ):
        assert line in script


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition", "gpu"], "--partition: options of --launcher submitit (launcher is local)"),
        (["--launcher", "submitit", "--time", "0"], "submitit.time must be > 0, got 0"),
        (["--launcher", "submitit", "--cluster", "pbs"], "submitit.cluster must be one of slurm"),
        (["submitit={partitio: gpu}"], "submitit has no option 'partitio'; valid: cluster"),
        (["launcher=slurm"], "launcher must be one of local, submitit; got 'slurm'"),
        (["--launcher", "submitit", "--jobs", "0"], "must be >= 1, got 0"),
    ],
)
def test_launcher_errors_are_one_line_before_any_run(args, message, tmp_path, capsys):
    pytest.importorskip("submitit")
    code = main(["compare", "--out", str(tmp_path / "out"), *TINY, *args])
    assert code == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out" / "runs").exists()


def test_options_are_typed():
    with pytest.raises(ConfigError, match=r"submitit\.gpus must be int, got '1'"):
        check_submitit_options({"gpus": "1"})
    with pytest.raises(ConfigError, match="submitit must be a mapping"):
        check_submitit_options(["gpu"])
    assert executor_parameters({"time": 5, "partition": "p"}) == {
        "nodes": 1,
        "tasks_per_node": 1,
        "timeout_min": 5,
        "slurm_partition": "p",
    }


def test_a_missing_submitit_names_the_extra(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)
    args = ["compare", "--launcher", "submitit", "--out", str(tmp_path / "o"), *TINY]
    assert main(args) == 2
    assert 'pip install "mtlkit[submitit]"' in one_line_error(capsys)
    with pytest.raises(MtlkitError, match=r"mtlkit\[submitit\]"):
        from mtlkit.app.compare.cluster import require_submitit

        require_submitit()
