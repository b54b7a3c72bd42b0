"""One preference-conditioned model against a sweep of separately trained LS runs, at equal
compute (issue 24, item 4), on MultiDigits (left, right, sum).

    python benchmarks/pareto_conditioned.py --count 6 --epochs 3 \
        --out benchmarks/results/pareto_conditioned

The sweep trains ``count`` HPS models with fixed weights (``ls``, the preference vectors
spread inside the simplex, :func:`~mtlkit.methods.preference.simplex_grid`), ``epochs`` each.
COSMOS trains one conditioned model (the ray appended to the input) for ``count x epochs``
epochs, the same number of optimizer steps and of backward passes, once with the paper's
penalty (``lamda=2``) and once without (``lamda=0``: the conditioned linear scalarisation,
PHN-LS with input conditioning); each is evaluated at the sweep's vectors and at its own 28
test rays. Every model is selected as the Trainer does (lowest summed validation loss; for a
conditioned model, at the centre ray). The hypervolume of the test losses is taken up to one
reference point for all fronts: the worst test loss of each task over every point plus 10% of
its range (:func:`mtlkit.app.pareto.reference_point`). Writes ``pareto_conditioned.md``,
``.csv`` (one row per point) and ``.png`` (pairwise panels).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from mtlkit.app.config import TrainConfig
from mtlkit.app.pareto import hypervolume, non_dominated, reference_point, spread
from mtlkit.app.runner import build_run, load_problem
from mtlkit.methods.preference import simplex_grid


def train(config: TrainConfig, problem):
    """The fitted Trainer (selected model loaded) and its loaders, with the seconds it took."""
    began = time.perf_counter()
    trainer, loaders = build_run(config, None, problem)
    trainer.fit(loaders["train"], loaders["val"])
    return trainer, loaders, time.perf_counter() - began


def test_losses(trainer, loaders) -> list[float]:
    results = trainer.evaluate(loaders["test"], split="test", write=False)
    return [results[t]["loss"] for t in trainer.task_names]


def main() -> int:
    if "--toy" in sys.argv:
        return toy_main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=6, help="runs of the LS sweep")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per LS run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--n-train", type=int, default=None, help="fewer training samples")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pareto_conditioned"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    load = os.getloadavg()
    seeds = [int(s) for s in args.seeds.split(",")]
    k, e = args.count, args.epochs
    points: dict[str, dict[int, list[tuple[list[float], list[float]]]]] = {}
    cost: dict[str, list[tuple[int, float]]] = {}

    def record(name, seed, ray, losses):
        points.setdefault(name, {}).setdefault(seed, []).append(([float(r) for r in ray], losses))

    for seed in seeds:
        base = dict(data="multidigits", arch="hps", optimizer="adam", lr=1e-3, batch_size=64,
                    seed=seed, progress=False, plots=False)  # fmt: skip
        if args.n_train is not None:
            base["data_args"] = {"n_train": args.n_train, "n_val": 64, "n_test": 64}
        problem = load_problem(TrainConfig(**base), None)
        tasks = [t.name for t in problem.tasks]
        vectors = simplex_grid(len(tasks), k)
        sweeps = ((e, f"ls sweep, {e} epochs each"),
                  (k * e, f"ls sweep, {k * e} epochs each ({k}x the compute)"))  # fmt: skip
        for epochs, name in sweeps:
            steps, spent = 0, 0.0
            for p in vectors:
                config = TrainConfig(**base, method="ls", method_args={"weights": p},
                                     epochs=epochs)  # fmt: skip
                trainer, loaders, seconds = train(config, problem)
                record(name, seed, p, test_losses(trainer, loaders))
                steps, spent = steps + trainer.progress.steps, spent + seconds
            cost.setdefault(name, []).append((steps, spent))
            print(f"seed {seed}, {name}: {spent:.0f} s", flush=True)
        for lamda, epochs in ((2.0, k * e), (0.0, k * e), (2.0, e)):
            label = f"cosmos lamda={lamda:g}, {epochs} epochs"
            if epochs != k * e:
                label += f" (1/{k} the compute)"
            config = TrainConfig(**base, method="cosmos", method_args={"lamda": lamda},
                                 epochs=epochs)  # fmt: skip
            trainer, loaders, spent = train(config, problem)
            channel = trainer.model.channel
            for name, rays in ((label, vectors), (f"{label}, 28 rays", channel.test_rays)):
                for ray in rays:
                    with channel.fixed(ray):
                        record(name, seed, ray, test_losses(trainer, loaders))
                cost.setdefault(name, []).append((trainer.progress.steps, spent))
            print(f"seed {seed}, {label}: {spent:.0f} s", flush=True)
    everything = np.array(
        [loss for fronts in points.values() for front in fronts.values() for _, loss in front]
    )
    reference = reference_point(everything)
    summary = []
    for name, fronts in points.items():
        arrays = [np.array([loss for _, loss in fronts[seed]]) for seed in seeds]
        volumes = [hypervolume(a, reference) for a in arrays]
        spreads = [spread(a) for a in arrays]
        summary.append(
            {"front": name, "points": str(len(fronts[seeds[0]])),
             "hypervolume (mean ± std over seeds)": f"{np.mean(volumes):.4f} ± "
             f"{np.std(volumes, ddof=1) if len(volumes) > 1 else 0:.4f}",
             "per seed": " / ".join(f"{v:.4f}" for v in volumes),
             "spread": f"{np.nanmean(spreads):.3f}",
             "loss ranges": " / ".join(
                 f"{v:.3f}" for v in np.mean([a.max(0) - a.min(0) for a in arrays], axis=0)),
             "non_dominated": " / ".join(str(int(non_dominated(a).sum())) for a in arrays),
             "optimizer_steps": str(cost[name][0][0]),
             "seconds": f"{np.mean([c[1] for c in cost[name]]):.0f}"}
        )  # fmt: skip
    write(args, tasks, points, summary, reference, began, load)
    return 0


def write(args, tasks, points, summary, reference, began, load) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "pareto_conditioned.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["front", "seed", *(f"ray/{t}" for t in tasks), *(f"{t}/loss" for t in tasks)]
        )
        for name, fronts in points.items():
            for seed, front in fronts.items():
                for ray, loss in front:
                    ray_text = [f"{r:.6g}" for r in ray]
                    writer.writerow([name, seed, *ray_text, *(f"{v:.6f}" for v in loss)])
    text = [
        "# One conditioned model vs a sweep of LS runs (MultiDigits, issue 24 item 4)",
        "",
        *provenance(began, load),
        f"- HPS (MLP encoder), Adam 1e-3, batch 64, seeds {args.seeds}; the LS sweep: "
        f"{args.count} runs of {args.epochs} epochs (and, for scale, of {args.count * args.epochs}"
        f"); COSMOS (alpha 1.2): one run of {args.count * args.epochs} epochs, the sweep's "
        "optimizer steps, one backward each (and one of "
        f"{args.epochs}), evaluated at the sweep's vectors and at its 28 test rays",
        f"- hypervolume of the test losses ({', '.join(tasks)}) up to "
        f"({', '.join(f'{r:.4f}' for r in reference)}), the worst loss per task over all points "
        "plus 10% of its range; spread: the generalised Δ over the front's own extremes; loss "
        "ranges: max - min of each task's test loss over the front's points (mean over seeds)",
        "",
        *markdown_table(summary),
        "",
    ]
    (args.out / "pareto_conditioned.md").write_text("\n".join(text), encoding="utf-8")
    plot(tasks, points, args.out / "pareto_conditioned.png")
    print("\n".join(text))


def provenance(began: float, load: tuple[float, ...]) -> list[str]:
    """The command, date and machine lines of a results file."""
    return [
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{time.perf_counter() - began:.0f} s in all",
        f"- machine: {platform.node()}, {os.cpu_count()} CPU(s), 1 torch thread, torch "
        f"{torch.__version__}; load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} "
        "after (a shared machine: seconds are indicative)",
    ]


def markdown_table(rows: list[dict[str, str]]) -> list[str]:
    """``rows`` (all with the same keys) as the lines of a markdown table."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r[k] for k in header) + " |" for r in rows]


def plot(tasks, points, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs = list(combinations(range(len(tasks)), 2))
    figure = Figure(figsize=(4.5 * len(pairs), 4))
    FigureCanvasAgg(figure)
    for k, (i, j) in enumerate(pairs):
        ax = figure.add_subplot(1, len(pairs), k + 1)
        for name, fronts in points.items():
            array = np.array([loss for _, loss in next(iter(fronts.values()))])
            ax.scatter(array[:, i], array[:, j], s=14, label=name)
        ax.set_xlabel(f"{tasks[i]} test loss")
        ax.set_ylabel(f"{tasks[j]} test loss")
        ax.legend(fontsize=6)
        ax.set_title("first seed", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


class RayToPoint(torch.nn.Module):
    """The toy's conditioned "model": a point ``x = start + g(r)`` of the toy's plane from the
    ray, ``g`` a 2-64-64-2 tanh MLP whose last layer starts at 0 (every ray starts at
    ``start``, like each run of the sweep)."""

    def __init__(self, start) -> None:
        super().__init__()
        self.start = torch.tensor(start, dtype=torch.float32)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(2, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 2),
        )
        torch.nn.init.zeros_(self.body[-1].weight)
        torch.nn.init.zeros_(self.body[-1].bias)

    def forward(self, ray):
        return self.start + self.body(ray)


def toy_main() -> int:
    """The 2-D toy: the LS sweep of ``benchmarks/pareto_toy.py`` (``count`` runs of ``steps``
    Adam steps from each start) against one :class:`RayToPoint` trained by COSMOS for
    ``count x steps`` steps from the same start, scored against the toy's exact front."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pareto_toy import true_front

    import mtlkit
    from mtlkit.app.pareto import igd
    from mtlkit.app.toy import IMBALANCED_SCALE, loss_lower_bounds, parse_starts, run_method
    from mtlkit.methods import COSMOS

    parser = argparse.ArgumentParser(description=toy_main.__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--net-lr", type=float, default=1e-3)
    parser.add_argument("--starts", default="(-7.5,-0.5);(9,-1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pareto_conditioned"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    began, load = time.perf_counter(), os.getloadavg()
    front = true_front()
    reference = reference_point(front)
    vectors = simplex_grid(2, args.count)
    dense = simplex_grid(2, 25)
    rows, ends = [], {}
    for start in parse_starts(args.starts):
        t0 = time.perf_counter()
        sweep = [run_method("ls", start, args.steps, lr=args.lr, method_args={"weights": p})
                 for p in vectors]  # fmt: skip
        ends[("ls sweep", start)] = np.array([run.losses for run in sweep])
        rows.append(("ls sweep", start, len(vectors), args.count * args.steps,
                     time.perf_counter() - t0))  # fmt: skip
        for lamda in (2.0, 0.0):
            t0 = time.perf_counter()
            torch.manual_seed(0)
            method = COSMOS(lamda=lamda, min_loss=loss_lower_bounds(), generator=0)
            method.setup(2)
            model = RayToPoint(start)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.net_lr)

            def losses(_batch, model=model, method=method):
                ray = method.channel.current(training=True).float()
                return list(toy_losses_at(model(ray)))

            step = mtlkit.Step(method, optimizer, losses, shared=list(model.parameters()),
                               tasks=2)  # fmt: skip
            for _ in range(args.count * args.steps):
                step(None)
            spent = time.perf_counter() - t0
            for name, rays in ((f"cosmos lamda={lamda:g}", vectors),
                               (f"cosmos lamda={lamda:g}, 25 rays", dense)):  # fmt: skip
                with torch.no_grad():
                    points = [[float(v) for v in toy_losses_at(model(torch.tensor(r).float()))]
                              for r in rays]  # fmt: skip
                ends[(name, start)] = np.array(points)
                rows.append((name, start, len(rays), args.count * args.steps, spent))
    summary = []
    for name, start, count, steps, spent in rows:
        array = ends[(name, start)]
        summary.append(
            {"front": name, "start": f"({start[0]:g}, {start[1]:g})", "points": str(count),
             "hypervolume": f"{hypervolume(array, reference):.4f}",
             "igd": f"{igd(array, front):.4f}", "spread": f"{spread(array, front):.3f}",
             "adam_steps": str(steps), "seconds": f"{spent:.0f}"}
        )  # fmt: skip
    text = [
        "# One conditioned model vs a sweep of LS runs (the 2-D toy, issue 24 item 4)",
        "",
        *provenance(began, load),
        f"- L1 scaled by {IMBALANCED_SCALE}. LS sweep: {args.count} runs of {args.steps} Adam "
        f"steps (lr {args.lr:g}) on x from each start. COSMOS (alpha 1.2, min_loss = the toy's "
        f"lower bounds): one network x = start + g(r) (2-64-64-2 tanh MLP, last layer 0 at "
        f"first) for {args.count * args.steps} Adam steps (lr {args.net_lr:g}), then read at "
        f"the sweep's vectors and at 25 rays",
        f"- hypervolume up to ({reference[0]:.4f}, {reference[1]:.4f}) (the true front's worst "
        f"losses plus 10% of their range; the true front has {hypervolume(front, reference):.4f}); "
        "IGD against 1,401 points of the true front; spread with the true front's extremes",
        "",
        *markdown_table(summary),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pareto_conditioned_toy.md").write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))
    return 0


def toy_losses_at(x):
    from mtlkit.app.toy import toy_losses

    return toy_losses(x)


if __name__ == "__main__":
    raise SystemExit(main())
