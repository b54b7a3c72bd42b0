"""The ``mtlkit`` command line: ``train``, ``compare``, ``list``, ``toy`` and ``plot``.

``mtlkit train`` with no arguments trains HPS on the embedded MultiDigits benchmark with equal
weighting and prints the validation metrics of the selected model (the epoch model selection
kept) and its test metrics, per task. Every config key can be set as
``key=value``; the common ones also have flags; ``--resume RUN_DIR`` continues a run from its
checkpoint. ``mtlkit train --stl`` trains one single-task model per task and writes their test
metrics to ``stl_baseline.json``; ``baseline=PATH`` (such a file) makes a run also print its
Δm% against it. ``mtlkit toy`` runs methods on the 2-D two-objective toy; ``mtlkit plot
RUN_DIR`` redraws a run's figures (``mtlkit train`` draws them at the end when matplotlib is
installed, with a note before training when it is not; ``plots=true`` without it is an error
before training). ``mtlkit compare`` runs a grid of methods x strategies x seeds (x budgets)
through :func:`mtlkit.app.runner.run` (see :mod:`mtlkit.app.compare`). ``mtlkit train --check``
validates a run (names, arguments, run folder, data root, sizes, one dry forward pass) and
trains nothing.

Run folders are mtlkit's (:mod:`mtlkit.training.run_dir`): ``--out`` at a folder of other files,
or at a finished or interrupted run, is refused unless ``--overwrite`` (or ``--resume``), and a
folder another process writes into is refused with that process's PID.

Exit codes: 0 done; 2 bad input (unknown names, bad values, a run folder that would be lost, a
damaged or foreign checkpoint), one line ``mtlkit: error: ...``; 3 a failure of the environment
(a full disk or another failed write, a lost DDP peer), one line saying what failed, that the
last checkpoint is intact and the command that resumes; 130 interrupted (Ctrl-C, SIGTERM), with a
checkpoint when the run had one.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mtlkit.app.compare import compare_command
from mtlkit.app.config import TrainConfig, config_keys, load_config, logger_override
from mtlkit.app.plot_option import plots_enabled, plots_note
from mtlkit.app.plots import plot_folder
from mtlkit.app.runner import (
    STL_BASELINE,
    check_baseline,
    check_run,
    claimed,
    draw_plots,
    format_delta_m,
    format_results,
    last_k_results,
    load_baseline,
    load_problem,
    resolve_out_dir,
    run,
    run_stl,
    selected_results,
)
from mtlkit.app.toy import add_toy_arguments, toy_command
from mtlkit.app.validation import check_config, check_resume
from mtlkit.architectures import ARCHITECTURES, BACKBONES
from mtlkit.data.benchmarks import DATASETS
from mtlkit.errors import ConfigError, EnvironmentFailure, MtlkitError
from mtlkit.methods import METHODS
from mtlkit.parallel.ddp import from_rank_zero, init_from_env, is_main_process
from mtlkit.parallel.launch import RankZeroFailed, lost_peer, torchrun_prefix
from mtlkit.registry import Registry
from mtlkit.training.checkpoint import CHECKPOINT_NAME
from mtlkit.training.logs import WriteError
from mtlkit.training.run_dir import MARKER_NAME, check_claim, is_finished_run
from mtlkit.training.strategies import STRATEGIES
from mtlkit.training.trainer import TrainingInterrupted

EXIT_USER_ERROR = 2
"""Bad input: the config, the data, a run folder that would be lost, a damaged checkpoint."""
EXIT_ENVIRONMENT = 3
"""A failure of the environment: a full disk (or another failed write), a lost DDP peer."""
EXIT_INTERRUPTED = 130
"""Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)."""

# Flags for the common keys: flag -> config key (the value is parsed like key=value).


FLAGS = {
    "--method": "method",
    "--arch": "arch",
    "--strategy": "strategy",
    "--data": "data",
    "--data-root": "data_args.root",
    "--epochs": "epochs",
    "--seed": "seed",
    "--out": "out",
    "--device": "device",
    "--lr": "lr",
    "--batch-size": "batch_size",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlkit", description="Multi-task learning on PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a multi-task model (default: HPS on the embedded MultiDigits, EW)",
        description="Train one model. Any config key can be given as key=value; "
        f"keys: {', '.join(config_keys())}.",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("--config", type=Path, help="YAML config file")
    for flag, key in FLAGS.items():
        metavar = key.rpartition(".")[2].upper()
        train.add_argument(flag, dest=f"flag_{key}", metavar=metavar, help=f"sets {key}")
    train.add_argument(
        "--rep-grad", action="store_true", help="gradients w.r.t. the shared representation"
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    train.add_argument(
        "--tensorboard", action="store_true", help="also log to TensorBoard (OUT/tb)"
    )
    add_logger_argument(train)
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    train.add_argument(
        "--check",
        action="store_true",
        help="validate the run (names, arguments, run folder, data root, sizes, one dry forward "
        "pass on the first batch) and exit; trains and writes nothing",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="write into OUT even if it holds other files (those named as mtlkit's are "
        "replaced, no other is touched) or a finished or interrupted run (it is replaced)",
    )
    train.add_argument(
        "--stl",
        action="store_true",
        help="single-task baselines: one model per task (EW, joint) in OUT/stl/<task>, "
        "their test metrics in OUT/stl_baseline.json",
    )
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint (its config.yaml, then overrides); "
        "a run stopped before its first checkpoint starts over",
    )

    commands.add_parser(
        "list",
        help="list methods, architectures, backbones, strategies and datasets with their "
        "arguments and defaults",
    )
    toy = commands.add_parser(
        "toy",
        help="run every method on the 2-D two-objective toy (CAGrad / Nash-MTL)",
        description="Run methods from the toy's start points; write toy.png, toy.md, toy.csv.",
    )
    add_toy_arguments(toy)
    add_compare_parser(commands)
    plot = commands.add_parser(
        "plot",
        help="(re)draw the figures of a run folder (losses, weights, validation) or of a "
        "compare folder (from its results.csv)",
    )
    plot.add_argument("run_dir", type=Path, metavar="DIR")
    return parser


def add_compare_parser(commands: Any) -> None:
    """The ``mtlkit compare`` subcommand (the work is done by :mod:`mtlkit.app.compare`)."""
    compare = commands.add_parser(
        "compare",
        help="run a grid of methods x strategies x seeds (x budgets); write results.csv, "
        "results.md and plots",
        description="Run every combination of the config's methods, strategies, seeds and "
        "budgets into OUT/runs/, skipping finished runs and resuming interrupted ones; train the "
        "single-task baselines once; write OUT/results.csv, OUT/results.md and plots. The config "
        "is a train config plus the grid keys methods, strategies, seeds, budgets, stl; any key "
        "can be given as key=value.",
    )
    compare.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    compare.add_argument("--config", type=Path, help="YAML grid config")
    compare.add_argument("--out", dest="flag_out", metavar="OUT", help="sets out (the grid folder)")
    compare.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="runs at a time, each in a fresh worker process (default 1); 0: every run in "
        "this process; with --launcher submitit: jobs in the queue at a time (default: all)",
    )
    compare.add_argument(
        "--launcher",
        choices=("local", "submitit"),
        help="where the runs train: local worker processes (default), or SLURM jobs through "
        "submitit (the grid key launcher)",
    )
    for flag, kind, text in (
        ("--partition", str, "SLURM partition"),
        ("--time", int, "time limit per job, minutes"),
        ("--gpus", int, "GPUs per job"),
        ("--cpus", int, "CPUs per job (its torch threads)"),
        ("--mem-gb", float, "memory per job, GB"),
        ("--account", str, "SLURM account"),
        ("--qos", str, "SLURM QOS"),
        ("--constraint", str, "SLURM constraint"),
        ("--cluster", str, "submitit's executor: slurm, local or debug (default: SLURM if found)"),
    ):
        key = flag[2:].replace("-", "_")
        compare.add_argument(
            flag, type=kind, dest=f"submitit_{key}", help=f"--launcher submitit: {text}"
        )
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    compare.add_argument(
        "--tensorboard", action="store_true", help="also log each run to TensorBoard (RUN/tb)"
    )
    add_logger_argument(compare)
    compare.add_argument(
        "--print-config", action="store_true", help="print the resolved grid config and exit"
    )
    compare.add_argument(
        "--search",
        choices=("halving", "grid", "ls"),
        help="instead of the grid: a method search at a fixed epoch budget set by the config's "
        "search key (halving: successive halving of methods x strategies; grid: all trained "
        "full_epochs; ls: tuned linear-scalarisation weights); writes OUT/search-KIND/",
    )


def add_logger_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--logger",
        action="append",
        default=[],
        metavar="NAME",
        help="also log to an experiment tracker: wandb, mlflow or tensorboard (repeatable, or "
        "a comma list; sets loggers; options: logger_args.KEY=VALUE)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after flags: collect the ones argparse leaves over.
    args, rest = parser.parse_known_args(argv)
    stray = [item for item in rest if item.startswith("-") or "=" not in item]
    if stray or (rest and args.command not in ("train", "compare")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    try:
        if args.command == "toy":
            return toy_command(args)
        if args.command == "plot":
            for path in plot_folder(args.run_dir):
                print(f"wrote {path}")
            return 0
        if args.command == "list":
            print(list_registered())
            return 0
        if args.command == "compare":
            return compare_command(args)
        return train_command(args)
    except RankZeroFailed:  # DDP: rank 0 reports it
        return EXIT_USER_ERROR
    except EnvironmentFailure as error:
        print(f"mtlkit: error: {error}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except MtlkitError as error:
        print(f"mtlkit: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints and returns 130)
        print("mtlkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def train_command(args: argparse.Namespace) -> int:
    if args.stl and args.resume is not None:
        raise ConfigError("--stl cannot resume; resume one task's run: --resume OUT/stl/TASK")
    if args.overwrite and args.resume is not None:
        raise ConfigError("--overwrite replaces a run and --resume continues it: give one")
    overrides = list(args.overrides)
    for key in FLAGS.values():
        value = getattr(args, f"flag_{key}")
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.rep_grad:
        overrides.append("rep_grad=true")
    if args.no_progress:
        overrides.append("progress=false")
    if args.tensorboard:
        overrides.append("tensorboard=true")
    overrides += logger_override(args.logger)
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("--resume takes the config of the run folder; do not give --config")
        check_claim(args.resume, resume=True)  # a run folder, not in use: before reading it
        saved = args.resume / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {str(args.resume)!r}: no config.yaml there (not a run)")
        overrides.append(f"out={args.resume}")
        config = load_config(saved, overrides)
        check_resume(load_config(saved, [f"out={args.resume}"]), config)
    else:
        config = load_config(args.config, overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.check:
        return check_command(config, args)
    check_config(config)  # names, argument types, device, out folder: before reading data
    if args.stl:
        return stl_command(config, args.overwrite)
    baseline = load_baseline(config.baseline) if config.baseline is not None else None
    init_from_env(config.device)  # under torchrun: the process group of the run (DDP)
    create = config.out is None and is_main_process()  # a new runs/ folder, made at once
    out_dir = from_rank_zero(resolve_out_dir(config, create=create))
    try:
        resume = args.resume is not None
        with claimed(out_dir, config, resume=resume, overwrite=args.overwrite, created=create):
            return train_in(out_dir, config, args, baseline)
    except TrainingInterrupted as stop:
        if is_main_process():  # DDP: rank 0 wrote the checkpoint and reports it
            print(f"mtlkit: {stop}", file=sys.stderr)
            if stop.checkpoint is not None:
                print(f"resume with: {resume_command(out_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EnvironmentFailure as failure:
        print(f"mtlkit: error: {failure}; {recovery(out_dir, failure)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except RuntimeError as error:  # DDP: a peer process died and a collective failed
        peer = lost_peer(error)
        if peer is None:
            raise
        print(f"mtlkit: error: {peer}; {recovery(out_dir, peer)}", file=sys.stderr)
        return EXIT_ENVIRONMENT


def train_in(out_dir: Path, config: TrainConfig, args: argparse.Namespace, baseline: Any) -> int:
    """The run of ``mtlkit train`` in its claimed folder ``out_dir``: data, training, report."""
    problem = load_problem(config, out_dir)
    if baseline is not None:
        check_baseline(baseline, problem.tasks, config.baseline)
    resume = args.resume is not None
    if resume and not (out_dir / CHECKPOINT_NAME).is_file():
        if is_finished_run(out_dir):  # retraining it would replace its results
            raise ConfigError(
                f"--resume {str(out_dir)!r}: the run is finished and has no {CHECKPOINT_NAME} "
                "to train on from (checkpoint_every was not set); its results stay as they are "
                "(start a new run with another out, or --overwrite to replace it)"
            )
        print(  # stopped before its first checkpoint
            f"mtlkit: no {CHECKPOINT_NAME} in {out_dir} (the run stopped before writing one): "
            "training it from the start",
            file=sys.stderr,
        )
        resume = False
    note = plots_note(config) if is_main_process() else None
    if note is not None:  # plots: null without matplotlib, said before training
        print(note, file=sys.stderr)
    results = run(config, out_dir, resume=resume, problem=problem, figures=False)  # drawn below
    if not is_main_process():
        return 0  # DDP: rank 0 reports and draws
    epoch, select, val = selected_results(out_dir)
    print(f"validation (the selected model: epoch {epoch}, select={select}):")
    print(format_results(val))
    print("test:")
    print(format_results(results))
    last = last_k_results(out_dir, config.select)
    if last is not None:  # the Nash-MTL/FAMO protocol
        print(f"mean of the last {last[0]} epochs on the validation split ({config.select}):")
        print(format_results(last[1]))
    if baseline is not None:
        print(format_delta_m(results, problem.tasks, baseline, config.baseline))
        if last is not None:
            delta = format_delta_m(last[1], problem.tasks, baseline, config.baseline)
            print(f"mean of the last {last[0]} epochs {delta}")
    if plots_enabled(config):
        draw_plots(out_dir)
    print(f"results written to {out_dir}")
    return 0


def resume_command(out_dir: Path) -> str:
    """The command that resumes the run in ``out_dir`` (under ``torchrun`` when this is)."""
    if torchrun_prefix():
        return f"{torchrun_prefix()}-m mtlkit train --resume {out_dir}"
    return f"mtlkit train --resume {out_dir}"


def recovery(out_dir: Path, failure: MtlkitError) -> str:
    """What is left of the run in ``out_dir`` after an environment failure, and how to go on."""
    fix = "free some space, then " if getattr(failure, "errno", None) == errno.ENOSPC else ""
    if isinstance(failure, WriteError) and failure.path.suffix == ".png":
        return f"the results are written; {fix}draw the figures with: mtlkit plot {out_dir}"
    if (out_dir / CHECKPOINT_NAME).is_file():
        return (
            f"the last checkpoint {out_dir / CHECKPOINT_NAME} is intact; {fix}resume with: "
            f"{resume_command(out_dir)}"
        )
    if (out_dir / "config.yaml").is_file() and (out_dir / MARKER_NAME).is_file():
        return (
            f"no checkpoint was written (checkpoint_every=N writes one); {fix}start it over "
            f"with: {resume_command(out_dir)}"
        )
    return f"nothing was trained; {fix}run the same command again"


def check_command(config: TrainConfig, args: argparse.Namespace) -> int:
    """``mtlkit train --check``: :func:`mtlkit.app.runner.check_run`, then one line."""
    out_dir = resolve_out_dir(config) if config.out is not None else None
    problem = check_run(config, out_dir, resume=args.resume is not None, overwrite=args.overwrite)
    if config.baseline is not None:
        check_baseline(load_baseline(config.baseline), problem.tasks, config.baseline)
    tasks = ", ".join(t.name for t in problem.tasks)
    where = f"out {out_dir}" if out_dir is not None else "out: a new folder under runs/"
    print(
        f"check passed: method {config.method}, strategy {config.strategy}, arch {config.arch}, "
        f"data {config.data} (tasks {tasks}); {where}; nothing trained or written"
    )
    return 0


def stl_command(config: TrainConfig, overwrite: bool = False) -> int:
    """``mtlkit train --stl``: :func:`run_stl`, then print the baseline table."""
    out_dir = resolve_out_dir(config, label="stl", create=True)
    try:
        baseline = run_stl(config, out_dir, announce=True, overwrite=overwrite)
    except TrainingInterrupted as stop:
        print(f"mtlkit: {stop}", file=sys.stderr)
        if stop.checkpoint is not None:
            print(
                f"that task's run resumes with: mtlkit train --resume {stop.checkpoint.parent} "
                "(the baseline file is not written)",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    print("single-task baselines (test):")
    print(format_results(baseline))
    print(f"baseline written to {out_dir / STL_BASELINE} (use it with baseline=PATH)")
    return 0


def list_registered() -> str:
    """Every registered method, architecture (and backbone), strategy and dataset with its
    arguments and their defaults (from the signature that the registry checks a config's
    ``*_args`` against), after a heading that says which config keys set them."""
    data_given = {"input_shape", "task_outputs", "multi_input"}
    sections: list[tuple[str, str, Registry[Any], Callable[[str], bool]]] = [
        ("methods", "method=NAME, method_args.ARG=VALUE", METHODS, lambda a: True),
        (
            "architectures",
            "arch=NAME, arch_args.ARG=VALUE",
            ARCHITECTURES,
            lambda a: a not in data_given,
        ),
        (  # build_backbone passes only the widths on
            "backbones",
            "arch_args.backbone=NAME, arch_args.widths=[...]",
            BACKBONES,
            lambda a: a == "widths",
        ),
        (
            "strategies",
            "strategy=NAME, strategy_args.ARG=VALUE",
            STRATEGIES,
            lambda a: a != "method",
        ),
        ("datasets", "data=NAME, data_args.ARG=VALUE", DATASETS, lambda a: True),
    ]
    lines: list[str] = []
    for title, keys, registry, shown in sections:
        lines.append(f"{title}: ({keys})")
        for name in registry.available():
            args = [str(a) for a in registry.arguments(name) if shown(a.name)]
            lines.append(f"  {name}({', '.join(args)})")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
