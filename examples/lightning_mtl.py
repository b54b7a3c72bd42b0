"""mtlkit in a PyTorch Lightning module: several task losses, balanced by any mtlkit method.

Trains a hard-parameter-sharing MLP on the embedded MultiDigits benchmark (two digit classifiers
and their sum) with Lightning, the tasks balanced by UPGrad on the shared encoder's parameters,
or by any other registered method and route::

    python examples/lightning_mtl.py [METHOD] [--features] [--devices N]

``--features`` takes the cheaper features route (the Jacobian w.r.t. the shared representation);
``--devices 2`` trains with Lightning's DDP (forked CPU processes), mtlkit reducing the Jacobian
(or losses) of the global batch across them. Needs ``pip install "mtlkit[lightning]"``; runs
offline in a few seconds.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import mtlkit
from mtlkit.data import multidigits, multidigits_tasks
from mtlkit.integrations.lightning import MultiTaskModule
from mtlkit.parallel.ddp import shard_loader


class MultiDigitsModule(MultiTaskModule, L.LightningModule):
    def __init__(self, method: str = "upgrad", features: bool = False, train_size: int = 5000):
        super().__init__()
        self.tasks = multidigits_tasks()
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU()
        )
        self.heads = nn.ModuleDict(
            {"left": nn.Linear(128, 10), "right": nn.Linear(128, 10), "sum": nn.Linear(128, 1)}
        )
        self.data = multidigits(seed=0)
        self.train_size = train_size
        self.features = features
        self.configure_mtl(
            mtlkit.methods.get(method), tasks=[t.name for t in self.tasks], features=features
        )

    # what the mixin needs: the shared parameters, the task heads, one forward pass
    def shared_parameters(self):
        return self.encoder.parameters()

    def task_parameters(self, task):
        return self.heads[task].parameters()

    def task_losses(self, batch):
        x, y = batch
        z = self.encoder(x)
        losses = {t.name: t.loss(self.heads[t.name](z), y[t.name]) for t in self.tasks}
        return mtlkit.ForwardResult(losses, features=z) if self.features else losses

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        train = Subset(self.data["train"], range(self.train_size))
        loader = DataLoader(train, batch_size=64, shuffle=True)
        # under DDP each process takes a contiguous part of every global batch of 64
        return shard_loader(loader, self.global_rank, self.trainer.world_size)

    def accuracy(self) -> dict[str, float]:
        x, y = next(iter(DataLoader(self.data["test"], batch_size=len(self.data["test"]))))
        with torch.no_grad():
            z = self.encoder(x)
            return {
                t: (self.heads[t](z).argmax(1) == y[t]).float().mean().item()
                for t in ("left", "right")
            }


def main(
    method: str = "upgrad",
    features: bool = False,
    epochs: int = 3,
    devices: int = 1,
    train_size: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    torch.manual_seed(seed)
    module = MultiDigitsModule(method, features, train_size)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        use_distributed_sampler=False,  # the shards come from shard_loader
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return module.accuracy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", nargs="?", default="upgrad")
    parser.add_argument("--features", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    for task, acc in main(args.method, args.features, args.epochs, args.devices).items():
        print(f"{task}: test accuracy {acc:.3f}")
