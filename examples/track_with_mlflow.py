"""mtlkit's Trainer logging to MLflow: every optimizer step's task losses and weights, every
epoch's validation metrics, the config as params and the result files as artifacts.

Trains a hard-parameter-sharing MLP on the embedded MultiDigits benchmark with uncertainty
weighting into ``RUN_DIR`` and logs it to a local MLflow store (``RUN_DIR/mlruns``; MLflow 3.7+
wants ``MLFLOW_ALLOW_FILE_STORE=true`` for a folder store, set here), then reads the run back
with MLflow's client. Needs ``pip install "mtlkit[mlflow]"``; runs offline in a few seconds:

    python examples/track_with_mlflow.py [RUN_DIR]
    mlflow ui --backend-store-uri RUN_DIR/mlruns   # with the full mlflow package
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import mtlkit
from mtlkit.data import multidigits, multidigits_tasks
from mtlkit.training.trackers import MlflowTracker


def main(run_dir: Path, epochs: int = 2, n_train: int = 512) -> dict[str, float]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (run_dir / "mlruns").resolve().as_uri()
    torch.manual_seed(0)
    data = multidigits(seed=0, n_train=n_train, n_val=128, n_test=128)
    tasks = multidigits_tasks()
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(96, 64), nn.ReLU())
    heads = {"left": nn.Linear(64, 10), "right": nn.Linear(64, 10), "sum": nn.Linear(64, 1)}
    model = mtlkit.architectures.HPS(encoder, heads)
    trainer = mtlkit.Trainer(
        model,
        tasks,
        mtlkit.Joint(mtlkit.methods.UW()),
        budget=mtlkit.Budget(epochs=epochs),
        out_dir=run_dir / "run",
        config={"method": "uw", "epochs": epochs, "encoder": "mlp64"},
        progress=False,
        loggers=[MlflowTracker(tracking_uri=store, experiment="examples")],
    )
    loader = {s: DataLoader(d, batch_size=64, shuffle=s == "train") for s, d in data.items()}
    trainer.fit(loader["train"], loader["val"])
    test = trainer.evaluate(loader["test"])
    trainer.close()  # uploads summary.json, metrics.csv, steps.csv, model.pt; ends the run

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("examples")
    (run,) = client.search_runs([experiment.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "loss/left")
    artifacts = sorted(f.path for f in client.list_artifacts(run.info.run_id))
    print(f"MLflow run {run.info.run_id} ({run.info.status}) in {store}")
    print(f"  params: {run.data.params}")
    print(f"  loss/left at {len(losses)} steps: {losses[0].value:.3f} -> {losses[-1].value:.3f}")
    accuracy = client.get_metric_history(run.info.run_id, "val/left/acc")
    print(f"  val/left/acc per epoch: {[round(m.value, 3) for m in accuracy]}")
    print(f"  artifacts: {artifacts}")
    print(f"  test accuracy left {test['left']['acc']:.3f}, right {test['right']['acc']:.3f}")
    return {"steps": len(losses), "artifacts": len(artifacts), "test_left_acc": test["left"]["acc"]}


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mtlkit-"))
    main(where)
