"""One table of the 35,000-step toy for every registered method, from the folders that
``mtlkit toy`` wrote (issue 19): for each method the rows of the last folder that ran it.

    python benchmarks/toy_summary.py benchmarks/results/toy benchmarks/results/toy_more_a \
        benchmarks/results/toy_more_b benchmarks/results/toy_more_excess \
        benchmarks/results/toy_more_c benchmarks/results/toy_more_refused \
        --out benchmarks/results/toy_all.md

A method with an error in any run is listed with the first error; the registered methods that
no folder ran are listed at the end (so the table says which are missing).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from mtlkit.methods import METHODS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs: dict[str, tuple[Path, list[dict[str, str]]]] = {}
    for folder in args.folders:
        with open(folder / "toy.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        by_method: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_method.setdefault(row["method"], []).append(row)
        runs.update({name: (folder, found) for name, found in by_method.items()})
    lines = [
        "# The 2-D toy for every method (issue 19)",
        "",
        f"`python {' '.join(sys.argv)}`. Each folder's `toy.md` has its command, date, machine and",
        "every run; 35,000 Adam steps (lr 1e-3), L1 x 0.1, the five starts of Nash-MTL and FAMO;",
        "on the front: within 0.05 of the Pareto set. steps/s: the median over the method's runs",
        "(several jobs shared the 2 cores: indicative).",
        "",
        "| method | on front | missed from | steps/s | error | folder |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(runs):
        folder, rows = runs[name]
        reached = sum(r["on_front"] == "yes" for r in rows)
        missed = ", ".join(r["start"] for r in rows if r["on_front"] != "yes")
        speeds = sorted(float(r["steps_per_s"]) for r in rows if r["steps_per_s"])
        speed = f"{speeds[len(speeds) // 2]:.0f}" if speeds else ""
        error = next((r["error"] for r in rows if r["error"]), "")
        error = error if len(error) <= 90 else error[:87] + "..."
        lines.append(
            f"| {name} | {reached}/{len(rows)} | {missed} | {speed} | {error} | {folder.name} |"
        )
    missing = [name for name in METHODS.available() if name not in runs]
    lines += ["", f"Registered methods not run: {', '.join(missing) if missing else 'none'}.", ""]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
