"""mtlkit in your own training loop: three lines around plain PyTorch.

Trains a hard-parameter-sharing MLP on the embedded MultiDigits benchmark, balancing the tasks
with MGDA (the exact min-norm point of the task gradients w.r.t. the shared encoder), then prints
the test accuracy of each digit classifier. Runs offline in a few seconds:

    python examples/own_loop.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

import mtlkit
from mtlkit.data import multidigits, multidigits_tasks


def main(epochs: int = 3, seed: int = 0) -> dict[str, float]:
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
    method = mtlkit.methods.MGDA()
    train = DataLoader(data["train"], batch_size=64, shuffle=True)

    for _ in range(epochs):
        for x, y in train:
            z = encoder(x)
            losses = [task.loss(heads[task.name](z), y[task.name]) for task in tasks]
            optimizer.zero_grad()
            mtlkit.backward(losses, shared=encoder.parameters(), method=method)
            optimizer.step()

    accuracy = {}
    with torch.no_grad():
        x, y = next(iter(DataLoader(data["test"], batch_size=len(data["test"]))))
        z = encoder(x)
        for name in ("left", "right"):
            accuracy[name] = (heads[name](z).argmax(1) == y[name]).float().mean().item()
    return accuracy


if __name__ == "__main__":
    for task, acc in main().items():
        print(f"{task}: test accuracy {acc:.3f}")
