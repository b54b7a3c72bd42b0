"""The loop overhead per batch in the steady state: the Trainer's strategy step against the
hand-written steps of ``bench_loop.py`` (both with path-length tracking), on the same batches.

A Trainer is fitted for one epoch (set-up, pre-flight), then blocks of 10 batches are timed
(CPU time of this process), the hand loop's and the strategy's ``step`` interleaved, and the
fastest block of each is kept (the one least disturbed by other jobs). ``--ablate`` adds the
Trainer's step with the guard's gradient check patched out, and both loops without tracking.

    nice python benchmarks/bench_loop_batch.py [--problem multidigits] [--strategy alt_per_task]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_loop as bench

import mtlkit.training.nonfinite as nonfinite
from mtlkit import Budget, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="multidigits", choices=["multidigits", "regression11"])
    parser.add_argument("--strategy", default="alt_per_task", choices=bench.STRATEGIES)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--n-train", type=int, default=4096, help="regression11 samples")
    parser.add_argument("--ablate", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.problem == "multidigits":
        problem = bench.multidigits()
    else:
        problem = bench.regression11(args.n_train)
    trainer = Trainer(
        problem.make_model(), problem.tasks, bench.make_strategy(args.strategy),
        budget=Budget(epochs=1), progress=False,
    )  # fmt: skip
    trainer.fit(problem.train, problem.val)
    batches = [b for _, b in zip(range(10), problem.train)]
    strategy, exploration, check = (
        trainer.strategy,
        trainer.exploration,
        nonfinite._first_nonfinite_grad,
    )

    def trainer_block(checked: bool = True, tracked: bool = True) -> None:
        nonfinite._first_nonfinite_grad = check if checked else (lambda params: None)
        trainer.exploration = exploration if tracked else None
        for i, batch in enumerate(batches):
            strategy.step(batch, trainer._losses, 1000 + i)
        nonfinite._first_nonfinite_grad, trainer.exploration = check, exploration

    model = problem.make_model()
    names = [t.name for t in problem.tasks]
    loss_of = {t.name: t.loss for t in problem.tasks}
    opts = bench.hand_optimizers(model, names, args.strategy)
    tracker = bench.PathLength(list(model.encoder.parameters()))
    sums = torch.zeros(len(names))

    def hand_block(tracked: bool = True) -> None:
        for batch in batches:
            bench.hand_step(
                model, opts, loss_of, args.strategy, batch, sums, tracker if tracked else None
            )

    variants: dict[str, Callable[[], None]] = {"hand": hand_block, "trainer": trainer_block}
    if args.ablate:
        variants["trainer, no gradient check"] = lambda: trainer_block(checked=False)
        variants["hand, no tracking"] = lambda: hand_block(tracked=False)
        variants["trainer, no tracking"] = lambda: trainer_block(tracked=False)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.blocks):
        for name, run in variants.items():
            start = time.process_time()
            run()
            best[name] = min(best[name], (time.process_time() - start) / len(batches))
    steps = 1 if args.strategy == "joint" else len(names)
    print("| problem | strategy | loop | us/batch | x hand | us/step over hand |")
    print("|---|---|---|---:|---:|---:|")
    hand = best["hand"]
    for name, seconds in best.items():
        print(
            f"| {args.problem} | {args.strategy} | {name} | {seconds * 1e6:.0f} | "
            f"{seconds / hand:.3f} | {(seconds - hand) / steps * 1e6:+.0f} |"
        )


if __name__ == "__main__":
    main()
