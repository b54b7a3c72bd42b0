"""The run builder: one training run (or the single-task baselines) from a typed config.

:func:`run` is the single-run code path of ``mtlkit train`` and of every run of ``mtlkit
compare``: it loads the data (:func:`load_problem`), builds the method, strategy, model and
optimizer factory from their registries, validates the whole setup on the first batch, writes
``config.yaml`` and trains with the :class:`~mtlkit.Trainer`. :func:`run_stl` trains the
single-task baselines that Δm% is measured against (:func:`format_delta_m`). :func:`check_run`
does every check of :func:`run` and trains and writes nothing (``mtlkit train --check``).

A run holds its folder for as long as it lasts (:func:`claimed`: the folder's marker and lock,
:mod:`mtlkit.training.run_dir`): a folder of other files, a finished or interrupted run, or a
folder another process writes into is refused before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtlkit.app.conditioned_front import build_model, evaluate_front
from mtlkit.app.config import TrainConfig, affinity_options
from mtlkit.app.limits import check_model_size, check_sizes
from mtlkit.app.plot_option import plots_enabled
from mtlkit.app.plots import plot_run
from mtlkit.app.validation import check_config, check_problem, check_resume
from mtlkit.data.benchmarks import DATASETS, Problem
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods import METHODS
from mtlkit.parallel.ddp import init_from_env, is_main_process
from mtlkit.parallel.launch import rank_zero_first
from mtlkit.registry import Registry
from mtlkit.tasks import DELTA_M_LABEL, DELTA_P_LABEL, Task, baseline_deltas
from mtlkit.training.checkpoint import CHECKPOINT_NAME, check_trainer_state, load_checkpoint
from mtlkit.training.evaluation import last_k_epochs, mean_of_last_epochs
from mtlkit.training.logs import write_atomic, write_json_atomic
from mtlkit.training.optim import optimizer
from mtlkit.training.preflight import sample_batch
from mtlkit.training.run_dir import (
    check_claim,
    claim_run_dir,
    config_hash,
    is_finished_run,
    read_marker,
)
from mtlkit.training.strategies import STRATEGIES
from mtlkit.training.trackers import build_trackers
from mtlkit.training.trainer import Budget, Results, Trainer


def draw_plots(out_dir: Path) -> None:
    """The run's figures (``mtlkit.app.plots``); if matplotlib fails to draw them, say so and go
    on (the results are written already; ``mtlkit plot RUN_DIR`` draws them later)."""
    try:
        plot_run(out_dir)
    except MtlkitError as error:
        if "matplotlib" not in str(error):
            raise
        print(f"mtlkit: plots not drawn: {error}; plots=false hides this", file=sys.stderr)


def resolve_out_dir(config: TrainConfig, label: str | None = None, create: bool = False) -> Path:
    """``config.out`` (``~`` expanded), or a new folder
    ``runs/<data>-<arch>-<method>-<strategy>-s<seed>[-N]``
    (``runs/<data>-<arch>-<label>-s<seed>[-N]`` with a ``label``) that never overwrites an
    earlier run; with ``create`` that new folder is made at once (``mkdir`` fails on a folder
    that exists), so that two runs started together never pick the same one."""
    if config.out is not None:
        return Path(config.out).expanduser()
    kind = label or f"{config.method}-{config.strategy}"
    base = Path("runs") / f"{config.data}-{config.arch}-{kind}-s{config.seed}"
    candidate, n = base, 1
    while True:
        if not create and not candidate.exists():
            return candidate
        if create:
            try:
                candidate.parent.mkdir(parents=True, exist_ok=True)
                candidate.mkdir()
                return candidate
            except FileExistsError:
                pass
            except OSError as error:
                raise ConfigError(
                    f"cannot create the run folder {str(candidate)!r}: {error}"
                ) from None
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1


@contextmanager
def claimed(
    out_dir: Path | None,
    config: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    finished: Callable[[Path], bool] = is_finished_run,
    adopt: bool = False,
    created: bool = False,
) -> Iterator[None]:
    """Hold the run folder ``out_dir`` for the ``with`` block
    (:func:`mtlkit.training.run_dir.claim_run_dir`, with its arguments; nothing for ``None``).
    Under ``torchrun`` rank 0 creates and claims it while the other ranks wait
    (:func:`rank_zero_first`)."""
    if out_dir is None:
        yield
        return
    with ExitStack() as stack:
        rank_zero_first(
            lambda: stack.enter_context(
                claim_run_dir(
                    out_dir,
                    config_hash=config_hash(config.to_dict()),
                    resume=resume,
                    overwrite=overwrite,
                    finished=finished,
                    adopt=adopt,
                    created=created,
                )
            )
        )
        yield


def check_checkpoint_config(config: TrainConfig, out_dir: Path) -> None:
    """Refuse to resume ``out_dir``'s checkpoint under ``config`` when the config the checkpoint
    records differs in a key a resume may not change (:func:`check_resume`, naming the keys). The
    tensors are mapped, not read.

    Raises:
        MtlkitError: for a damaged checkpoint (the entry), or one of another config.
    """
    path = out_dir / CHECKPOINT_NAME
    state = load_checkpoint(path, mmap=True)
    check_trainer_state(state, path)
    try:
        saved = TrainConfig(**state["run"]["config"])
    except (TypeError, MtlkitError) as error:
        raise MtlkitError(
            f"checkpoint {str(path)!r} records a config this version cannot read: {error}"
        ) from None
    check_resume(saved, config, source=f"the config {CHECKPOINT_NAME} records")


def load_problem(config: TrainConfig, out_dir: Path | None) -> Problem:
    """The data set of ``config`` (a drawn split is written to ``out_dir/splits``), restricted
    to ``config.tasks`` if given."""
    check_sizes(config)  # memory of generated data, expert counts: before allocating
    data_args = dict(config.data_args)
    arguments = DATASETS.arguments(config.data)
    missing = [a.name for a in arguments if a.required and a.name not in data_args]
    if missing:
        given = ", ".join(
            "data_args.root=PATH (the folder of the data set; or --data-root PATH)"
            if name == "root"
            else f"data_args.{name}=VALUE"
            for name in missing
        )
        raise ConfigError(f"dataset {config.data!r} needs {given}")
    takes_splits = any(a.name == "split_dir" for a in arguments)
    if takes_splits and "split_dir" not in data_args and out_dir is not None:
        data_args["split_dir"] = str(out_dir / "splits")  # a drawn split is kept beside results
    problem: Problem = DATASETS.get(config.data, seed=config.seed, **data_args)
    if config.tasks is not None:
        problem = select_tasks(problem, config.tasks, config.data)
    return problem


def select_tasks(problem: Problem, names: Sequence[str], data: str = "the data set") -> Problem:
    """``problem`` with only the tasks ``names`` (in that order): its tasks, the outputs per
    task and, for multi-input problems, the per-task datasets of each split. Single-input
    datasets keep yielding every target; the Trainer reads only those of its tasks.

    Raises:
        ConfigError: if a name is not a task of ``problem`` (the message lists the valid ones).
    """
    by_name = {t.name: t for t in problem.tasks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(
            f"unknown task(s) {', '.join(map(repr, unknown))} for dataset {data!r}; "
            f"valid tasks: {', '.join(by_name)}"
        )
    splits = problem.splits
    if problem.multi_input:
        splits = {split: {n: sets[n] for n in names} for split, sets in splits.items()}
    return dataclasses.replace(
        problem,
        splits=splits,
        tasks=[by_name[n] for n in names],
        task_outputs={n: problem.task_outputs[n] for n in names},
    )


def run(
    config: TrainConfig,
    out_dir: Path | None,
    resume: bool = False,
    problem: Problem | None = None,
    overwrite: bool = False,
    figures: bool = True,
) -> Results:
    """Train and test one model as ``config`` says (continuing from ``out_dir``'s checkpoint
    when ``resume``); return the test results (the selected model's validation results go to
    ``summary.json`` too, key ``val``). ``problem``: the data, already loaded by
    :func:`load_problem` (loaded here otherwise). ``out_dir`` is claimed for the run
    (:func:`claimed`; ``overwrite`` replaces what it holds). With ``figures``, the run's
    figures are drawn into ``out_dir`` at the end as ``config.plots`` says
    (:func:`~mtlkit.app.plot_option.plots_enabled`; ``plots: true`` without matplotlib is refused
    before training)."""
    torch.manual_seed(config.seed)
    init_from_env(config.device)  # under torchrun: the process group of the run (DDP)
    check_config(config)
    with claimed(out_dir, config, resume=resume, overwrite=overwrite):
        if resume and out_dir is not None:
            check_checkpoint_config(config, out_dir)
        trainer, loaders = build_run(config, out_dir, problem)
        if out_dir is not None and is_main_process():
            write_atomic(out_dir / "config.yaml", config.to_yaml())
        trainer.fit(loaders["train"], loaders["val"], resume=resume)
        trainer.evaluate(loaders["val"], split="val")  # the selected model's, for the report
        results = trainer.evaluate(loaders["test"], split="test")
        evaluate_front(trainer, loaders["test"], out_dir)  # COSMOS: the front of the one model
        k = last_k_epochs(config.select)
        if k is not None:  # the Nash-MTL/FAMO protocol: the mean of the last k epochs
            last = mean_of_last_epochs(trainer.history, trainer.tasks, k)
            trainer.results[last_k_split(k)] = last
            trainer.write_summary()
        if figures and out_dir is not None and is_main_process() and plots_enabled(config):
            draw_plots(out_dir)
        trainer.close()  # the tracker runs of config.loggers get the result files
        return results


def selected_results(out_dir: Path) -> tuple[int | None, str, Results]:
    """``(best epoch, selection criterion, validation metrics)`` of the selected model of the
    finished run in ``out_dir`` (its ``summary.json``; :func:`run` evaluates the selected model
    on the validation split before the test split)."""
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    return summary["best_epoch"], summary["selection"], summary["results"]["val"]


def last_k_split(k: int) -> str:
    """The ``summary.json`` results key of ``select: last_<k>``: the mean of the validation
    metrics of the last ``k`` epochs (the test metrics when the validation split is the test
    split, as in Nash-MTL's NYUv2 and Cityscapes setups: ``data_args.val_fraction=0``)."""
    return f"val_mean_last_{k}"


def last_k_results(out_dir: Path, select: str) -> tuple[int, Results] | None:
    """``(k, mean of the last k epochs)`` from the run's ``summary.json`` when ``select`` is
    ``last_<k>``; ``None`` otherwise."""
    k = last_k_epochs(select)
    if k is None:
        return None
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    return k, summary["results"][last_k_split(k)]


def check_run(
    config: TrainConfig, out_dir: Path | None, resume: bool = False, overwrite: bool = False
) -> Problem:
    """Every check of :func:`run` (the names and arguments, the run folder, the resumed
    checkpoint's config, the data root, the sizes, one dry forward pass on the first batch) with
    nothing trained and nothing written; returns the data.

    Raises:
        MtlkitError: the first problem found (a ConfigError for a config error).
    """
    check_config(config)
    if out_dir is not None:
        check_claim(out_dir, resume=resume, overwrite=overwrite)
        if resume and (out_dir / CHECKPOINT_NAME).is_file():
            check_checkpoint_config(config, out_dir)
    no_split = dataclasses.replace(config, out=None)  # a drawn split is not written either
    problem = load_problem(no_split, None)
    build_run(config, None, problem)
    return problem


def build_run(
    config: TrainConfig, out_dir: Path | None, problem: Problem | None = None
) -> tuple[Trainer, dict[str, Any]]:
    """The Trainer and data loaders of ``config``, validated on the first batch
    (:meth:`Trainer.validate`) before any file is written."""
    if problem is None:
        problem = load_problem(config, out_dir)
    check_problem(config, [t.name for t in problem.tasks])
    check_model_size(config, problem)  # built on the meta device: nothing is allocated
    method_args = seeded(METHODS, config.method, config.method_args, config)
    method = METHODS.get(config.method, **method_args)
    strategy = STRATEGIES.get(config.strategy, method=method, **config.strategy_args)
    model = build_model(config.arch, config.arch_args, problem, method, config.strategy)
    factory = optimizer(
        config.optimizer,
        lr=config.lr,
        weight_decay=config.weight_decay,
        scheduler=config.scheduler,
        epochs=config.epochs or 1,
        **config.scheduler_args,
    )
    trainer = Trainer(
        model,
        problem.tasks,
        strategy,
        factory,
        budget=Budget(
            config.epochs,
            config.steps,
            config.passes,
            config.seconds,
            forward_backward=config.forward_backward,
        ),
        device=config.device,
        rep_grad=config.rep_grad,
        route=config.route,
        select=config.select,
        seed=config.seed,
        out_dir=out_dir,
        config=config.to_dict(),
        progress=config.progress,
        track_exploration=config.track_exploration,
        checkpoint_every=config.checkpoint_every,
        tensorboard=config.tensorboard or "tensorboard" in config.loggers,
        loggers=build_trackers(config.loggers, config.logger_args),
        amp=config.amp,
        accumulate=config.accumulate,
        on_nonfinite=config.on_nonfinite,
        affinity=affinity_options(config),
    )
    loaders = make_loaders(problem, config)
    # Before the run's files are written (mtlkit.app.validation): the dry forward on a batch of
    # the validation split, so that the training loaders are not touched before training.
    trainer.validate(loaders["train"], sample=sample_batch(loaders.get("val")))
    return trainer, loaders


STL_BASELINE = "stl_baseline.json"


def run_stl(
    config: TrainConfig, out_dir: Path, announce: bool = False, overwrite: bool = False
) -> Results:
    """Single-task baselines: for each task (``config.tasks``, or all of the problem's), train
    a model on that task alone into ``out_dir/stl/<task>``, with ``config`` except that the
    method is plain EW on the joint strategy (with one task: the task's own loss) and a
    selection criterion on another task's metric becomes ``loss``. Write the
    test metrics ``{task: {metric: value}}`` (losses left out) to ``out_dir/stl_baseline.json``
    and return them. A drawn split (Office) is shared by all tasks (``out_dir/splits``).

    ``out_dir`` is claimed for the whole (finished when it holds the baseline file), and each
    task's folder for its run: a task finished before with the same config is not trained again
    (its results are read), an interrupted one resumes from its checkpoint; ``overwrite``
    retrains them all.
    """
    data_args = dict(config.data_args)
    takes_splits = any(a.name == "split_dir" for a in DATASETS.arguments(config.data))
    if takes_splits and "split_dir" not in data_args:
        data_args["split_dir"] = str(out_dir / "splits")
    base = dataclasses.replace(
        config,
        data_args=data_args,
        method="ew",
        method_args={},
        strategy="joint",
        strategy_args={},
        baseline=None,
    )
    finished = lambda folder: (folder / STL_BASELINE).is_file()  # noqa: E731
    with claimed(out_dir, config, overwrite=overwrite, finished=finished):
        names = [t.name for t in load_problem(base, out_dir).tasks]
        write_atomic(out_dir / "config.yaml", config.to_yaml())
        baseline: Results = {}
        for name in names:
            task_dir = out_dir / "stl" / name
            select = base.select
            keeps = select in ("loss", "last") or last_k_epochs(select) is not None
            if not keeps and not select.startswith(f"{name}/"):
                select = "loss"  # another task's metric: that task is not trained here
            single = dataclasses.replace(base, tasks=[name], select=select, out=str(task_dir))
            results = _stl_task(single, task_dir, overwrite, announce)
            baseline[name] = {m: v for m, v in results[name].items() if m != "loss"}
        write_json_atomic(out_dir / STL_BASELINE, baseline)
    return baseline


def _stl_task(config: TrainConfig, task_dir: Path, overwrite: bool, announce: bool) -> Results:
    """One task's single-task run: its earlier results when it finished with this very config
    (the marker's config hash), a resume when it was interrupted, a new run otherwise."""
    marker = read_marker(task_dir) if task_dir.is_dir() else None
    same = marker is not None and marker.config_hash == config_hash(config.to_dict())
    if same and not overwrite and is_finished_run(task_dir):
        if announce:
            print(f"stl: task {config.tasks[0]!r} finished before in {task_dir}", flush=True)
        summary = json.loads((task_dir / "summary.json").read_text(encoding="utf-8"))
        return summary["results"]["test"]
    resume = marker is not None and not overwrite and (task_dir / CHECKPOINT_NAME).is_file()
    if announce:
        how = " (resumed)" if resume else ""
        print(f"stl: task {config.tasks[0]!r} -> {task_dir}{how}", flush=True)
    return run(config, task_dir, resume=resume, overwrite=overwrite, figures=False)


def load_baseline(path: str | Path) -> Results:
    """An ``stl_baseline.json``: ``{task: {metric: number}}``.

    Raises:
        ConfigError: if the file is missing, not JSON, or not of that form.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"baseline file {str(path)!r} does not exist (mtlkit train --stl)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"baseline file {str(path)!r} is not valid JSON: {error}") from error
    well_formed = isinstance(data, dict) and all(
        isinstance(metrics, dict)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
        for metrics in data.values()
    )
    if not well_formed:
        raise ConfigError(
            f"baseline file {str(path)!r} must hold {{task: {{metric: number}}}} "
            "(as written by mtlkit train --stl)"
        )
    return {t: {m: float(v) for m, v in metrics.items()} for t, metrics in data.items()}


def check_baseline(baseline: Results, tasks: Sequence[Task], path: str | Path) -> None:
    """Raise a ConfigError (before training) if ``baseline`` lacks a task or metric of
    ``tasks`` or holds a value Δm% cannot divide by."""
    for task in tasks:
        if task.name not in baseline:
            raise ConfigError(
                f"baseline {str(path)!r} has no task {task.name!r}; it has "
                f"{', '.join(baseline) or 'none'}"
            )
        for metric in task.metrics:
            value = baseline[task.name].get(metric)
            if value is None:
                raise ConfigError(f"baseline {str(path)!r} has no metric {task.name}/{metric}")
            if value == 0.0 or not math.isfinite(value):
                raise ConfigError(
                    f"baseline {str(path)!r}: {task.name}/{metric} = {value} (delta_m needs a "
                    "finite, non-zero baseline)"
                )


def format_delta_m(
    results: Results, tasks: Sequence[Task], baseline: Results, path: str | Path
) -> str:
    """The run's Δm% and Δp against ``baseline``, labelled with their conventions
    (:func:`mtlkit.tasks.baseline_deltas`): Nash-MTL's and FAMO's Δm%, the mean over all
    metrics (lower is better), and LibMTL's Δp, the ``Task.weight``-weighted mean over tasks of
    each task's mean (higher is better)."""
    flat, improvement = baseline_deltas(results, tasks, baseline)
    return f"vs {path}: Δm% {flat:+.2f} ({DELTA_M_LABEL}); Δp {improvement:+.2f}% ({DELTA_P_LABEL})"


def seeded(
    registry: Registry[Any], name: str, args: dict[str, Any], config: TrainConfig
) -> dict[str, Any]:
    """``args`` with ``generator=config.seed`` added for an entry that takes a ``generator`` and
    was not given one, so that stochastic methods are reproducible from the run's seed."""
    takes = any(a.name == "generator" for a in registry.arguments(name))
    return {**args, "generator": config.seed} if takes and "generator" not in args else args


def make_loaders(problem: Problem, config: TrainConfig) -> dict[str, Any]:
    """Seeded DataLoaders per split (``{task: DataLoader}`` for multi-input problems)."""

    def loader(dataset: Any, shuffle: bool, offset: int) -> DataLoader:
        generator = torch.Generator().manual_seed(config.seed * 1000 + offset)
        return DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=config.workers,
        )

    loaders: dict[str, Any] = {}
    for split, data in problem.splits.items():
        shuffle = split == "train"
        if problem.multi_input:
            loaders[split] = {t: loader(d, shuffle, i) for i, (t, d) in enumerate(data.items())}
        else:
            loaders[split] = loader(data, shuffle, 0)
    return loaders


def format_results(results: Results) -> str:
    """A plain-text table: one row per task, one column per metric."""
    metrics = sorted({m for r in results.values() for m in r}, key=lambda m: (m != "loss", m))
    header = ["task", *metrics]
    rows = [[t] + [f"{r[m]:.4f}" if m in r else "" for m in metrics] for t, r in results.items()]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
