"""DDP on CPU processes (gloo) against one process: steps per second and bytes communicated.

One ``Joint`` step of an HPS model (MLP encoder, m heads, random regression targets) on a global
batch, through the same pieces the Trainer uses (:class:`mtlkit.parallel.ddp.Parallel`: the
losses' global values, the reducer hook of the engine, the gradient all-reduce in the optimizer
step). For each method and route:

* ``1 proc``: steps/s of one process on the whole batch, with all the cores (``--threads``);
* ``N procs``: steps/s of ``N`` processes on a shard each (the cores split between them);
* ``ratio``: ``N procs / 1 proc`` (above 1: DDP is faster);
* ``bytes/step``: the payload that each process puts through collectives per step (an
  all-reduce counts its tensor once, an all-gather its gathered result), by kind: ``jacobian``
  (the parameter route's ``[m, n]``), ``gramian`` (the features route's ``[m, m]``), ``features``
  (a gathered feature Jacobian), ``gradients`` (the all-reduced ``.grad``), ``losses`` and
  ``control`` (flags, gradient presence). Plain DDP would all-reduce every gradient once
  (``plain DDP``).

The parameter-route Gramian engine (``route=gramian``) runs in one process only: under DDP the
Gramian of the global batch has cross terms between the processes' Jacobians, so mtlkit refuses
it (``refused``); its row gives the one-process speed and what an exact DDP step would have to
move instead (the ``[m, n]`` Jacobian all-reduce of the parameter route).

    python benchmarks/bench_ddp.py [--procs 2] [--tasks 4] [--batch 256] [--steps 10]
                                   [--repeats 5] [--threads N (in all, split between procs)]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mtlkit import ConfigError, methods
from mtlkit.architectures import HPS
from mtlkit.parallel.ddp import Parallel, shard_batch
from mtlkit.training.forward import ForwardResult
from mtlkit.training.optim import optimizer
from mtlkit.training.strategies import Joint, StrategyContext

# label -> (registered method, rep_grad, route)
CASES = {
    "EW": ("ew", False, "auto"),
    "UPGrad, parameters (Jacobian)": ("upgrad", False, "auto"),
    "UPGrad, parameters, route=gramian": ("upgrad", False, "gramian"),
    "UPGrad, features (Gramian)": ("upgrad", True, "auto"),
    "GradVac, features (gathered J)": ("gradvac", True, "auto"),
}


def build(tasks: int, width: int) -> HPS:
    torch.manual_seed(0)
    sizes = [128, width, width, 64]
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    encoder = nn.Sequential(*(m for layer in layers for m in (layer, nn.ReLU())))
    heads = {
        f"t{i}": nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)) for i in range(tasks)
    }
    return HPS(encoder, heads)


def measure(rank: int, world: int, args: argparse.Namespace, label: str) -> dict:
    """Steps/s and bytes per step of one case in this process."""
    name, rep_grad, route = CASES[label]
    model = build(args.tasks, args.width)
    tasks = list(model.heads)
    parallel = Parallel(distributed=world > 1)
    method = methods.get(name, generator=0) if name == "gradvac" else methods.get(name)
    strategy = Joint(method)
    try:
        strategy.setup(
            StrategyContext(
                model,
                tasks,
                optimizer("sgd", lr=0.01),
                rep_grad=rep_grad,
                route=route,
                reducer=parallel.reducer,
                optimizer_step=parallel.optimizer_step,
            )
        )
    except ConfigError as error:  # route=gramian under DDP (on every process alike)
        return {"refused": str(error)}
    parallel.attach(model, strategy.methods())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 128, generator=gen)
    y = {t: torch.randn(args.batch, generator=gen) for t in tasks}
    batch = shard_batch((x, y), rank, world)

    def compute_losses(b):
        inputs, targets = b
        outputs, z = model(inputs, return_features=True)
        losses = {t: ((outputs[t].squeeze(-1) - targets[t]) ** 2).mean() for t in tasks}
        return parallel.prepare(ForwardResult(losses, z))

    for i in range(3):  # warm-up
        strategy.step(batch, compute_losses, i)
    reducer = parallel.reducer
    if reducer is not None:
        reducer.traffic.reset()
    rates = []
    for _ in range(args.repeats):  # the median of several timed blocks: the machine is shared
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for i in range(args.steps):
            strategy.step(batch, compute_losses, i)
        if world > 1:
            dist.barrier()
        rates.append(args.steps / (time.perf_counter() - start))
    traffic = {} if reducer is None else dict(reducer.traffic.bytes)
    params = sum(p.numel() for p in model.parameters())
    return {
        "steps_per_s": statistics.median(rates),
        "bytes": {k: v / (args.steps * args.repeats) for k, v in traffic.items()},
        "plain_ddp": params * 4,
        "shared": sum(p.numel() for p in model.shared_parameters()),
    }


def worker(rank: int, world: int, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/store-{world}", rank=rank, world_size=world
        )
    try:
        results = {label: measure(rank, world, args, label) for label in CASES}
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        torch.save(results, Path(folder) / f"results-{world}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        worker(0, 1, args, folder)
        mp.spawn(worker, args=(args.procs, args, folder), nprocs=args.procs, join=True)
        single = torch.load(Path(folder) / "results-1.pt", weights_only=False)
        multi = torch.load(Path(folder) / f"results-{args.procs}.pt", weights_only=False)
    first = next(iter(single.values()))
    print(
        f"torch {torch.__version__}, {args.threads} threads in all, m = {args.tasks} tasks, "
        f"shared parameters n = {first['shared']}, global batch {args.batch}, "
        f"median of {args.repeats} blocks of {args.steps} steps, float32"
    )
    print(
        f"\n| method, route | 1 proc steps/s | {args.procs} procs steps/s | ratio | "
        "bytes/step | by kind | plain DDP |"
    )
    print("|---|---:|---:|---:|---:|---|---:|")
    refused = ""
    for label in CASES:
        one, many = single[label], multi[label]
        if "refused" in many:
            jacobian = args.tasks * one["shared"] * 4
            print(
                f"| {label} | {one['steps_per_s']:.1f} | refused | - | - | exact needs the "
                f"Jacobian all-reduce, {jacobian / 1e3:.1f} kB | {one['plain_ddp'] / 1e3:.1f} kB |"
            )
            refused = many["refused"]
            continue
        kinds = ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in sorted(many["bytes"].items()))
        total = sum(many["bytes"].values())
        print(
            f"| {label} | {one['steps_per_s']:.1f} | {many['steps_per_s']:.1f} | "
            f"{many['steps_per_s'] / one['steps_per_s']:.2f} | {total / 1e3:.1f} kB | {kinds} | "
            f"{many['plain_ddp'] / 1e3:.1f} kB |"
        )
    if refused:
        print(f"\nroute=gramian under DDP: {refused}")


if __name__ == "__main__":
    main()
