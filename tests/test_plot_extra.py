"""``plots`` and the optional matplotlib: ``plots: true`` without it is an error naming the plot
extra before anything is trained; ``plots: null`` (the default) says so before training and
trains; ``mtlkit.app.runner.run`` draws the figures as ``plots`` says."""

from __future__ import annotations

import sys

import pytest

import mtlkit.app.cli as cli
import mtlkit.app.runner as runner
from mtlkit.app.cli import main
from mtlkit.app.compare.grid import load_grid
from mtlkit.app.config import TrainConfig
from mtlkit.app.plot_option import plots_enabled, plots_note
from mtlkit.app.runner import run
from mtlkit.errors import ConfigError

SMALL = ["data_args.n_train=64", "data_args.n_val=32", "data_args.n_test=32", "--no-progress"]
EXTRA = 'pip install "mtlkit[plot]"'


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib unimportable, as where the plot extra is not installed (``import matplotlib``
    raises ImportError while ``sys.modules`` maps it to None)."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401


def test_plots_true_without_matplotlib_stops_before_training(no_matplotlib, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "steps=2", "epochs=null", "plots=true", "--out", str(out), *SMALL]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mtlkit: error: plots=true: plots need matplotlib")
    assert EXTRA in error and "plots=false" in error and error.count("\n") == 1
    assert not out.exists()  # refused before the run folder, the data or a step
    assert main(["train", "--check", "plots=true", *SMALL]) == 2
    assert EXTRA in capsys.readouterr().err
    config = TrainConfig(steps=2, epochs=None, plots=True, out=str(out))
    with pytest.raises(ConfigError, match=r"plots=true: plots need matplotlib.*mtlkit\[plot\]"):
        run(config, out)
    assert not (out / "metrics.csv").exists()
    with pytest.raises(ConfigError, match=r"mtlkit\[plot\]"):
        load_grid(overrides=["plots=true", "methods=[ew]"])  # mtlkit compare: before any run


def test_default_plots_without_matplotlib_trains_and_says_so_first(
    no_matplotlib, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    seen = []
    original = cli.run

    def run_noting_stderr(*args, **kwargs):
        seen.append(capsys.readouterr().err)  # what was printed before training started
        return original(*args, **kwargs)

    monkeypatch.setattr(cli, "run", run_noting_stderr)
    assert TrainConfig().plots is None and not plots_enabled(TrainConfig())
    assert main(["train", "steps=2", "epochs=null", "--out", str(out), *SMALL]) == 0
    assert len(seen) == 1 and "no figures will be drawn: plots need matplotlib" in seen[0]
    assert EXTRA in seen[0]
    assert (out / "summary.json").is_file() and not list(out.glob("*.png"))
    assert "results written to" in capsys.readouterr().out
    assert plots_note(TrainConfig(plots=False)) is None  # plots=false: nothing to say


def test_run_draws_the_figures_as_plots_says(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn = []
    monkeypatch.setattr(runner, "plot_run", lambda folder: drawn.append(folder) or [])
    base = {"steps": 1, "epochs": None, "data_args": {"n_train": 32, "n_val": 16, "n_test": 16}}
    for plots in (True, None, False):
        out = tmp_path / f"run-{plots}"
        run(TrainConfig(**base, plots=plots, progress=False, out=str(out)), out)
        assert (out / "summary.json").is_file()
    assert drawn == [tmp_path / "run-True", tmp_path / "run-None"]
