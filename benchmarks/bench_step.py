"""Issue 12's target tables: a full training step with a gradient method ÷ a plain PyTorch step.

Models (as in the issue): an MLP encoder 784-512-512-256 with m linear heads 256->10, batch 256;
a CNN encoder of 3 conv layers (32, 64, 64 channels, 3x3, ReLU, max-pool, global average pool)
on 3x32x32 inputs with m heads 64->10, batch 64; no batch norm. A step is ``zero_grad``, forward,
backward, Adam step. The plain step backpropagates ``Σ_i L_i``. Routes:

* ``param``: the Jacobian w.r.t. the shared parameters (``route="auto"``, the measured-fastest
  Jacobian route);
* ``gramian``: the layer-wise Gramian (:class:`mtlkit.engine.layer_capture.LayerCapture`), no
  Jacobian;
* ``features``: the Jacobian w.r.t. the shared representation (``features=z``);
* ``loss``: EW and UW through ``mtlkit.backward`` (one backward of ``Σ w_i L_i``);
* ``floor``: the issue's reference "Jacobian alone, loop of ``autograd.grad``": the forward and
  one ``autograd.grad`` per task w.r.t. the shared parameters, no update (what any per-task
  parameter route pays at least).

Every variant owns a copy of the model and its optimizer; the variants of a cell are interleaved
in rotating order after a warm-up (``bench_engine.measure``; each turn calls a variant 3 times in
a row and times the last 2: the steady state of a training loop), and the ratios are medians ÷ the
plain step's median of the same run. Peak extra memory: the process's peak resident set during
one step (``/proc/self/clear_refs`` resets it) minus the same for the plain step, in a separate
process whose allocator returns every large block when it is freed (Linux only).

    python benchmarks/bench_step.py [--quick] [--threads 2] [--device cpu|cuda] [--json F]
                                    [--markdown F]
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import Problem, build, measure

import mtlkit
from mtlkit import methods
from mtlkit.engine.layer_capture import LayerCapture

METHODS = ["mgda", "pcgrad", "cagrad", "upgrad", "nash_mtl", "imtl_g"]
CELLS = [("mlp", 2), ("mlp", 10), ("mlp", 40), ("cnn", 2), ("cnn", 10)]
TARGETS = {  # route -> {cell: target ratio}
    "param": dict(zip(CELLS, [1.8, 6, 15, 1.5, 5])),
    "gramian": dict(zip(CELLS, [1.8, 6, 15, 1.5, 5])),
    "features": dict(zip(CELLS, [1.3, 2, 5, 1.1, 1.3])),
    "loss": dict(zip(CELLS, [1.05] * 5)),
}


def make_method(name: str, m: int) -> methods.Method:
    method = methods.get(name, **({"generator": 0} if name == "pcgrad" else {}))
    method.setup(m)
    return method


def variant(p: Problem, route: str, method_name: str | None) -> Callable[[], None]:
    """A training step on a private copy of ``p``'s model."""
    encoder, heads = copy.deepcopy(p.encoder), copy.deepcopy(p.heads)
    shared = list(encoder.parameters())
    m = len(heads)
    method = None if method_name is None else make_method(method_name, m)
    params = [*shared, *heads.parameters(), *(method.parameters() if method else [])]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    capture = LayerCapture(encoder, verify=True) if route == "gramian" else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        z = encoder(p.x)
        losses = [F.cross_entropy(head(z), y) for head, y in zip(heads, p.y)]
        if route == "floor":
            for i, loss in enumerate(losses):
                torch.autograd.grad(loss, shared, retain_graph=i < m - 1)
            return
        if route == "plain":
            sum(losses).backward()
        elif route == "features":
            mtlkit.backward(losses, method=method, features=z)
        elif route == "loss":
            mtlkit.backward(losses, method=method)
        else:
            mtlkit.backward(losses, shared=shared, method=method, capture=capture)
        optimizer.step()

    return step


def variants(p: Problem, names: list[str]) -> dict[str, Callable[[], None]]:
    out = {"plain": variant(p, "plain", None)}
    out["loss/ew"] = variant(p, "loss", "ew")
    out["loss/uw"] = variant(p, "loss", "uw")
    out["floor/jacobian_loop"] = variant(p, "floor", None)
    for route, name in itertools.product(("param", "gramian", "features"), names):
        out[f"{route}/{name}"] = variant(p, route, name)
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Peak resident memory of one step of each variant minus that of the plain step (MiB).

    Meaningful only with ``MALLOC_MMAP_THRESHOLD_`` set (see :func:`measure_memory`): then
    every large tensor is its own mapping, returned to the system when freed, so the resident
    set follows the live tensors instead of the allocator's cache."""
    peaks = {}
    for name, step in steps.items():
        step()  # warm-up: optimizer state, lazily created buffers
        gc.collect()
        before = _rss_kib("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current
        step()
        peaks[name] = (_rss_kib("VmHWM:") - before) / 1024
    return {name: peaks[name] - peaks["plain"] for name in steps}


def measure_memory(model: str, m: int, names: list[str]) -> dict[str, float] | None:
    """:func:`peak_extra_mib` of one cell, in a fresh process with glibc's mmap threshold fixed
    at 64 KiB (Linux only; ``None`` elsewhere)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--memory-cell", f"{model}:{m}", "--methods", *names]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_cell(model: str, m: int, device: torch.device, args: argparse.Namespace) -> dict:
    p = build(model, m, device)
    steps = variants(p, args.methods)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    samples = measure(steps, args.repeats, 2, args.budget, sync, burst=args.burst)
    ms = {name: statistics.median(s) for name, s in samples.items()}
    memory = measure_memory(model, m, args.methods) if device.type == "cpu" else None
    ratios = {name: ms[name] / ms["plain"] for name in ms}
    print(
        f"{model} m={m}: plain {ms['plain']:.1f} ms; "
        + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if k != "plain"),
        flush=True,
    )
    return {"model": model, "m": m, "ms": ms, "ratios": ratios, "memory_mib": memory}


def table(results: list[dict], names: list[str]) -> str:
    cells = [(r["model"], r["m"]) for r in results]
    head = "| route | method | " + " | ".join(f"{a.upper()} m={m}" for a, m in cells) + " |"
    lines = [head, "|" + "---|" * (len(cells) + 2)]
    rows = [("loss", n) for n in ("ew", "uw")] + [("floor", "jacobian_loop")]
    rows += [(route, n) for route in ("param", "gramian", "features") for n in names]
    for route, name in rows:
        entries = []
        for r in results:
            ratio = r["ratios"][f"{route}/{name}"]
            target = TARGETS.get(route, {}).get((r["model"], r["m"]))
            mark = "" if target is None else (" ✓" if ratio <= target else f" ✗ (≤ {target})")
            entries.append(f"{ratio:.2f}{mark}")
        lines.append(f"| {route} | {name} | " + " | ".join(entries) + " |")
    best = []
    for r in results:
        cell = (r["model"], r["m"])
        worst = max(min(r["ratios"][f"param/{n}"], r["ratios"][f"gramian/{n}"]) for n in names)
        best.append(f"{worst:.2f}{' ✓' if worst <= TARGETS['param'][cell] else ' ✗'}")
    lines.append("| best parameter route | worst method | " + " | ".join(best) + " |")
    if all(r["memory_mib"] is not None for r in results):
        lines.append("")
        lines.append("Peak extra memory over the plain step (MiB, one step; resident set):")
        lines.append("")
        lines.append("| route | method | " + " | ".join(f"{a} m={m}" for a, m in cells) + " |")
        lines.append("|" + "---|" * (len(cells) + 2))
        for route, name in rows:
            values = " | ".join(f"{r['memory_mib'][f'{route}/{name}']:.0f}" for r in results)
            lines.append(f"| {route} | {name} | {values} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and methods")
    parser.add_argument("--repeats", type=int, default=None, help="min samples per variant")
    parser.add_argument("--budget", type=float, default=None, help="seconds per cell (approx.)")
    parser.add_argument(
        "--burst",
        type=int,
        default=3,
        help="calls of a variant per turn; the sample is the mean of all but the first (the "
        "steady state of a training loop)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--cells", nargs="+", default=None, help="e.g. mlp:2 cnn:10")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--memory-cell", help=argparse.SUPPRESS)  # internal: one memory run
    args = parser.parse_args()
    if args.memory_cell:
        model, m = args.memory_cell.split(":")
        steps = variants(build(model, int(m), torch.device("cpu")), args.methods or METHODS)
        print(json.dumps(peak_extra_mib(steps)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.methods = args.methods or (["mgda", "upgrad"] if args.quick else METHODS)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.budget = args.budget or (10.0 if args.quick else 40.0)
    cells = CELLS
    if args.cells:
        cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells]
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    results = [run_cell(model, m, device, args) for model, m in cells]
    text = table(results, args.methods)
    print()
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
