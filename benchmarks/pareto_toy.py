"""Fronts on the 2-D toy (issue 24, item 5): a preference sweep of each method, the same
preference vectors, starts and Adam steps for every method (equal steps), scored against the
toy's exact Pareto front (``mtlkit.app.toy.front_curve`` mapped to the losses).

    python benchmarks/pareto_toy.py --count 5 --steps 3000 --lr 0.03 \
        --out benchmarks/results/pareto_toy

For each method and start: the end losses of the ``count`` runs are the method's front; its
hypervolume (exact, up to the reference point: the worst loss of the true front plus 10% of its
range), IGD against 1,401 points of the true front, the generalised spread, and how many end
points lie within 0.05 of the Pareto set. Writes ``pareto_toy.csv`` (one row per run),
``pareto_toy.md`` (per method and start) and ``pareto_toy.png`` (the fronts over the true one).
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mtlkit.app.pareto import hypervolume, igd, non_dominated, reference_point, spread
from mtlkit.app.toy import IMBALANCED_SCALE, front_curve, parse_starts, run_method, toy_losses
from mtlkit.methods.preference import simplex_grid

ARGUMENT = {"ls": "weights"}


def true_front(scale: float = IMBALANCED_SCALE) -> np.ndarray:
    """The toy's Pareto front in loss space (``[1401, 2]``)."""
    with torch.no_grad():
        l1, l2 = toy_losses(torch.from_numpy(front_curve()), scale)
    return np.stack([l1.numpy(), l2.numpy()], axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ls,tchebycheff,pbi,epo")
    parser.add_argument("--count", type=int, default=5, help="preference vectors per front")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--starts", default="(-7.5,-0.5);(9,-1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pareto_toy"))
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    starts = parse_starts(args.starts)
    preferences = simplex_grid(2, args.count)
    front = true_front()
    reference = reference_point(front)
    rows, summary, ends = [], [], {}
    began = time.perf_counter()
    for name in methods:
        for start in starts:
            points, on_front, seconds = [], 0, 0.0
            for p in preferences:
                run = run_method(
                    name, start, args.steps, lr=args.lr,
                    method_args={ARGUMENT.get(name, "preference"): p},
                )  # fmt: skip
                if run.error:
                    raise SystemExit(f"{name} from {start} with {p}: {run.error}")
                points.append(run.losses)
                on_front += run.on_front
                seconds += run.seconds
                rows.append(
                    {"method": name, "start": f"{start}", "preference": f"{p[0]:.4g} {p[1]:.4g}",
                     "x1": f"{run.final[0]:.4f}", "x2": f"{run.final[1]:.4f}",
                     "L1": f"{run.losses[0]:.5f}", "L2": f"{run.losses[1]:.5f}",
                     "front_distance": f"{run.distance:.4f}", "seconds": f"{run.seconds:.1f}"}
                )  # fmt: skip
            array = np.array(points)
            ends[(name, start)] = array
            summary.append(
                {"method": name, "start": f"({start[0]:g}, {start[1]:g})",
                 "on_front": f"{on_front}/{len(preferences)}",
                 "non_dominated": str(int(non_dominated(array).sum())),
                 "hypervolume": f"{hypervolume(array, reference):.4f}",
                 "igd": f"{igd(array, front):.4f}", "spread": f"{spread(array, front):.3f}",
                 "seconds": f"{seconds:.0f}"}
            )  # fmt: skip
            print(summary[-1], flush=True)
    best = hypervolume(front, reference)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "pareto_toy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = list(summary[0])
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r[k] for k in header) + " |" for r in summary]
    command = "python " + " ".join(sys.argv)
    text = [
        "# Preference sweeps on the 2-D toy",
        "",
        f"`{command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()} "
        f"({platform.processor() or platform.machine()}, shared CPU), "
        f"{time.perf_counter() - began:.0f} s in all.",
        "",
        f"{len(preferences)} preference vectors {[round(p[0], 4) for p in preferences]} (task "
        f"1's share; simplex_grid), {args.steps} Adam steps of lr {args.lr:g} per run, from each "
        "start; "
        f"L1 scaled by {IMBALANCED_SCALE}; ideal point min_loss = the toy's lower bounds "
        "(-3, -21). Hypervolume up to the reference point "
        f"({reference[0]:.4f}, {reference[1]:.4f}) (the true front's worst losses plus 10% of "
        f"their range; the true front itself has {best:.4f}); IGD against 1,401 points of the "
        "true front; spread: generalised Δ with the true front's extremes; on_front: end points "
        "within 0.05 of the Pareto set.",
        "",
        *table,
        "",
    ]
    (args.out / "pareto_toy.md").write_text("\n".join(text), encoding="utf-8")
    plot(ends, front, args.out / "pareto_toy.png")
    print("\n".join(text))
    return 0


def plot(ends: dict, front: np.ndarray, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    starts = list(dict.fromkeys(s for _, s in ends))
    figure = Figure(figsize=(4.5 * len(starts), 4))
    FigureCanvasAgg(figure)
    for k, start in enumerate(starts):
        ax = figure.add_subplot(1, len(starts), k + 1)
        ax.plot(front[:, 0], front[:, 1], color="0.6", lw=3, label="true front")
        for name, s in ends:
            if s == start:
                ax.scatter(*ends[(name, s)].T, s=18, label=name)
        ax.set_title(f"start {start}", fontsize=9)
        ax.set_xlabel("L1")
        ax.set_ylabel("L2")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
