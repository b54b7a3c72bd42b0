"""Affinity task groups (Fifty et al., NeurIPS 2021, TAG) vs random groups of the same sizes vs the
averaged loss, at equal epochs and at equal compute (issue 23 item 3).

For each data set and seed:

* ``averaged``: Joint + EW for ``E`` epochs (the Δm% baseline);
* ``affinity``: Alternating over ``k`` groups selected after a 1-epoch warm-up (random near-equal
  groups) from the mean TAG look-ahead affinity (the training optimizer's step, measured every
  ``--every`` batches), kept for the rest of the ``E`` epochs;
* ``random``: Alternating over a seeded random partition with the *same group sizes* as that
  seed's affinity selection, ``E`` epochs;
* ``averaged, equal compute``: Joint + EW given the forward passes of the affinity run, its
  affinity measurements included.

All alternating runs use one shared Adam state (AffinityGroups change groups after the warm-up).
Writes ``results.csv``, ``results.md`` and ``quality_vs_cost.png`` to ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/affinity_groups.py --out runs/affinity
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pascal_strategies import loaders, mean_std

from mtlkit import (
    AffinityGroups,
    AffinityOptions,
    Alternating,
    Budget,
    Joint,
    Trainer,
    delta_m,
    methods,
    optimizer,
)
from mtlkit.architectures import build
from mtlkit.data.benchmarks import DATASETS


def train(data: str, seed: int, strategy, budget: Budget, data_args, affinity=None) -> dict:
    torch.manual_seed(seed)
    problem = DATASETS.get(data, seed=seed, **data_args)
    model = build("hps", problem.input_shape, problem.task_outputs)
    split = loaders(problem, 64, seed)
    trainer = Trainer(
        model,
        problem.tasks,
        strategy,
        optimizer("adam", lr=1e-3),
        budget=budget,
        seed=seed,
        progress=False,
        affinity=affinity,
    )
    start = time.perf_counter()
    trainer.fit(split["train"], split["val"])
    wall = time.perf_counter() - start
    summary = trainer.summary()
    test = trainer.evaluate(split["test"], write=False)
    aff = summary["affinity"] or {}
    return {
        "test": test,
        "tasks": problem.tasks,
        "epochs": summary["cost"]["epochs"],
        "passes": summary["cost"]["passes"],
        "affinity_passes": aff.get("passes", 0),
        "groups": getattr(strategy, "groups", None),
        "seconds": wall,
        "batches": len(split["train"]),
    }


def random_same_sizes(tasks: list[str], sizes: list[int], seed: int) -> list[list[str]]:
    order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(1000 + seed))
    groups, start = [], 0
    for size in sizes:
        groups.append(
            sorted((tasks[i] for i in order[start : start + size].tolist()), key=tasks.index)
        )
        start += size
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/affinity")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--every", type=int, help="batches between measurements (25 MultiDigits, 50 Attributes)"
    )
    parser.add_argument("--data", nargs="+", default=["multidigits", "attributes"])
    parser.add_argument("--quick", action="store_true", help="small data, 2 epochs")
    args = parser.parse_args(argv)
    plan = {"multidigits": (2, 10, 25), "attributes": (4, 5, 50)}  # k groups, epochs, every
    small = {"n_train": 512, "n_val": 256, "n_test": 256} if args.quick else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for data in args.data:
        k, epochs, every = plan[data]
        every = args.every or every
        epochs = 2 if args.quick else epochs
        for seed in args.seeds:
            runs: dict[str, dict] = {}
            runs["averaged"] = train(data, seed, Joint(methods.EW()), Budget(epochs), small)
            affinity = AffinityOptions(every, ("tag",), "optimizer", plot=False)
            strategy = Alternating(groups=AffinityGroups(k, warmup=1, seed=seed))
            runs["affinity"] = train(data, seed, strategy, Budget(epochs), small, affinity)
            names = [t.name for t in runs["affinity"]["tasks"]]
            sizes = sorted((len(g) for g in runs["affinity"]["groups"]), reverse=True)
            groups = random_same_sizes(names, sizes, seed)
            runs["random, same sizes"] = train(
                data, seed, Alternating(groups=groups), Budget(epochs), small
            )
            passes = runs["affinity"]["passes"] + runs["affinity"]["affinity_passes"]
            runs["averaged, equal compute"] = train(
                data, seed, Joint(methods.EW()), Budget(epochs=None, passes=passes), small
            )
            for name, r in runs.items():
                rows.append(
                    {
                        "data": data,
                        "run": name,
                        "seed": seed,
                        "epochs": r["epochs"],
                        "passes": r["passes"] + r["affinity_passes"],
                        "affinity_passes": r["affinity_passes"],
                        "seconds": r["seconds"],
                        "groups": r["groups"] if name != "averaged" else None,
                        "test": {
                            t: {m: v for m, v in ms.items() if m != "loss"}
                            for t, ms in r["test"].items()
                        },
                        "higher": {t.name: t.higher_is_better() for t in r["tasks"]},
                    }
                )
                print(f"{data} seed {seed} {name}: passes {rows[-1]['passes']}", flush=True)
        # Δm% against the averaged loss's metrics, mean over the seeds (as pascal_strategies.py)
        averaged = [r["test"] for r in rows if r["data"] == data and r["run"] == "averaged"]
        base = {
            t: {m: statistics.mean(a[t][m] for a in averaged) for m in ms}
            for t, ms in averaged[0].items()
        }
        zero = {(t, m) for t, ms in base.items() for m, v in ms.items() if v == 0}
        if zero:  # a metric the baseline scores 0 on has no relative change: left out, said
            print(f"{data}: Δm% leaves out {sorted(zero)} (0 for the averaged loss)")
        base = {t: {m: v for m, v in ms.items() if (t, m) not in zero} for t, ms in base.items()}
        for r in rows:
            if r["data"] == data:
                kept = {t: {m: r["test"][t][m] for m in ms} for t, ms in base.items()}
                r["delta_m"] = delta_m(kept, base, r["higher"])
    for r in rows:
        flat = {f"{t}/{m}": v for t, ms in r.pop("test").items() for m, v in ms.items()}
        r.pop("higher")
        r.update(flat)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    for data in args.data:
        lines += [
            f"### {data}",
            "",
            "| run | Δm% ↓ (vs averaged) | forward passes | of which affinity | s |",
            "|---|---|---|---|---|",
        ]
        for name in ["averaged", "affinity", "random, same sizes", "averaged, equal compute"]:
            group = [r for r in rows if r["data"] == data and r["run"] == name]
            lines.append(
                f"| {name} | {mean_std([r['delta_m'] for r in group], '.3f')} | "
                f"{statistics.mean(r['passes'] for r in group):.0f} | "
                f"{statistics.mean(r['affinity_passes'] for r in group):.0f} | "
                f"{statistics.mean(r['seconds'] for r in group):.1f} |"
            )
        lines.append("")
        for r in rows:
            if r["data"] == data and r["run"] in ("affinity", "random, same sizes"):
                lines.append(f"* seed {r['seed']} {r['run']}: {r['groups']}")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, axes = plt.subplots(1, len(args.data), figsize=(5 * len(args.data), 4), squeeze=False)
    for ax, data in zip(axes[0], args.data):
        for name, marker in zip(
            ["averaged", "affinity", "random, same sizes", "averaged, equal compute"], "osD^"
        ):
            group = [r for r in rows if r["data"] == data and r["run"] == name]
            x = [r["passes"] for r in group]
            y = [r["delta_m"] for r in group]
            ax.scatter(x, y, marker=marker, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("forward passes (affinity measurements included)")
        ax.set_ylabel("Δm% vs averaged at equal epochs (lower is better)")
        ax.set_title(data)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_cost.png", dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
