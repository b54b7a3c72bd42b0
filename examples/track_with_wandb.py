"""mtlkit's Trainer logging to Weights & Biases: every optimizer step's task losses and weights,
every epoch's validation metrics, the config and, at ``close()``, the result files as an
artifact.

Trains a hard-parameter-sharing MLP on the embedded MultiDigits benchmark with FAMO into
``RUN_DIR``. By default wandb runs offline (``WANDB_MODE=offline``, set here unless you set it):
the run is written under ``RUN_DIR/run/wandb/offline-run-*``, and ``wandb sync`` on that folder
uploads it later. With ``WANDB_MODE=online`` and an API key it goes to your project at once.
Needs ``pip install "mtlkit[wandb]"``; runs offline in a few seconds:

    python examples/track_with_wandb.py [RUN_DIR]
    wandb sync RUN_DIR/run/wandb/offline-run-*      # later, with a network and an API key
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
from mtlkit.training.trackers import WandbTracker


def main(run_dir: Path, epochs: int = 2, n_train: int = 512) -> dict[str, object]:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.manual_seed(0)
    data = multidigits(seed=0, n_train=n_train, n_val=128, n_test=128)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(96, 64), nn.ReLU())
    heads = {"left": nn.Linear(64, 10), "right": nn.Linear(64, 10), "sum": nn.Linear(64, 1)}
    trainer = mtlkit.Trainer(
        mtlkit.architectures.HPS(encoder, heads),
        multidigits_tasks(),
        mtlkit.Joint(mtlkit.methods.FAMO()),
        budget=mtlkit.Budget(epochs=epochs),
        out_dir=run_dir / "run",
        config={"method": "famo", "epochs": epochs, "encoder": "mlp64"},
        progress=False,
        loggers=[WandbTracker(project="mtlkit-examples", tags=["multidigits"])],
    )
    loader = {s: DataLoader(d, batch_size=64, shuffle=s == "train") for s, d in data.items()}
    trainer.fit(loader["train"], loader["val"])
    test = trainer.evaluate(loader["test"])
    trainer.close()  # the result files as an artifact; the wandb run ends
    runs = sorted((run_dir / "run" / "wandb").glob("*run-*"))
    print(f"wandb ({os.environ['WANDB_MODE']}) run folder(s): {[str(r) for r in runs]}")
    print(f"  test accuracy left {test['left']['acc']:.3f}, right {test['right']['acc']:.3f}")
    return {"runs": runs, "test_left_acc": test["left"]["acc"]}


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mtlkit-"))
    main(where)
