"""Loop overhead: mtlkit's Trainer against a hand-written PyTorch loop doing the same work.

Both train the same model (same initial weights) on the same batches for ``--epochs`` epochs
and do, per batch, the strategy's steps with Adam, and, per optimizer step, the path-length
tracking of the shared parameters; per epoch, the validation pass (every task's loss and
metrics, the same :class:`mtlkit.Task` objects) and model selection on the summed validation
loss (a copy of the best weights). The Trainer runs with its defaults otherwise (``route="auto"``,
``on_nonfinite="raise"``, progress bar and files off: ``progress=False``, no ``out_dir``).

Strategies: ``joint`` (``Joint(EW())``: one forward, the summed loss, one step), ``alt_shared``
(``Alternating()``: one step per task on the same batch, one Adam), ``alt_per_task``
(``Alternating(optimizers="per_group")``: one Adam per task over the encoder and its head). The
hand-written alternating loop computes, per task step, the encoder and that task's head only.

Problems: ``regression11`` (an MLP 34-256-256 with 11 linear heads, MSE, on synthetic data of the
shape of the issue's 11-target regression set: 16384 training samples, batch 256) and
``multidigits`` (MultiDigits with its default HPS model, batch 64, the CLI defaults).

Each sample is one whole run (model and optimizers built, ``--epochs`` epochs, selection). Each
repeat runs the hand loop and the Trainer back to back (alternating which goes first), and the
ratio is the median over the repeats of these pairs' Trainer / hand, of the process's CPU time
(the main figure: on a machine shared with other jobs the wall time also counts the time the
process waited for a core) and of the wall time.

    nice python benchmarks/bench_loop.py                     # 1 thread, 7 repeats, 2 epochs
    nice python benchmarks/bench_loop.py --quick             # a smoke run
    nice python benchmarks/bench_loop.py --out benchmarks/results/loop_overhead.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

import mtlkit
from mtlkit import Alternating, Budget, Joint, Task, Trainer, methods
from mtlkit.architectures import HPS, build
from mtlkit.data.benchmarks import DATASETS
from mtlkit.metrics import MeanAbsoluteError
from mtlkit.training.strategies import Strategy

STRATEGIES = ("joint", "alt_shared", "alt_per_task")


@dataclass
class Problem:
    """A model factory (same weights each call), the data and the tasks."""

    name: str
    make_model: Callable[[], HPS]
    train: DataLoader
    val: DataLoader
    tasks: list[Task]


class Batches(torch.utils.data.Dataset):
    """A regression set with one column per task, indexed by a whole batch of indices at once
    (``x[idx], {task: y[idx, k:k+1]}``): loading costs little, as in a tuned loop."""

    def __init__(self, x: Tensor, y: Tensor, names: list[str]) -> None:
        self.x, self.names = x, names
        self.y = [y[:, k : k + 1].contiguous() for k in range(len(names))]  # [n, 1] per task

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
        index = torch.as_tensor(idx)
        return self.x[index], {t: y[index] for t, y in zip(self.names, self.y)}


def regression11(n_train: int, seed: int = 0) -> Problem:
    """Synthetic 11-target regression (34 features): ``y_t = sin(3 x a_t) + 0.1 noise``."""
    g = torch.Generator().manual_seed(seed)
    names = [f"t{k}" for k in range(11)]
    a = torch.randn(34, 11, generator=g) / 34**0.5
    n = n_train + n_train // 4
    x = torch.randn(n, 34, generator=g)
    y = torch.sin(3 * x @ a) + 0.1 * torch.randn(n, 11, generator=g)
    train = Batches(x[:n_train], y[:n_train], names)
    val = Batches(x[n_train:], y[n_train:], names)

    def loader(data: Batches, shuffle: bool) -> DataLoader:
        order = (
            RandomSampler(data, generator=torch.Generator().manual_seed(seed))
            if shuffle
            else SequentialSampler(data)
        )
        return DataLoader(data, sampler=BatchSampler(order, 256, False), batch_size=None)

    def make_model() -> HPS:
        torch.manual_seed(seed)
        encoder = nn.Sequential(nn.Linear(34, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        return HPS(encoder, {t: nn.Linear(256, 1) for t in names})

    mse = nn.functional.mse_loss
    tasks = [Task(t, mse, {"mae": MeanAbsoluteError}) for t in names]
    return Problem("regression11", make_model, loader(train, True), loader(val, False), tasks)


def multidigits(seed: int = 0) -> Problem:
    problem = DATASETS.get("multidigits", seed=seed)

    def loader(split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            problem.splits[split],
            batch_size=64,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed),
        )

    def make_model() -> HPS:
        torch.manual_seed(seed)
        return build("hps", problem.input_shape, problem.task_outputs)

    return Problem(
        "multidigits", make_model, loader("train", True), loader("val", False), problem.tasks
    )


# ------------------------------------------------------------------------ the two loops
def make_strategy(name: str) -> Strategy:
    if name == "joint":
        return Joint(methods.EW())
    return Alternating(optimizers="shared" if name == "alt_shared" else "per_group")


Times = tuple[float, float]  # (CPU seconds of this process, wall seconds)


def clock() -> Times:
    return time.process_time(), time.perf_counter()


def since(start: Times) -> Times:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def run_trainer(problem: Problem, strategy: str, epochs: int) -> Times:
    model = problem.make_model()
    start = clock()
    trainer = Trainer(
        model, problem.tasks, make_strategy(strategy), budget=Budget(epochs=epochs),
        progress=False,
    )  # fmt: skip
    trainer.fit(problem.train, problem.val)
    return since(start)


class PathLength:
    """Path length of the shared parameters, one fused norm per optimizer step."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.previous = [p.detach().clone() for p in params]
        self.path = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def step(self) -> None:
        current = [p.detach() for p in self.params]
        norms = torch._foreach_norm(torch._foreach_sub(current, self.previous))
        self.path += torch.linalg.vector_norm(torch.stack(norms).double())
        torch._foreach_copy_(self.previous, current)


def hand_optimizers(model: nn.Module, names: list[str], strategy: str) -> dict[str, Any]:
    """The hand loop's Adam per task (``alt_per_task``: shared + own head) or one for all."""
    shared = list(model.encoder.parameters())
    if strategy == "alt_per_task":
        return {
            t: torch.optim.Adam(shared + list(model.heads[t].parameters()), lr=1e-3) for t in names
        }
    return dict.fromkeys(names, torch.optim.Adam(model.parameters(), lr=1e-3))


def hand_step(
    model: nn.Module,
    opts: dict[str, Any],
    loss_of: dict[str, Any],
    strategy: str,
    batch: Any,
    sums: torch.Tensor,
    tracker: PathLength | None,
) -> None:
    """One batch of the hand loop: one step on the summed losses (``joint``), else one step per
    task on its own loss; the path length tracked after each step (unless ``tracker`` is None)."""
    x, y = batch
    names = list(opts)
    if strategy == "joint":
        one = opts[names[0]]
        one.zero_grad(set_to_none=True)
        out = model(x)
        losses = torch.stack([loss_of[t](out[t], y[t]) for t in names])
        losses.sum().backward()
        one.step()
        if tracker is not None:
            tracker.step()
        sums += losses.detach()
        return
    for k, t in enumerate(names):
        opts[t].zero_grad(set_to_none=True)
        loss = loss_of[t](model.heads[t](model.encoder(x)), y[t])
        loss.backward()
        opts[t].step()
        if tracker is not None:
            tracker.step()
        sums[k] += loss.detach()


def run_hand(problem: Problem, strategy: str, epochs: int) -> Times:
    """The hand-written loop: what a user would write for the same run."""
    model = problem.make_model()
    start = clock()
    torch.manual_seed(0)
    names = [t.name for t in problem.tasks]
    loss_of = {t.name: t.loss for t in problem.tasks}
    opts = hand_optimizers(model, names, strategy)
    tracker = PathLength(list(model.encoder.parameters()))
    best, best_state = float("inf"), None
    for _epoch in range(epochs):
        model.train()
        sums = torch.zeros(len(names))
        for batch in problem.train:
            hand_step(model, opts, loss_of, strategy, batch, sums, tracker)
        score = sum(evaluate(model, problem).values())
        if score < best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    float(tracker.path)
    assert best_state is not None
    model.load_state_dict(best_state)
    return since(start)


@torch.no_grad()
def evaluate(model: nn.Module, problem: Problem) -> dict[str, float]:
    model.eval()
    metrics = {t.name: t.new_metrics() for t in problem.tasks}
    sums = dict.fromkeys(metrics, 0.0)
    count = 0
    for x, y in problem.val:
        out = model(x)
        count += len(x)
        for t in problem.tasks:
            sums[t.name] += float(t.loss(out[t.name], y[t.name])) * len(x)
            for metric in metrics[t.name].values():
                metric.update(out[t.name], y[t.name])
    for ms in metrics.values():
        for metric in ms.values():
            metric.compute()
    return {t: s / count for t, s in sums.items()}


# ---------------------------------------------------------------------------- measuring
def measure(problem: Problem, args: argparse.Namespace) -> list[dict[str, Any]]:
    runners = {"hand": run_hand, "trainer": run_trainer}
    for s in args.strategies:  # warm-up
        for loop in runners:
            runners[loop](problem, s, 1)
    samples: dict[tuple[str, str], list[Times]] = {
        (s, loop): [] for s in args.strategies for loop in runners
    }
    for rep in range(args.repeats):
        for s in args.strategies:  # a pair back to back, in alternating order
            for loop in ("hand", "trainer") if rep % 2 == 0 else ("trainer", "hand"):
                cpu, wall = runners[loop](problem, s, args.epochs)
                samples[(s, loop)].append((cpu / args.epochs, wall / args.epochs))
        print(f"  {problem.name}: repeat {rep + 1}/{args.repeats}", file=sys.stderr)
    rows = []
    for s in args.strategies:
        row: dict[str, Any] = {"problem": problem.name, "strategy": s}
        for k, kind in enumerate(("cpu", "wall")):
            hand = [t[k] for t in samples[(s, "hand")]]
            trainer = [t[k] for t in samples[(s, "trainer")]]
            pairs = [b / a for a, b in zip(hand, trainer)]
            row[f"hand_{kind}"] = statistics.median(hand)
            row[f"trainer_{kind}"] = statistics.median(trainer)
            row[f"ratio_{kind}"] = statistics.median(pairs)
            row[f"ratio_min_{kind}"] = min(trainer) / min(hand)  # the least disturbed samples
            row[f"spread_{kind}"] = _spread(pairs)
            row[f"samples_{kind}"] = {"hand": hand, "trainer": trainer}
        rows.append(row)
    return rows


def _spread(values: list[float]) -> float:
    """Inter-quartile range / median."""
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values)
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Loop overhead: Trainer vs a hand-written loop",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
        f"mtlkit {mtlkit.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU(s), load average {args.load_before} before and "
        f"{_load()} after the run",
        f"- {args.epochs} epoch(s) per sample, {args.repeats} repeats, medians; {args.note}",
        "",
        "Times are seconds per epoch, medians; `cpu` is this process's CPU time, `wall` the",
        "elapsed time. Each repeat runs the two loops back to back (alternating which goes first);",
        "the ratio is the median over repeats of the pair's Trainer / hand, and spread the",
        "inter-quartile range / median of those pair ratios (the machine's speed drifts by tens of",
        "percent between runs minutes apart; a pair sees the same machine). The ratio of min cpu",
        "is that of the fastest sample of each (the one least disturbed by other jobs).",
        "",
        "| problem | strategy | hand cpu | Trainer cpu | **ratio cpu** | spread | ratio of min cpu "
        "| hand wall | Trainer wall | ratio wall | spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['strategy']} | {r['hand_cpu']:.3f} | {r['trainer_cpu']:.3f} "
            f"| **{r['ratio_cpu']:.3f}** | {r['spread_cpu']:.2f} | {r['ratio_min_cpu']:.3f} "
            f"| {r['hand_wall']:.3f} "
            f"| {r['trainer_wall']:.3f} | {r['ratio_wall']:.3f} | {r['spread_wall']:.2f} |"
        )
    target = all(r["ratio_cpu"] <= 1.05 for r in rows)
    lines += ["", f"target Trainer/hand (cpu) <= 1.05: {'PASS' if target else 'FAIL'}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["regression11", "multidigits"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=16384, help="regression11 samples")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 epoch, 4096 samples")
    parser.add_argument("--note", default="", help="a line for the report (e.g. machine load)")
    parser.add_argument("--out", type=Path, help="write the table (.md) and the samples (.json)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.epochs, args.n_train = 3, 1, 4096
    torch.set_num_threads(args.threads)
    args.load_before = _load()
    makers = {"regression11": lambda: regression11(args.n_train), "multidigits": multidigits}
    rows = []
    for name in args.problems:
        rows += measure(makers[name](), args)
    command = "python " + " ".join(sys.argv)
    text = report(rows, args, command)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text, encoding="utf-8")
        payload = {"command": command, "rows": rows}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
