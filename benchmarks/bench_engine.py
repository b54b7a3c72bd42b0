"""Overhead of mtlkit's training step and per-task gradient engine against plain PyTorch.

For an MLP and a small CNN with m linear heads, measured side by side in one run:

(a) the EW training step of ``Joint(EW())`` (what the Trainer does per batch) ÷ a hand-written
    PyTorch step (``zero_grad; forward; sum of losses; backward; Adam step``); target ≤ 1.05;
(b) ``mtlkit.jacobian(losses, shared)`` (route "auto") ÷ a loop of per-task
    ``torch.autograd.grad`` calls (target ≤ 1.05), and, for information, the "batched" route ÷ the
    loop and the rep-grad backward (``mtlkit.backward(..., features=z)`` with MGDA) ÷ a plain
    forward + backward. Every variant of (b) includes the forward pass.

Variants of one cell are interleaved in each repetition (in rotating order) after a warm-up, so
that machine noise hits them alike; the tables give medians over repetitions and ratios of medians.
Fast cells take more repetitions than ``--repeats``, within ``--budget`` seconds.

    python benchmarks/bench_engine.py [--quick] [--repeats N] [--budget S] [--tasks 2 5 10 40]
                                      [--device cpu|cuda] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtlkit
from mtlkit.methods import EW, MGDA
from mtlkit.training.forward import ForwardResult
from mtlkit.training.strategies import Joint, StrategyContext

TARGET = 1.05


@dataclass
class Problem:
    encoder: nn.Module
    heads: nn.ModuleList
    x: Tensor
    y: Tensor  # [m, batch] labels, one row per task


def build(model: str, m: int, device: torch.device, seed: int = 0) -> Problem:
    """The encoder, m heads 'width -> 10' and one batch of random data, all seeded."""
    torch.manual_seed(seed)
    if model == "mlp":
        layers = [nn.Linear(a, b) for a, b in itertools.pairwise([784, 512, 512, 256])]
        encoder = nn.Sequential(*(mod for layer in layers for mod in (layer, nn.ReLU())))
        batch, shape = 256, (784,)
    else:
        encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        batch, shape = 64, (3, 32, 32)
    width = 256 if model == "mlp" else 64
    heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(m))
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (m, batch))
    return Problem(encoder.to(device), heads.to(device), x.to(device), y.to(device))


def forward(p: Problem) -> tuple[Tensor, list[Tensor]]:
    """The shared representation z and the per-task cross-entropy losses."""
    z = p.encoder(p.x)
    return z, [F.cross_entropy(head(z), y) for head, y in zip(p.heads, p.y)]


def measure(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    budget: float,
    sync: Callable[[], None],
    burst: int = 1,
) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, interleaved in rotating order: at least ``repeats``
    samples each, more while a repetition of all variants fits ``budget`` seconds in total.

    With ``burst > 1`` each turn of a variant calls it ``burst`` times in a row and the sample is
    the mean of all but the first call: the steady state of a training loop, which repeats one
    step, rather than the first call after another variant (whose caches and freed memory the
    first call pays for: up to 2x for a light step after a heavy one)."""
    names = list(variants)
    cost = 0.0  # seconds of one repetition, from the last warm-up call of each variant
    for fn in variants.values():
        for _ in range(warmup):
            sync()
            start = time.perf_counter()
            fn()
            sync()
        cost += time.perf_counter() - start
    cost *= burst
    repeats = max(repeats, int(budget / cost))
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()  # autograd graphs are freed by reference counting; no collector pauses
    try:
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for call in range(burst):
                    if call == 1 or burst == 1:
                        sync()
                        start = time.perf_counter()
                    variants[name]()
                sync()
                samples[name].append((time.perf_counter() - start) * 1e3 / max(burst - 1, 1))
    finally:
        gc.enable()
    return samples


def step_variants(p: Problem) -> dict[str, Callable[[], object]]:
    """(a): a plain PyTorch training step and Joint(EW()) on identical copies of the model."""
    enc, heads = copy.deepcopy(p.encoder), copy.deepcopy(p.heads)
    opt = torch.optim.Adam([*enc.parameters(), *heads.parameters()], lr=1e-3)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        z = enc(p.x)
        loss = sum(F.cross_entropy(head(z), y) for head, y in zip(heads, p.y))
        loss.backward()
        opt.step()

    tasks = [f"t{i}" for i in range(len(p.heads))]
    model = mtlkit.HPS(copy.deepcopy(p.encoder), dict(zip(tasks, copy.deepcopy(p.heads))))
    strategy = Joint(EW())
    strategy.setup(
        StrategyContext(
            model=model,
            tasks=tasks,
            optimizer_factory=mtlkit.optimizer("adam", lr=1e-3),
            device=p.x.device,
        )
    )

    def compute_losses(batch: tuple[Tensor, Tensor]) -> ForwardResult:
        x, y = batch
        out = model(x)
        return ForwardResult({t: F.cross_entropy(out[t], y[i]) for i, t in enumerate(tasks)})

    counter = itertools.count()
    return {
        "plain": plain,
        "mtlkit": lambda: strategy.step((p.x, p.y), compute_losses, next(counter)),
    }


def engine_variants(p: Problem) -> dict[str, Callable[[], object]]:
    """(b): Jacobian routes against a loop of autograd.grad, rep-grad against fwd+bwd."""
    shared = list(p.encoder.parameters())
    everything = [*shared, *p.heads.parameters()]
    mgda = MGDA()

    def loop() -> Tensor:
        _, losses = forward(p)
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
        return torch.stack(rows)

    def route(name: str) -> Callable[[], Tensor]:
        return lambda: mtlkit.jacobian(forward(p)[1], shared, route=name)

    def fwd_bwd() -> None:
        for t in everything:
            t.grad = None
        sum(forward(p)[1]).backward()

    def rep_grad() -> None:
        for t in everything:
            t.grad = None
        z, losses = forward(p)
        mtlkit.backward(losses, method=mgda, features=z)

    return {
        "loop": loop,
        "auto": route("auto"),
        "batched": route("batched"),
        "fwd_bwd": fwd_bwd,
        "rep_grad": rep_grad,
    }


def run_cell(model: str, m: int, device: torch.device, args: argparse.Namespace) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    p = build(model, m, device)
    timing = (args.repeats, args.warmup, args.budget, sync)
    samples = measure(step_variants(p), *timing)
    samples |= measure(engine_variants(p), *timing)
    ms = {name: statistics.median(s) for name, s in samples.items()}
    spread = {
        name: float(np.subtract(*np.percentile(s, [75, 25]))) / ms[name]
        for name, s in samples.items()
    }
    ratios = {
        "step": ms["mtlkit"] / ms["plain"],
        "auto": ms["auto"] / ms["loop"],
        "batched": ms["batched"] / ms["loop"],
        "rep_grad": ms["rep_grad"] / ms["fwd_bwd"],
    }
    return {
        "model": model,
        "m": m,
        "repeats": {name: len(s) for name, s in samples.items()},
        "ms": ms,
        "iqr_rel": spread,
        "ratios": ratios,
        "pass_a": ratios["step"] <= TARGET,
        "pass_b": ratios["auto"] <= TARGET,
        "samples_ms": samples,
    }


def print_table(title: str, rows: list[dict]) -> None:
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    head = (
        f"{'m':>3} | {'plain step':>10} | {'EW/plain':>8} | {'(a)':>4} || {'fwd+bwd':>8} | "
        f"{'loop jac':>8} | {'auto/loop':>9} | {'(b)':>4} | {'batch/loop':>10} | {'rep/fwdbwd':>10}"
        f" | {'reps a/b':>8}"
    )
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for r in rows:
        ms, q = r["ms"], r["ratios"]
        print(
            f"{r['m']:>3} | {ms['plain']:>7.2f} ms | {q['step']:>8.3f} | {verdict(r['pass_a'])} || "
            f"{ms['fwd_bwd']:>5.2f} ms | {ms['loop']:>5.1f} ms | {q['auto']:>9.3f} | "
            f"{verdict(r['pass_b'])} | {q['batched']:>10.3f} | {q['rep_grad']:>10.3f} | "
            f"{r['repeats']['plain']:>4}/{r['repeats']['loop']:<3}"
        )
    worst = max(max(r["iqr_rel"].values()) for r in rows)
    typical = statistics.median(v for r in rows for v in r["iqr_rel"].values())
    print(f"timing spread (IQR / median) of the samples: typical {typical:.1%}, worst {worst:.1%}")


MODELS = {
    "mlp": "MLP 784-512-512-256 + m heads 256->10, batch 256",
    "cnn": "CNN conv 32-64-64 (3x3) + GAP + m heads 64->10, 3x32x32, batch 64",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, m in {2, 10}")
    parser.add_argument(
        "--repeats", type=int, help="minimum samples per variant (default 15, quick 5)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds per cell and part within which fast cells take more samples "
        "(default 6, quick 1; 0: exactly --repeats)",
    )
    parser.add_argument("--tasks", type=int, nargs="+", help="values of m (default 2 5 10 40)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.budget = (1.0 if args.quick else 6.0) if args.budget is None else args.budget
    args.warmup = 2 if args.quick else 3
    tasks = args.tasks or ([2, 10] if args.quick else [2, 5, 10, 40])
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    print(
        f"mtlkit engine benchmark | torch {torch.__version__} | threads "
        f"{torch.get_num_threads()} | device {device}"
        f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''} | "
        f"repeats >= {args.repeats} (more up to {args.budget:g} s per cell and part) "
        f"+ {args.warmup} warm-up, medians | targets: EW/plain, auto/loop <= {TARGET}"
    )
    print(
        "(a) plain step = zero_grad + forward + sum of CE + backward + Adam step; EW/plain = "
        "Joint(EW()).step ÷ plain step\n(b) all with the forward pass: loop jac = per-task "
        "autograd.grad + cat/stack; auto, batch = mtlkit.jacobian routes;\n    rep/fwdbwd = "
        "mtlkit.backward(MGDA, features=z) ÷ plain forward + backward (fwd+bwd)"
    )
    results, start = [], time.perf_counter()
    for model, title in MODELS.items():
        rows = [run_cell(model, m, device, args) for m in tasks]
        print_table(title, rows)
        results += rows
    ok = all(r["pass_a"] and r["pass_b"] for r in results)
    print(f"\noverall: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - start:.0f} s)")
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "min_repeats": args.repeats,
            "budget_s": args.budget,
            "warmup": args.warmup,
            "target": TARGET,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
