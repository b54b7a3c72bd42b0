"""Published tables beside compare results (mtlkit.app.compare.references): the file format and
its checks, the pairing of published rows with a fake grid's results (numbers by hand), the
results.md section and references.csv, and the tables shipped with the ready configs (they load
against the configs' tasks, and their printed Δm% follow from their printed rows)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch.nn.functional as F
import yaml

from mtlkit.app.compare.grid import load_grid
from mtlkit.app.compare.references import (
    VS_STL,
    load_reference,
    load_references,
    reference_markdown,
    write_references,
)
from mtlkit.app.compare.report import aggregate
from mtlkit.data.multimnist import multimnist_tasks
from mtlkit.data.nyuv2 import nyuv2_tasks
from mtlkit.data.qm9 import qm9_tasks
from mtlkit.errors import ConfigError
from mtlkit.metrics import Accuracy, MeanAbsoluteError
from mtlkit.tasks import Task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASKS = [
    Task("left", F.cross_entropy, {"acc": Accuracy}),
    Task("err", F.l1_loss, {"mae": MeanAbsoluteError}),
]

# A made-up table (test data, no paper's numbers): accuracy in percent, an error as is.
TABLE = {
    "source": "A. Author, A Test Paper, 2030",
    "url": "https://example.org/paper",
    "table": "Table 9",
    "page": 4,
    "protocol": "3 seeds, last epoch.",
    "read_from": "the test below",
    "delta": "delta_m",
    "metrics": {
        "Acc": {"metric": "left/acc", "direction": "higher", "scale": 0.01},
        "Err": {"metric": "err/mae", "direction": "lower"},
    },
    "rows": [
        {"name": "STL", "method": "stl", "values": {"Acc": 90.0, "Err": 2.0}},
        {"name": "Equal", "method": "ew", "values": {"Acc": 88.0, "Err": 2.5}, "delta": 13.61},
        {"name": "Bargain", "method": "nash-mtl", "values": {"Err": 1.8}, "delta": -1.0},
        {"name": "MinNorm", "method": "mgda", "values": {"Err": 1.2}, "delta": 0.5},
    ],
}


def write_table(tmp_path: Path, table: dict, name: str = "ref.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(table, allow_unicode=True))
    return path


def fake_grid(tmp_path: Path):
    """A grid of ew and mgda over two seeds (validated, not trained) and its results rows."""
    config = tmp_path / "grid.yaml"
    config.write_text("methods: [ew, {name: mgda, label: mgda_a}]\nseeds: [0, 1]\nepochs: 1\n")
    grid = load_grid(config, [f"out={tmp_path / 'out'}"])
    rows = [
        {"budget": "", "method": "ew", "strategy": "joint", "seed": 0, "left/acc": 0.86,
         "err/mae": 2.2, "delta_m": 10.0},
        {"budget": "", "method": "ew", "strategy": "joint", "seed": 1, "left/acc": 0.90,
         "err/mae": 2.6, "delta_m": 14.0},
        {"budget": "", "method": "mgda_a", "strategy": "joint", "seed": 0, "left/acc": 0.80,
         "err/mae": 1.0, "delta_m": 1.0},
    ]  # fmt: skip
    baselines = {0: {"left": {"acc": 0.91}, "err": {"mae": 2.1}}}
    baselines[1] = {"left": {"acc": 0.89}, "err": {"mae": 1.9}}
    return grid, aggregate(grid, rows, TASKS), baselines


def test_a_table_is_read_with_its_columns_rows_and_citation(tmp_path):
    table = load_reference(write_table(tmp_path, TABLE), TASKS)
    assert [(c.name, c.key, c.higher_is_better, c.scale) for c in table.columns] == [
        ("Acc", "left/acc", True, 0.01),
        ("Err", "err/mae", False, 1.0),
    ]
    assert [r.method for r in table.rows] == ["stl", "ew", "nash_mtl", "mgda"]  # normalised
    assert table.citation() == "A. Author, A Test Paper, 2030, Table 9, p. 4"
    assert table.stl_row() is table.rows[0]
    assert table.rows[2].values == {"Err": 1.8}  # a number not checked is simply absent


def test_published_rows_are_paired_with_our_runs_and_baselines(tmp_path):
    table = load_reference(write_table(tmp_path, TABLE), TASKS)
    grid, groups, baselines = fake_grid(tmp_path)
    lines = reference_markdown([table], grid, groups, baselines)
    text = "\n".join(lines)
    assert "## Published: A. Author, A Test Paper, 2030, Table 9, p. 4" in text
    by_row = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    # STL: our baselines' mean, acc (0.91 + 0.89) / 2 = 0.90 -> 90 % (printed as the paper's
    # column, here without decimals), mae 2.0; no Δ for the single-task row.
    assert by_row["STL"] == "| STL | our stl | 2 | 90 / 90 (+0) | 2.0 / 2.0 (+0.0) |  |  |"
    # ew: acc mean 0.88 -> 88.0 (published 88.0), mae 2.4 (published 2.5: -0.1); Δm 12 vs 13.61.
    assert by_row["Equal"].startswith(
        "| Equal | ew joint | 2 | 88 / 88 (+0) | 2.5 / 2.4 (-0.1) | 13.61 / 12.00 (-1.61) |"
    )
    # Our Δm% against the published STL: (-(88 - 90)/90 + (2.4 - 2)/2) / 2 = 11.11 %.
    assert by_row["Equal"].endswith("| +11.11 |")
    assert VS_STL in text
    # mgda runs under the label mgda_a (one seed); its Acc was not published.
    assert by_row["MinNorm"] == (
        "| MinNorm | mgda_a joint | 1 | — / 80 | 1.2 / 1.0 (-0.2) | 0.50 / 1.00 (+0.50) | -19.44 |"
    )
    # nash_mtl has no run in the grid: the published values alone.
    assert "| Bargain | — |  | — | 1.8 | -1.00 |  |" in by_row["Bargain"]


def test_references_csv_holds_published_ours_and_difference(tmp_path):
    table = load_reference(write_table(tmp_path, TABLE), TASKS)
    grid, groups, baselines = fake_grid(tmp_path)
    path = write_references([table], grid, groups, baselines, tmp_path)
    lines = list(csv.DictReader(path.open()))
    equal = {r["column"]: r for r in lines if r["published_row"] == "Equal"}
    assert equal["Err"]["mtlkit_column"] == "err/mae" and equal["Err"]["direction"] == "lower"
    assert float(equal["Err"]["published"]) == 2.5
    assert math.isclose(float(equal["Err"]["ours"]), 2.4)
    assert math.isclose(float(equal["Err"]["difference"]), -0.1)
    assert math.isclose(float(equal["Acc"]["ours"]), 88.0)  # in the paper's percent
    assert math.isclose(float(equal["Δm%"]["difference"]), 12.0 - 13.61)
    assert math.isclose(float(equal[VS_STL]["ours"]), 100 / 9)
    assert {r["seeds"] for r in lines if r["published_row"] == "Equal"} == {"2"}
    bargain = [r for r in lines if r["published_row"] == "Bargain"]
    assert {r["ours"] for r in bargain} == {""}  # no run of that method


@pytest.mark.parametrize(
    "change, message",
    [
        ({"color": "red"}, "unknown key(s) color; valid: source, url"),
        ({"page": None}, "page must be text"),
        ({"delta": "dm"}, "delta 'dm' is not one of delta_m, delta_p"),
        ({"metrics": {"Acc": {"metric": "left/accuracy", "direction": "higher"}}},
         "'left/accuracy' is not a task metric of this config; valid: left/acc, err/mae"),
        ({"metrics": {"Acc": {"metric": "left/acc", "direction": "lower"}}},
         "the table says lower is better, but for left/acc higher is better"),
        ({"metrics": {"Acc": {"metric": "left/acc", "direction": "higher", "scale": 0}}},
         "scale must be > 0"),
        ({"metrics": {"A": {"metric": "left/acc", "direction": "higher"},
                      "B": {"metric": "left/acc", "direction": "higher"}}},
         "task metric(s) left/acc are mapped twice"),
        ({"rows": [{"name": "X", "method": "nashmtl"}]}, "method 'nashmtl' is not a registered"),
        ({"rows": [{"name": "X", "method": "ew", "values": {"Loss": 1.0}}]},
         "value(s) for Loss, not in metrics; valid: Acc, Err"),
        ({"rows": [{"name": "X", "method": "ew", "values": {"Acc": "high"}}]},
         "rows[0].values.Acc must be a finite number, got 'high'"),
        ({"rows": [{"name": "X", "method": "ew"}, {"name": "X", "method": "uw"}]},
         "row name(s) X appear more than once"),
        ({"rows": [{"name": "S", "method": "stl", "delta": 0.0}]}, "single-task row has no delta"),
        ({"rows": [{"name": "X", "method": "ew", "score": 1}]}, "rows[0]: unknown key(s) score"),
    ],
)  # fmt: skip
def test_a_bad_table_is_one_error_naming_it(tmp_path, change, message):
    table = {**TABLE, **change}
    if "metrics" in change:  # rows without values, so that the columns are what fails
        table["rows"] = [{"name": "X", "method": "ew"}]
    with pytest.raises(ConfigError) as caught:
        load_reference(write_table(tmp_path, table), TASKS)
    assert message in str(caught.value)
    assert "ref.yaml" in str(caught.value)


def test_a_delta_needs_the_tables_convention_and_required_keys_are_required(tmp_path):
    no_delta = {k: v for k, v in TABLE.items() if k != "delta"}
    with pytest.raises(ConfigError, match="a delta value needs the table's delta key"):
        load_reference(write_table(tmp_path, no_delta), TASKS)
    no_page = {k: v for k, v in TABLE.items() if k != "page"}
    with pytest.raises(ConfigError, match=r"missing key\(s\) page"):
        load_reference(write_table(tmp_path, no_page), TASKS)
    with pytest.raises(ConfigError, match="does not exist"):
        load_references([str(tmp_path / "none.yaml")], TASKS)


SHIPPED = {
    "multi_mnist.yaml": multimnist_tasks(),
    "qm9.yaml": qm9_tasks([0.0] * 11, [1.0] * 11),
    "nyuv2.yaml": nyuv2_tasks(),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_ready_configs_carry_tables_that_load_against_their_tasks(name):
    grid = load_grid(CONFIGS / name, ["data_args.root=/nonexistent"])
    assert grid.base.references, f"{name} names no published table"
    tables = load_references(grid.base.references, SHIPPED[name])  # resolved beside the config
    for table in tables:
        assert table.page and table.table and table.protocol and table.read_from
        assert table.url.startswith("https://arxiv.org/abs/")
        assert table.stl_row() is not None  # the single-task row, complete
        # Every column of the config's tasks is in the table (none silently missing).
        assert {c.key for c in table.columns} == {
            f"{t.name}/{m}" for t in SHIPPED[name] for m in t.metrics
        }


@pytest.mark.parametrize("name, tolerance", [("qm9.yaml", 0.25), ("nyuv2.yaml", 0.02)])
def test_the_printed_delta_m_follows_from_the_printed_rows(name, tolerance):
    """A transcription check: Nash-MTL's Δm% recomputed from the printed rows (rounded as
    printed) against its STL row is the printed Δm%; the one exception (IMTL-G on NYUv2, whose
    "11.25" is printed as 26.2) is named in the file's header."""
    grid = load_grid(CONFIGS / name, ["data_args.root=/nonexistent"])
    (table,) = load_references(grid.base.references, SHIPPED[name])
    stl = table.stl_row()
    for row in table.rows:
        if row.method == "stl":
            continue
        signs = [-1 if c.higher_is_better else 1 for c in table.columns]
        terms = [
            s * (row.values[c.name] - stl.values[c.name]) / stl.values[c.name]
            for s, c in zip(signs, table.columns, strict=True)
        ]
        recomputed = 100 * sum(terms) / len(terms)
        if name == "nyuv2.yaml" and row.name == "IMTL-G":
            assert math.isclose(recomputed, -0.60, abs_tol=0.01) and row.delta == -0.76
            continue
        assert abs(recomputed - row.delta) <= tolerance, (row.name, recomputed, row.delta)


@pytest.mark.slow
def test_compare_prints_and_writes_the_tables_beside_its_results(tmp_path, capsys, monkeypatch):
    """End to end on the embedded MultiDigits (one tiny run and its baselines): the table is
    checked before training, printed after the results and written to results.md and
    references.csv."""
    from mtlkit.app.cli import main

    monkeypatch.chdir(tmp_path)
    table = {
        **TABLE,
        "delta": "delta_m",
        "metrics": {"L": {"metric": "left/acc", "direction": "higher", "scale": 0.01}},
        "rows": [
            {"name": "ST", "method": "stl", "values": {"L": 50.0}},
            {"name": "EW", "method": "ew", "values": {"L": 40.0}, "delta": 3.0},
        ],
    }
    (tmp_path / "refs").mkdir()
    write_table(tmp_path / "refs", table, "made_up.yaml")
    (tmp_path / "grid.yaml").write_text(
        "data_args: {n_train: 64, n_val: 32, n_test: 32}\nepochs: 1\nplots: false\n"
        "progress: false\nreferences: [refs/made_up.yaml]\n"
    )
    assert main(["compare", "--config", "grid.yaml", "--out", "out", "--jobs", "0"]) == 0
    printed = capsys.readouterr().out
    assert "## Published: A. Author, A Test Paper, 2030, Table 9, p. 4" in printed
    assert "| EW | ew joint | 1 | 40 / " in printed
    assert "## Published:" in (tmp_path / "out" / "results.md").read_text()
    lines = list(csv.DictReader((tmp_path / "out" / "references.csv").open()))
    ours = float(
        next(r for r in lines if r["published_row"] == "EW" and r["column"] == "L")["ours"]
    )
    run = next(iter(csv.DictReader((tmp_path / "out" / "results.csv").open())))
    assert math.isclose(ours, 100 * float(run["left/acc"]))  # ours in the paper's percent
    # A bad table stops the grid before any run (nothing is trained).
    (tmp_path / "refs" / "made_up.yaml").write_text(yaml.safe_dump({**table, "page": None}))
    assert main(["compare", "--config", "grid.yaml", "--out", "out2", "--jobs", "0"]) != 0
    assert "page must be text" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "runs").exists()
