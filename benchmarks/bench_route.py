"""route="auto" of the Trainer: does it pick the faster route, and what does a step cost then?

Issue 20's held-out target: MGDA and UPGrad on the MLP 784-512-512-256 with m = 10 heads
256->10 (cross-entropy on random labels, batch 256), SGD, through the Trainer's default route,
at most 4x a plain step (a hand-written ``zero_grad; forward; Σ_i L_i backward; SGD step``).
The CNN of ``bench_engine.py`` (3 conv layers, batch 64, m = 10) is the counter-case, where the
layer-wise Gramian does not pay (its conv layers go through per-task autograd).

Each variant is one Trainer (``route="loop"``, ``"gramian"``, ``"auto"``) trained for
``--steps`` steps on the same batch; the model's ``on_train_step`` hook stamps every optimizer
step, and the step time is the median over the steps after the first ``2 + 3 + 2`` (auto's
measurement takes the first 5, then 2 steps of warm-up on the chosen route). The plain step is
timed the same way. Variants are interleaved over ``--repeats``; medians over all samples.

    nice python benchmarks/bench_route.py [--quick] [--threads 1] [--out F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import build

import mtlkit
from mtlkit import Budget, Joint, Task, Trainer, methods
from mtlkit.architectures import HPS
from mtlkit.training import route_choice
from mtlkit.training.optim import optimizer

SKIP = 2 + 3 + 2


class Stamped(HPS):
    """HPS that stamps the time of every optimizer step (the Trainer's on_train_step hook)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stamps: list[float] = []

    def on_train_step(self, step: int) -> None:
        self.stamps.append(time.perf_counter())


def problem(model: str, m: int):
    p = build(model, m, torch.device("cpu"))
    names = [f"t{i}" for i in range(m)]
    batch = (p.x, {t: p.y[i] for i, t in enumerate(names)})
    return p, names, batch


def step_times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps[SKIP:], stamps[SKIP + 1 :])]


def run_trainer(model: str, m: int, method: str, route: str, steps: int) -> tuple[list, dict]:
    p, names, batch = problem(model, m)
    net = Stamped(p.encoder, {t: head for t, head in zip(names, p.heads)})
    tasks = [Task(t, F.cross_entropy) for t in names]
    route_choice.ROUTE_CACHE.clear()  # every auto run measures for itself
    trainer = Trainer(
        net, tasks, Joint(methods.get(method)), optimizer("sgd", lr=1e-3),
        budget=Budget(steps=steps), route=route, progress=False, track_exploration=False,
    )  # fmt: skip
    trainer.fit([batch] * steps)
    return step_times(net.stamps), trainer.route_choice()


def run_plain(model: str, m: int, steps: int) -> list[float]:
    p, _, _ = problem(model, m)
    params = [*p.encoder.parameters(), *p.heads.parameters()]
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    stamps = []
    for _ in range(steps):
        sgd.zero_grad(set_to_none=True)
        z = p.encoder(p.x)
        sum(F.cross_entropy(head(z), y) for head, y in zip(p.heads, p.y)).backward()
        sgd.step()
        stamps.append(time.perf_counter())
    return step_times(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--methods", nargs="+", default=["mgda", "upgrad"])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="mlp only, 1 repeat, 10 steps")
    parser.add_argument("--out", type=Path, help="write the table (.md) and samples (.json)")
    args = parser.parse_args()
    if args.quick:
        args.cells, args.repeats, args.steps = ["mlp"], 1, 10
    torch.set_num_threads(args.threads)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    rows, raw = [], {}
    for cell in args.cells:
        for method in args.methods:
            variants = ["plain", "loop", "gramian", "auto"]
            samples: dict[str, list[float]] = {v: [] for v in variants}
            choices = []
            for rep in range(args.repeats):
                for v in variants[rep % 4 :] + variants[: rep % 4]:
                    if v == "plain":
                        samples[v] += run_plain(cell, args.tasks, args.steps)
                    else:
                        times, choice = run_trainer(cell, args.tasks, method, v, args.steps)
                        samples[v] += times
                        if v == "auto":
                            choices.append(choice["measured"])
                print(f"  {cell} {method}: repeat {rep + 1}/{args.repeats}", file=sys.stderr)
            plain = statistics.median(samples["plain"])
            row = {"cell": cell, "method": method, "plain_ms": plain * 1e3}
            for v in variants[1:]:
                row[f"{v}_ratio"] = statistics.median(samples[v]) / plain
            row["auto_choices"] = [c["choice"] for c in choices]
            row["auto_reasons"] = [c["reason"] for c in choices]
            rows.append(row)
            raw[f"{cell}/{method}"] = {"samples": samples, "auto": choices}
    lines = [
        "# route=auto: the Trainer's default route against a plain step",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {os.cpu_count()} CPU(s) shared with other jobs, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, mtlkit "
        f"{mtlkit.__version__}; load average {load} before the run",
        f"- m = {args.tasks}, SGD (momentum 0.9), {args.steps} steps per run (step times after "
        f"the first {SKIP}), {args.repeats} interleaved repeats, medians",
        "",
        "| model | method | plain step ms | loop / plain | gramian / plain | auto / plain "
        "| auto chose |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        chose = ", ".join(sorted(set(map(str, r["auto_choices"]))))
        lines.append(
            f"| {r['cell']} | {r['method']} | {r['plain_ms']:.1f} | {r['loop_ratio']:.2f} "
            f"| {r['gramian_ratio']:.2f} | **{r['auto_ratio']:.2f}** | {chose} |"
        )
    lines += ["", "auto's measurements (median backward per route):", ""]
    lines += [f"- {r['cell']} {r['method']}: {'; '.join(r['auto_reasons'])}" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text, encoding="utf-8")
        payload = {"command": " ".join(sys.argv), "rows": rows, "raw": raw}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
