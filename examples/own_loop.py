"""mtlkit in your own training loop: a step driver around plain PyTorch.

Trains a hard-parameter-sharing MLP on the embedded MultiDigits benchmark, balancing the tasks
with MGDA (the exact min-norm point of the task gradients w.r.t. the shared encoder) or any other
registered method (``python examples/own_loop.py famo``), then prints the test accuracy of each
digit classifier. ``mtlkit.Step`` runs the method's whole step protocol (its hooks before and
after the optimizer step, at epoch ends, extra batches), so stateful methods such as FAMO, DWA or
GradNorm train here exactly as in the Trainer. Runs offline in a few seconds:

    python examples/own_loop.py [METHOD]
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

import mtlkit
from mtlkit.data import multidigits, multidigits_tasks


def main(epochs: int = 3, seed: int = 0, method: str = "mgda") -> dict[str, float]:
    torch.manual_seed(seed)
    data = multidigits(seed=seed)
    tasks = multidigits_tasks()
    encoder = nn.Sequential(
        nn.Flatten(), nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU()
    )
    heads = nn.ModuleDict(
        {"left": nn.Linear(128, 10), "right": nn.Linear(128, 10), "sum": nn.Linear(128, 1)}
    )
    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=1e-3)
    train = DataLoader(data["train"], batch_size=64, shuffle=True)
    extra = DataLoader(data["train"], batch_size=64, shuffle=True)  # for MoDo, Auto-Lambda, ...

    def task_losses(batch):
        x, y = batch
        z = encoder(x)
        return [task.loss(heads[task.name](z), y[task.name]) for task in tasks]

    step = mtlkit.Step(
        mtlkit.methods.get(method),
        optimizer,
        task_losses,
        shared=encoder.parameters(),
        extra_batches=extra,
    )
    for _ in range(epochs):
        for batch in train:
            step(batch)  # zero_grad, forward, the method's backward, optimizer.step, hooks
        step.end_epoch()

    accuracy = {}
    with torch.no_grad():
        x, y = next(iter(DataLoader(data["test"], batch_size=len(data["test"]))))
        z = encoder(x)
        for name in ("left", "right"):
            accuracy[name] = (heads[name](z).argmax(1) == y[name]).float().mean().item()
    return accuracy


if __name__ == "__main__":
    for task, acc in main(method=sys.argv[1] if len(sys.argv) > 1 else "mgda").items():
        print(f"{task}: test accuracy {acc:.3f}")
