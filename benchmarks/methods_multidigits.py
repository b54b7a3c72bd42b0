"""Every method on the embedded MultiDigits benchmark: test metrics and Δm% against EW.

Trains HPS (MLP encoder) with each method through ``mtlkit train``'s own code path
(:func:`mtlkit.app.runner.run`, default config: 10 epochs, Adam 1e-3, batch 64, model selected on
the lowest summed validation loss) for several seeds, and prints a Markdown table: per-task test
metrics (mean ± std over seeds), Δm% against EW with the same seed (flat mean over the metrics,
lower is better; mean ± std over seeds) and the training time per epoch.

    python benchmarks/methods_multidigits.py --methods ew uw dwa famo --seeds 0 1 2
    python benchmarks/methods_multidigits.py --kind loss       # every loss weighting
    python benchmarks/methods_multidigits.py --kind gradient --rep-grad
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from mtlkit.app.config import TrainConfig
from mtlkit.app.runner import run
from mtlkit.data.multidigits import multidigits_tasks
from mtlkit.methods import METHODS
from mtlkit.metrics import delta_m

METRICS = [("left", "acc"), ("right", "acc"), ("sum", "mae")]


def higher_is_better() -> dict[str, dict[str, bool]]:
    return {t.name: t.higher_is_better() for t in multidigits_tasks()}


def train(method: str, seed: int, out: Path, rep_grad: bool, epochs: int) -> dict:
    config = TrainConfig(
        method=method, seed=seed, epochs=epochs, rep_grad=rep_grad, progress=False,
        out=str(out / f"{method}-s{seed}"),
    )  # fmt: skip
    started = time.perf_counter()
    results = run(config, Path(config.out))
    summary = json.loads((Path(config.out) / "summary.json").read_text())
    return {
        "results": {t: {m: results[t][m]} for t, m in METRICS},
        "seconds_per_epoch": summary["cost"]["seconds_per_epoch"],
        "wall": time.perf_counter() - started,
    }


def mean_std(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--kind", choices=["loss", "gradient", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rep-grad", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/methods_multidigits"))
    args = parser.parse_args(argv)
    names = list(args.methods or [])
    if args.kind:
        for name in METHODS.available():
            method = METHODS.get(name, **({"weights": [1, 1, 1]} if name == "constant" else {}))
            if args.kind in ("all", method.kind) and name not in names:
                names.append(name)
    if "ew" not in names:
        names.insert(0, "ew")
    runs: dict[str, dict[int, dict]] = {}
    for name in names:
        for seed in args.seeds:
            try:
                runs.setdefault(name, {})[seed] = train(
                    name, seed, args.out, args.rep_grad, args.epochs
                )
            except Exception as error:  # a failed method is a table row, the others go on
                runs.setdefault(name, {})[seed] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{name:<14} seed {seed} done", file=sys.stderr)
    hib = higher_is_better()
    header = "| method | left acc | right acc | sum MAE | Δm% vs EW ↓ | s/epoch |"
    lines = [header, "|---|---|---|---|---|---|"]
    for name in names:
        done = runs[name]
        errors = [r["error"] for r in done.values() if "error" in r]
        if errors:
            lines.append(f"| {name} | error: {errors[0][:80]} | | | | |")
            continue
        cells = [mean_std([r["results"][t][m] for r in done.values()]) for t, m in METRICS]
        deltas = [delta_m(r["results"], runs["ew"][s]["results"], hib) for s, r in done.items()]
        speed = mean_std([r["seconds_per_epoch"] for r in done.values()], 2)
        lines.append(f"| {name} | {' | '.join(cells)} | {mean_std(deltas, 2)} | {speed} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
