"""Experiment trackers against the real packages: MLflow on a local file store, Weights & Biases
in offline mode (its run file read back record by record); each gets the rows of steps.csv and
metrics.csv, the config and the result files."""

from __future__ import annotations

import csv
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtlkit import Budget, Joint, Trainer, methods
from mtlkit.architectures import HPS
from mtlkit.data.benchmarks import DATASETS
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.training.optim import optimizer
from mtlkit.training.trackers import (
    RESULT_FILES,
    TRACKERS_NAME,
    MlflowTracker,
    WandbTracker,
    build_trackers,
    flatten_config,
)

CONFIG = {"method": "ew", "lr": 3e-3, "method_args": {"c": 0.4}, "tasks": None, "note": "t"}


class Crash(Exception):
    pass


def make_trainer(out_dir, loggers, epochs=2, crash_at=None, **kwargs):
    torch.manual_seed(0)
    problem = DATASETS.get("multidigits", seed=0, n_train=192, n_val=64, n_test=64)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(96, 32), nn.ReLU())
    model = HPS(encoder, {t: nn.Linear(32, k) for t, k in problem.task_outputs.items()})
    if crash_at is not None:

        def on_train_step(step: int) -> None:
            if step == crash_at:
                raise Crash

        model.on_train_step = on_train_step
    trainer = Trainer(
        model,
        problem.tasks,
        Joint(methods.UW()),  # weights that move: the weight/* columns are not constants
        optimizer("adam", lr=3e-3),
        budget=Budget(epochs=epochs),
        out_dir=out_dir,
        progress=False,
        config=CONFIG,
        loggers=loggers,
        **kwargs,
    )
    loaders = {
        split: DataLoader(
            ds, batch_size=64, shuffle=split == "train", generator=torch.Generator().manual_seed(5)
        )
        for split, ds in problem.splits.items()
    }
    return trainer, loaders


def train(trainer, loaders, resume=False):
    trainer.fit(loaders["train"], loaders["val"], resume=resume)
    trainer.evaluate(loaders["test"])
    trainer.close()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def csv_series(rows, x, column):
    """``[(x, value)]`` of a CSV column, as the trackers get it (empty cells left out)."""
    return [(int(r[x]), float(r[column])) for r in rows if r[column] not in ("", "nan")]


# ------------------------------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 asks for it
    return (tmp_path / "mlruns").as_uri()


def mlflow_run(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "mtlkit"]
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def assert_series(got, expected):
    """The tracker's points equal the CSV's (which rounds to 6 significant digits)."""
    assert [s for s, _ in sorted(got)] == [s for s, _ in expected]
    assert [v for _, v in sorted(got)] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_mlflow_gets_the_csv_rows_the_config_and_the_result_files(tmp_path, mlflow_store):
    out = tmp_path / "run"
    trainer, loaders = make_trainer(out, [MlflowTracker(tracking_uri=mlflow_store)])
    train(trainer, loaders)
    client, run = mlflow_run(mlflow_store)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    steps, epochs = read_csv(out / "steps.csv"), read_csv(out / "metrics.csv")
    assert len(steps) == 6 and len(epochs) == 2
    for column in ("loss/left", "loss/sum", "weight/right", "epoch"):
        assert_series(history(client, run.info.run_id, column), csv_series(steps, "step", column))
    for column in ("val/left/acc", "val/sum/mae", "train/right/loss", "steps", "passes"):
        assert_series(history(client, run.info.run_id, column), csv_series(epochs, "epoch", column))
    weights = [v for _, v in history(client, run.info.run_id, "weight/left")]
    assert len(set(weights)) > 1  # UW moves them: the test would see a shifted series
    params = run.data.params
    assert params == flatten_config(CONFIG)
    assert params["method_args.c"] == "0.4" and params["tasks"] == "null"
    summary = json.loads((out / "summary.json").read_text())
    test = summary["results"]["test"]
    assert run.data.metrics["results/test/left/acc"] == pytest.approx(test["left"]["acc"])
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert names == {"summary.json", "metrics.csv", "steps.csv", "model.pt"}
    uploaded = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path)))
    assert json.loads(uploaded.read_text())["results"]["test"] == test  # the final summary
    assert set(RESULT_FILES) >= names


def test_a_resumed_run_continues_its_mlflow_run_without_repeated_steps(tmp_path, mlflow_store):
    out = tmp_path / "run"
    loggers = [MlflowTracker(tracking_uri=mlflow_store)]
    crashing, loaders = make_trainer(out, loggers, epochs=3, crash_at=5, checkpoint_every=3)
    with pytest.raises(Crash):  # checkpoint after step 3, step 4 logged
        crashing.fit(loaders["train"], loaders["val"])
    client, run = mlflow_run(mlflow_store)
    assert run.info.status == "FAILED"
    before = history(client, run.info.run_id, "loss/left")
    record = json.loads((out / TRACKERS_NAME).read_text())
    assert record["mlflow"]["id"] == run.info.run_id
    assert record["mlflow"]["logged"]["steps"] == before[-1][0] == 4
    resumed, loaders = make_trainer(out, [MlflowTracker(tracking_uri=mlflow_store)], epochs=3)
    train(resumed, loaders, resume=True)
    client, again = mlflow_run(mlflow_store)  # one run still: the same one
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = read_csv(out / "steps.csv")
    got = history(client, run.info.run_id, "loss/left")
    assert len(steps) == 9
    assert_series(got, csv_series(steps, "step", "loss/left"))  # each step once, 1..9


def test_mlflow_error_names_the_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    trainer, loaders = make_trainer(tmp_path / "run", [MlflowTracker(tracking_uri=uri)])
    import mlflow

    if int(mlflow.__version__.split(".")[0]) < 3:
        pytest.skip("MLflow 2 takes a file store without asking")
    with pytest.raises(MtlkitError, match=f"MLflow at {uri}: .*MLFLOW_ALLOW_FILE_STORE"):
        trainer.fit(loaders["train"], loaders["val"])


# -------------------------------------------------------------------------------------- wandb


def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``): a ``:W&B`` header, then LevelDB
    log records (7-byte header: CRC-32 of type and data, length, type; 32 KiB blocks) that
    hold serialised ``wandb.proto.wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<H", raw[4:6])[0] == 0xBEE1
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # the block's padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        parts += data
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return tmp_path


def test_wandb_offline_gets_the_csv_rows_the_config_and_the_result_files(wandb_offline):
    out = wandb_offline / "run"
    trainer, loaders = make_trainer(out, ["wandb"])
    train(trainer, loaders)
    import wandb

    wandb.teardown()  # finish() returns before wandb's service has written the whole run file
    record = json.loads((out / TRACKERS_NAME).read_text())
    (run_file,) = (out / "wandb").glob(f"offline-run-*/run-{record['wandb']['id']}.wandb")
    rows, configs, artifacts, summary, exit_code = [], {}, [], {}, None
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "run":
            configs = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
            assert rec.run.display_name == "run"
        elif kind == "artifact":
            artifacts.append((rec.artifact.type, [m.path for m in rec.artifact.manifest.contents]))
        elif kind == "summary":
            summary.update(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.summary.update
                }
            )
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    steps, epochs = read_csv(out / "steps.csv"), read_csv(out / "metrics.csv")
    step_rows = [r for r in rows if "steps/step" in r]
    epoch_rows = [r for r in rows if "metrics/epoch" in r]
    assert len(step_rows) == len(steps) == 6 and len(epoch_rows) == len(epochs) == 2
    for column in ("loss/left", "weight/right", "epoch"):
        got = [(r["steps/step"], r[f"steps/{column}"]) for r in step_rows]
        assert_series(got, csv_series(steps, "step", column))
    for column in ("val/left/acc", "val/sum/mae", "steps"):
        got = [(r["metrics/epoch"], r[f"metrics/{column}"]) for r in epoch_rows]
        assert_series(got, csv_series(epochs, "epoch", column))
    assert {k: v for k, v in configs.items() if not k.startswith("_")} == CONFIG
    test = json.loads((out / "summary.json").read_text())["results"]["test"]
    assert summary["results/test/left/acc"] == pytest.approx(test["left"]["acc"])
    assert artifacts == [("results", ["metrics.csv", "model.pt", "steps.csv", "summary.json"])]
    assert exit_code == 0


# ------------------------------------------------------------------------- names and errors


def test_logger_names_and_options_are_checked():
    with pytest.raises(ConfigError, match=r"unknown logger\(s\) 'neptune'; valid: tensorboard"):
        build_trackers(["neptune"])
    with pytest.raises(ConfigError, match="'mlflow' more than once"):
        build_trackers(["mlflow", "mlflow"])
    with pytest.raises(ConfigError, match=r"logger_args\.project is an option of wandb"):
        build_trackers(["mlflow"], {"project": "p"})
    with pytest.raises(ConfigError, match="no option 'projekt'; valid: project"):
        build_trackers(["wandb"], {"projekt": "p"})
    assert build_trackers(["tensorboard"]) == []


def test_loggers_need_an_out_dir(tmp_path):
    pytest.importorskip("mlflow")
    with pytest.raises(MtlkitError, match=r"loggers \['mlflow'\] mirror the run's logs"):
        make_trainer(None, ["mlflow"])


@pytest.mark.parametrize(("name", "extra"), [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_package_names_its_extra(monkeypatch, name, extra):
    monkeypatch.setitem(sys.modules, name, None)  # import wandb / mlflow fails
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(MtlkitError, match=rf'pip install "mtlkit\[{extra}\]"'):
        build_trackers([name])
    tracker = WandbTracker if name == "wandb" else MlflowTracker
    with pytest.raises(MtlkitError, match=rf"mtlkit\[{extra}\]"):
        tracker()


# ------------------------------------------------------------------------ config and command line


def test_mtlkit_train_logger_flag_and_logger_args(tmp_path, mlflow_store, capsys):
    from mtlkit.app.cli import main
    from mtlkit.app.config import load_config

    out = tmp_path / "run"
    fast = ["data_args.n_train=128", "data_args.n_val=64", "data_args.n_test=64", "epochs=1"]
    argv = ["train", *fast, "--no-progress", "plots=false", "--out", str(out)]
    argv += ["--logger", "mlflow,tensorboard", f"logger_args.tracking_uri={mlflow_store}"]
    assert main(argv) == 0
    saved = load_config(out / "config.yaml")
    assert saved.loggers == ["mlflow", "tensorboard"]
    assert saved.logger_args == {"tracking_uri": mlflow_store}
    assert list((out / "tb" / "steps").glob("events.out.tfevents.*"))  # tensorboard as before
    client, run = mlflow_run(mlflow_store)
    assert run.data.params == flatten_config(saved.to_dict())
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert names == {"summary.json", "metrics.csv", "steps.csv", "config.yaml", "model.pt"}
    steps = read_csv(out / "steps.csv")
    assert_series(
        history(client, run.info.run_id, "loss/left"), csv_series(steps, "step", "loss/left")
    )


def test_config_keys_loggers_and_logger_args_are_validated():
    from mtlkit.app.config import TrainConfig, load_config

    assert TrainConfig(loggers="wandb, mlflow").loggers == ["wandb", "mlflow"]
    assert load_config(None, ["loggers=[mlflow]"]).loggers == ["mlflow"]
    with pytest.raises(ConfigError, match=r"unknown logger\(s\) 'comet'"):
        load_config(None, ["loggers=comet"])
    with pytest.raises(ConfigError, match=r"logger_args\.experiment is an option of mlflow"):
        load_config(None, ["loggers=wandb", "logger_args.experiment=x"])
    with pytest.raises(ConfigError, match="unknown config key 'logger'"):
        load_config(None, ["logger=wandb"])


def test_the_mlflow_example_runs(tmp_path, mlflow_store, capsys):
    import runpy

    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "track_with_mlflow.py"))
    result = example["main"](tmp_path, epochs=1, n_train=128)
    assert result["steps"] == 2 and result["artifacts"] == 4
    assert "(FINISHED)" in capsys.readouterr().out


def test_the_wandb_example_runs_offline(wandb_offline, capsys):
    import runpy

    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "track_with_wandb.py"))
    result = example["main"](wandb_offline, epochs=1, n_train=128)
    (run,) = result["runs"]
    assert run.name.startswith("offline-run-") and any(run.glob("*.wandb"))
    assert "wandb (offline) run folder(s)" in capsys.readouterr().out
