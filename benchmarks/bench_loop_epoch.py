"""The loop overhead per epoch in the steady state: the Trainer against the hand-written loop of
``bench_loop.py``, with the fixed costs of a run (building, pre-flight checks) removed.

For each problem and strategy, each loop runs ``--repeats`` times for 1 epoch and for 3 epochs
(interleaved); the cost of an epoch is ``(T_3 - T_1) / 2`` from the fastest run of each (CPU
time of this process: the fastest sample is the one least disturbed by other jobs), and the
fixed cost ``T_1`` minus that.

    nice python benchmarks/bench_loop_epoch.py [--problems multidigits] [--repeats 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_loop as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["regression11", "multidigits"])
    parser.add_argument("--strategies", nargs="+", default=list(bench.STRATEGIES))
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--n-train", type=int, default=16384, help="regression11 samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    makers = {
        "regression11": lambda: bench.regression11(args.n_train),
        "multidigits": bench.multidigits,
    }
    runners = {"hand": bench.run_hand, "trainer": bench.run_trainer}
    print(
        "| problem | strategy | hand s/epoch | Trainer s/epoch | ratio | hand fixed s "
        "| Trainer fixed s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.problems:
        problem = makers[name]()
        for strategy in args.strategies:
            for run in runners.values():  # warm-up
                run(problem, strategy, 1)
            times: dict[str, dict[int, list[float]]] = {k: {1: [], 3: []} for k in runners}
            for _ in range(args.repeats):
                for loop, run in runners.items():
                    for epochs in (1, 3):
                        times[loop][epochs].append(run(problem, strategy, epochs)[0])
            epoch, fixed = {}, {}
            for loop in runners:
                one, three = min(times[loop][1]), min(times[loop][3])
                epoch[loop] = (three - one) / 2
                fixed[loop] = one - epoch[loop]
            print(
                f"| {name} | {strategy} | {epoch['hand']:.4f} | {epoch['trainer']:.4f} "
                f"| {epoch['trainer'] / epoch['hand']:.3f} | {fixed['hand']:.4f} "
                f"| {fixed['trainer']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
