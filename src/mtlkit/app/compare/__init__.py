"""``mtlkit compare``: a grid of methods x strategies x seeds (x budgets), one table, plots.

A compare config is a train config (:class:`~mtlkit.app.config.TrainConfig`: data, model,
optimizer, ...) plus the grid keys:

* ``methods``: a list of method names, or of mappings ``{name: cagrad, args: {c: 0.4},
  label: cagrad04}`` (``args`` and ``label`` optional; the label names the run folders and the
  table rows, by default the name, followed by the arguments);
* ``strategies``: the same for update strategies (``joint``, ``alternating``);
* ``seeds``: a list of seeds;
* ``budgets``: a list of budgets, each a mapping of one or more of ``epochs``, ``steps``,
  ``passes`` (forward passes), ``forward_backward`` (forward passes plus backward passes through
  the shared layers, the compute a method spends) and ``seconds``, with an optional ``name``
  (default: e.g. ``epochs4``, ``fb600``). Every method then runs once per budget, so that
  methods of different cost are compared at equal epochs *and* at equal compute. Without
  ``budgets`` the runs use the config's own ``epochs``/``steps``/... keys;
* ``stl``: ``per_seed`` (default: single-task baselines trained once for each seed, each run's
  Δm% taken against its seed's) or ``once`` (trained with the first seed, used for every run).
  The baselines are trained with the config's own budget keys (``epochs``, ...), and are not
  trained at all when the config names a ``baseline`` file (an ``stl_baseline.json``).

Without ``methods``/``strategies``/``seeds`` the grid takes the config's ``method``/
``strategy``/``seed``; giving both forms of a key is an error, as are unknown keys, names or
arguments, all reported before any run starts.

``run_grid`` trains every run into ``OUT/runs/<method>-<strategy>-seed<k>[-<budget>]/`` through
the single-run code path of ``mtlkit train`` (:func:`mtlkit.app.runner.run`; baselines through
:func:`mtlkit.app.runner.run_stl` into ``OUT/stl/seed<k>/``). A run whose ``summary.json`` holds its
test results is finished and skipped on the next invocation (its saved ``config.yaml`` must
match, or the grid stops with an error before training); a run with a ``checkpoint.pt`` (written
on Ctrl-C, or every ``checkpoint_every`` batches) resumes from it; any other is trained from the
start. ``jobs`` runs train at a time, each in a fresh worker process (spawned; torch threads =
CPUs // jobs), so that each run's peak memory and time are its own; ``jobs=0`` trains them one
after the other in this process (faster to start; on the CPU the peak memory is then the
process's running maximum). Then ``OUT/results.csv`` (one row per run), ``OUT/results.md``
(mean ± std over seeds, 95% CI of Δm%), ``OUT/compare.json`` (what the plots need) and the plots
of :func:`mtlkit.app.plots.plot_compare` are written.

Modules: :mod:`~mtlkit.app.compare.grid` (the config keys, validated into a :class:`Grid` of
runs), :mod:`~mtlkit.app.compare.folders` (finished runs, same-config checks),
:mod:`~mtlkit.app.compare.workers` (jobs and the worker pool), :mod:`~mtlkit.app.compare.report`
(rows, ``results.csv``/``results.md``/``compare.json``, statistics),
:mod:`~mtlkit.app.compare.references` (the published tables of the ``references`` key, beside
the results in ``results.md`` and ``references.csv``), :mod:`~mtlkit.app.compare.sweep` (a
method entry's ``preferences``: one run per preference vector, one front) and
:mod:`~mtlkit.app.compare.front` (each front's hypervolume, spread and non-dominated runs, in
``results.csv``/``results.md`` and ``front.png``) and
:mod:`~mtlkit.app.compare.command` (:func:`run_grid` and the subcommand).
"""

from __future__ import annotations

from mtlkit.app.compare.command import (
    EXIT_FAILED_RUNS,
    EXIT_INTERRUPTED,
    GridReport,
    compare_command,
    run_grid,
)
from mtlkit.app.compare.folders import (
    PRESENTATION_KEYS,
    check_same_config,
    is_finished,
    read_json,
)
from mtlkit.app.compare.grid import (
    BUDGET_ABBREVIATIONS,
    BUDGET_NAME,
    ENTRY_KEYS,
    GRID_KEYS,
    LABEL,
    STL_MODES,
    BudgetSpec,
    Entry,
    Grid,
    RunSpec,
    format_number,
    grid_keys,
    load_grid,
    stl_dir,
)
from mtlkit.app.compare.references import (
    Column,
    ReferenceTable,
    Row,
    comparisons,
    load_reference,
    load_references,
    reference_markdown,
    write_references,
)
from mtlkit.app.compare.report import (
    aggregate,
    baseline_description,
    batches_per_epoch,
    collect_rows,
    confidence_interval,
    delta_m_note,
    format_table,
    load_baselines,
    result_columns,
    results_markdown,
    run_delta_m,
    write_results,
)
from mtlkit.app.compare.workers import (
    Job,
    Outcome,
    available_cpus,
    execute,
    run_in_workers,
)

__all__ = [
    "BUDGET_ABBREVIATIONS",
    "BUDGET_NAME",
    "ENTRY_KEYS",
    "EXIT_FAILED_RUNS",
    "EXIT_INTERRUPTED",
    "GRID_KEYS",
    "LABEL",
    "PRESENTATION_KEYS",
    "STL_MODES",
    "BudgetSpec",
    "Column",
    "Entry",
    "Grid",
    "GridReport",
    "Job",
    "Outcome",
    "ReferenceTable",
    "Row",
    "RunSpec",
    "aggregate",
    "available_cpus",
    "baseline_description",
    "batches_per_epoch",
    "check_same_config",
    "collect_rows",
    "compare_command",
    "comparisons",
    "confidence_interval",
    "delta_m_note",
    "execute",
    "format_number",
    "format_table",
    "grid_keys",
    "is_finished",
    "load_baselines",
    "load_grid",
    "load_reference",
    "load_references",
    "read_json",
    "reference_markdown",
    "result_columns",
    "results_markdown",
    "run_delta_m",
    "run_grid",
    "run_in_workers",
    "stl_dir",
    "write_references",
    "write_results",
]
