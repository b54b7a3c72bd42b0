"""The command line: train, list, config overrides and user errors (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from mtlkit.app.cli import main
from mtlkit.app.config import TrainConfig, load_config
from mtlkit.errors import ConfigError

FAST = ["data_args.n_train=256", "data_args.n_val=128", "data_args.n_test=128", "--no-progress"]


def test_train_prints_a_table_and_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--epochs",
            "2",
            "--method",
            "pcgrad",
            "--rep-grad",
            "--seed",
            "1",
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "left" in printed and "acc" in printed and "mae" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["method"] == "pcgrad" and summary["config"]["rep_grad"] is True
    assert summary["cost"]["epochs"] == 2
    assert set(summary["results"]["test"]) == {"left", "right", "sum"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 1 and saved["data_args"]["n_train"] == 256


def test_default_output_folder_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", "steps=2", "epochs=null", *FAST]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["multidigits-hps-ew-joint-s0", "multidigits-hps-ew-joint-s0-1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--method", "nash"], "unknown method 'nash'; valid methods: "),
        (["train", "lr=-1"], "lr must be > 0"),
        (["train", "learning_rate=0.1"], "unknown config key 'learning_rate'; valid keys: data"),
        (["train", "epochs=ten"], "config key 'epochs' must be int or null, got 'ten'"),
        (["train", "method_args.c=0.4"], "method 'ew' has no argument(s) c; valid arguments"),
        (["train", "--arch", "mtann"], "unknown architecture 'mtann'; valid architectures: "),
        (["train", "--data", "nyu"], "unknown dataset 'nyu'"),
        (["train", "--device", "cuda:7"], "device"),
        (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["train", "--resume", "missing"], "--resume 'missing': no such folder"),
        (["train", "checkpoint_every=0"], "checkpoint_every must be >= 1"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtlkit: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_overrides_may_come_before_and_after_flags(capsys):
    assert main(["train", "lr=0.5", "--seed", "3", "batch_size=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["lr"], printed["seed"], printed["batch_size"]) == (0.5, 3, 7)
    with pytest.raises(SystemExit) as info:
        main(["train", "--seed", "3", "--bogus"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["list", "lr=1"])


def test_config_file_overrides_and_print_config(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("method: uw\nmethod_args: {forms: classification}\nepochs: 3\n")
    assert main(["train", "--config", str(path), "epochs=4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "uw" and printed["epochs"] == 4
    assert printed["method_args"] == {"forms": "classification"}
    path.write_text("methd: uw\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(path)


def test_config_types_are_checked_and_converted():
    assert load_config(overrides=["lr=1"]).lr == 1.0  # int accepted for float
    with pytest.raises(ConfigError, match="rep_grad"):
        TrainConfig(rep_grad="yes")
    with pytest.raises(ConfigError, match="at least one budget"):
        load_config(overrides=["epochs=null"])


def test_list_shows_every_registry_with_arguments(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    for line in [
        "methods:",
        "ew(reduction",
        "mgda(",
        "pcgrad(",
        "uw(num_tasks",
        "architectures:",
        "hps(backbone",
        "strategies:",
        "joint()",
        "datasets:",
        "multidigits(seed",
    ]:
        assert line in printed


def test_python_dash_m_works():
    result = subprocess.run(
        [sys.executable, "-m", "mtlkit", "list"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "pcgrad" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "mtlkit", "train", "--method", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "unknown method 'x'" in result.stderr
