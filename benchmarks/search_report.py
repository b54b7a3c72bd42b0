"""Compare a successive-halving ranking with the full grid's (``mtlkit compare --search``).

    python benchmarks/search_report.py OUT   # reads OUT/search-halving, -grid (and -ls)

Prints (Markdown) both rankings, Kendall's tau between them, whether the halving winner is the
grid's, which of the halving's pairwise orders the grid confirms or contradicts (by the mean paired
gap over seeds; "every seed" when all seeds agree), and the budgets spent.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from mtlkit.app.compare.search import kendall_tau


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    halving = json.loads((out / "search-halving" / "search.json").read_text())
    grid = json.loads((out / "search-grid" / "search.json").read_text())
    a, b = halving["ranking"], grid["ranking"]
    by_arm = {r["arm"]: r for r in grid["arms"]}
    scores = {r["arm"]: r["scores"][-1] for r in grid["arms"]}
    lines = [
        f"Halving: {halving['epochs']} epochs ({halving['forward_backward']} forward+backward "
        f"passes); full grid: {grid['epochs']} epochs ({grid['forward_backward']}).",
        "",
        "| rank | halving | rounds | grid | grid val score | grid gap to best [95% CI] |",
        "|---:|---|---:|---|---:|---|",
    ]
    rounds = {r["arm"]: r["rounds"] for r in halving["arms"]}
    for n, (x, y) in enumerate(zip(a, b), 1):
        gap = by_arm[y]["gap_ci95"]
        lines.append(
            f"| {n} | {x} | {rounds[x]} | {y} | {by_arm[y]['score']:.4f} | "
            f"{by_arm[y]['gap_to_best']:+.4f} [{gap[0]:+.4f}, {gap[1]:+.4f}] |"
        )
    lines += ["", f"Kendall's tau (halving vs grid): {kendall_tau(a, b):+.3f}."]
    lines.append(
        f"Winner: halving {a[0]}, grid {b[0]}: {'confirmed' if a[0] == b[0] else 'contradicted'}."
    )
    confirmed, contradicted = [], []
    for x, y in itertools.combinations(a, 2):  # halving says x before y
        gaps = [p - q for p, q in zip(scores[x], scores[y])]
        mean = sum(gaps) / len(gaps)
        resolved = all(g < 0 for g in gaps) or all(g > 0 for g in gaps)
        entry = f"{x} < {y}" + (" (every seed)" if resolved else "")
        (confirmed if mean < 0 else contradicted).append(entry)
    lines.append(f"Orders of the halving that the grid confirms: {', '.join(confirmed) or 'none'}.")
    lines.append(f"Orders it contradicts: {', '.join(contradicted) or 'none'}.")
    ls_path = out / "search-ls" / "search.json"
    if ls_path.is_file():
        ls = json.loads(ls_path.read_text())
        final = ls["final"]
        lines += [
            "",
            f"ls_search: weights {ls['weights']} ({len(ls['arms'])} trials of "
            f"{ls['search']['trial_epochs']} epoch(s), final run {final['epochs_per_seed']} "
            f"epochs; {ls['epochs']} epochs in all, {ls['forward_backward']} forward+backward "
            f"passes): val score {final['score']:.4f}, test "
            + ", ".join(f"{k} {v:.4f}" for k, v in final["test"].items()),
        ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
