"""Config fuzzer: random and mutated ``mtlkit train`` configs through the CLI entry point.

Each example starts from a valid one-step run on tiny data and applies random mutations: config
keys (known and unknown, dotted), value types and values, method / architecture / strategy /
data set names and their arguments (plausible values around each argument's default, and junk),
task subsets, budgets, raw text that the YAML parser must survive. Every example must either
train (exit 0, ``summary.json`` written) or be refused with mtlkit's own error (exit 2, one
``mtlkit: error:`` message on stderr, no traceback); any other exception is a bug.

The default run draws 200 examples (derandomized, so CI is reproducible); ``pytest -m slow``
draws 3000. Set ``MTLKIT_FUZZ_REPORT=path.json`` to write the counts (examples, valid runs,
rejected, unexpected) and the error messages seen.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlkit.app.cli import main
from mtlkit.architectures import ARCHITECTURES, BACKBONES
from mtlkit.data.benchmarks import DATASETS
from mtlkit.methods import METHODS
from mtlkit.training.optim import OPTIMIZERS

# ----------------------------------------------------------------------------- the base run
FIXED = ["plots=false", "progress=false"]  # drawing plots would only cost time
DATA = {  # tiny data sets: a valid example trains in well under a second
    "multidigits": {"n_train": 16, "n_val": 8, "n_test": 8},
    "two_domain_digits": {"n_per_domain": 16, "n_val": 8, "n_test": 8},
    "attributes": {"n_train": 16, "n_val": 8, "n_test": 8, "num_attributes": 4},
    "mmoe_synthetic": {"n_train": 16, "n_val": 8, "n_test": 8, "input_dim": 8},
}
TASKS = {
    "multidigits": ["left", "right", "sum"],
    "two_domain_digits": ["plain", "inverted"],
    "attributes": [f"attr_{i}" for i in range(4)],  # not the real names: mostly refused
    "mmoe_synthetic": ["task_0", "task_1"],
}
BASE: dict[str, Any] = {"batch_size": 8, "steps": 1, "epochs": None, "track_exploration": False}
JUNK = st.sampled_from(
    [None, "", "x", -1, 0, 1.5, True, [], [1, "a"], {"a": 1}, float("nan"), float("inf"), 2**70]
)
RAW = st.text(alphabet="ab1-_.:=[]{}, '\"!&*#|>%@`é\t", max_size=12)


def render(value: Any) -> str:
    """A value as the text of ``key=value`` (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def around(default: Any) -> st.SearchStrategy[Any]:
    """Values near an argument's default (to get past the type checks and into the code),
    plus junk."""
    plausible: list[st.SearchStrategy[Any]] = [st.just(default)]
    if isinstance(default, bool):
        plausible.append(st.booleans())
    elif isinstance(default, int):
        plausible += [st.integers(-2, 6), st.just(default * 2), st.just(default + 1)]
    elif isinstance(default, float):
        plausible += [st.sampled_from([0.0, -1.0, 1e-3, 0.5, 2.0, default * 3]), st.just(1e300)]
    elif isinstance(default, str):
        plausible.append(st.sampled_from([default, default.upper(), "bogus"]))
    elif isinstance(default, (tuple, list)) and default:
        plausible.append(st.lists(around(default[0]), max_size=4))
    elif default is None:
        plausible.append(st.sampled_from([1, 2, 8, 0.5, [8], "x"]))
    # junk about one time in eight, so that most arguments reach the code behind the checks
    return st.integers(0, 7).flatmap(lambda i: JUNK if i == 0 else st.one_of(plausible))


def argument_values(registry: Any, name: str, skip: tuple[str, ...]) -> st.SearchStrategy:
    """A dict of some of the entry's arguments with values around their defaults."""
    try:
        arguments = [a for a in registry.arguments(name) if a.name not in skip]
    except Exception:  # an unknown name: random keys
        return st.dictionaries(st.sampled_from(["a", "c", "weights"]), JUNK, max_size=2)
    if not arguments:
        return st.just({})
    entries = {
        a.name: around(None if a.required else a.default)
        for a in arguments
        if a.name not in ("generator",)
    }
    return st.fixed_dictionaries({}, optional=entries)


# ------------------------------------------------------------------------------ mutations
@st.composite
def configs(draw: st.DrawFn) -> list[str]:
    """A list of ``key=value`` overrides for ``mtlkit train``."""
    values: dict[str, Any] = dict(BASE)
    data = draw(st.sampled_from([*DATA, "multidigits", "multidigits", "nyu"]))
    values["data"] = data
    data_args = dict(DATA.get(data, {}))
    if draw(st.booleans()):
        extra = draw(argument_values(DATASETS, data, skip=("seed", "root")))
        for key, value in extra.items():  # keep the data tiny: counts stay small or invalid
            if isinstance(value, int) and not isinstance(value, bool) and value > 64:
                value = -value
            data_args[key] = value
    values["data_args"] = data_args
    tasks = TASKS.get(data, ["left"])
    raw: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(
            st.sampled_from(
                [
                    *["method"] * 4,
                    *["arch"] * 3,
                    *["strategy"] * 2,
                    "tasks",
                    "budget",
                    *["optimization"] * 2,
                    "run",
                    "type",
                    "unknown",
                    "raw",
                ]
            )
        )
        if kind == "method":
            name = draw(st.sampled_from([*METHODS.available(), "nash-mtl", "UPGrad", "nope"]))
            values["method"] = name
            values["method_args"] = draw(argument_values(METHODS, name, skip=()))
        elif kind == "arch":
            name = draw(st.sampled_from([*ARCHITECTURES.available(), "nope"]))
            values["arch"] = name
            args = draw(
                argument_values(
                    ARCHITECTURES, name, skip=("input_shape", "task_outputs", "multi_input")
                )
            )
            if "backbone" in args or draw(st.booleans()):
                args["backbone"] = draw(st.sampled_from([*BACKBONES, "mlp", "mlp", "x"]))
            if "widths" in args or draw(st.booleans()):
                args["widths"] = draw(st.one_of(st.lists(st.integers(-1, 16), max_size=3), JUNK))
            args.pop("weights", None)
            values["arch_args"] = args
        elif kind == "strategy":
            name = draw(st.sampled_from(["joint", "alternating", "alternating", "nope"]))
            values["strategy"] = name
            args: dict[str, Any] = {}
            if name != "joint":
                if draw(st.booleans()):
                    args["groups"] = draw(
                        st.one_of(
                            st.just("each"),
                            st.lists(
                                st.lists(st.sampled_from([*tasks, "zz"]), max_size=3),
                                max_size=3,
                            ),
                            JUNK,
                        )
                    )
                if draw(st.booleans()):
                    args["group_size"] = draw(st.one_of(st.integers(-1, 4), JUNK))
                for key, options in [
                    ("resample", ["never", "epoch", "step", "x"]),
                    ("optimizers", ["shared", "per_group", "x"]),
                    ("order", ["fixed", "random", "x"]),
                    ("lr_scaling", ["none", "sqrt", "linear", "x"]),
                    ("shared_decay", ["per_step", "per_batch", "x"]),
                ]:
                    if draw(st.integers(0, 3)) == 0:
                        args[key] = draw(st.sampled_from(options))
            else:
                args = draw(
                    st.dictionaries(st.sampled_from(["groups", "method"]), JUNK, max_size=1)
                )
            values["strategy_args"] = args
        elif kind == "tasks":
            values["tasks"] = draw(
                st.one_of(
                    st.lists(st.sampled_from([*tasks, "zz"]), min_size=1, max_size=3),
                    st.just([]),
                    JUNK,
                )
            )
        elif kind == "budget":
            values["steps"] = draw(st.sampled_from([1, 2, None, 0, -1, "x", 1.5]))
            values["epochs"] = draw(st.sampled_from([None, None, 1, 0, -1, "x"]))
            values["passes"] = draw(st.sampled_from([None, None, 1, 3, 0]))
            values["seconds"] = draw(st.sampled_from([None, None, 0.05, 0, -1.0, float("inf")]))
            values["forward_backward"] = draw(st.sampled_from([None, None, 2, 0]))
        elif kind == "optimization":
            key = draw(
                st.sampled_from(
                    [
                        "optimizer",
                        "lr",
                        "weight_decay",
                        "scheduler",
                        "scheduler_args",
                        "batch_size",
                        "seed",
                        "route",
                        "rep_grad",
                        "on_nonfinite",
                        "accumulate",
                        "amp",
                    ]
                )
            )
            values[key] = draw(
                {
                    "optimizer": st.sampled_from([*OPTIMIZERS, "ADAM", "lbfgs"]),
                    "lr": st.sampled_from([1e-3, 0.1, 0, -1, 1e39, 10.0, 1e-300]),
                    "weight_decay": st.sampled_from([0.0, 0.1, -1.0, float("nan")]),
                    "scheduler": st.sampled_from(["none", "step", "cosine", "x"]),
                    "scheduler_args": st.fixed_dictionaries(
                        {}, optional={"step_size": around(10), "gamma": around(0.5), "x": JUNK}
                    ),
                    "batch_size": st.sampled_from([8, 1, 3, 0, -3, 2.5, 10**6]),
                    "seed": st.sampled_from([0, 1, -1, 2**32, 2**70]),
                    "route": st.sampled_from(["auto", "loop", "batched", "gramian", "x"]),
                    "rep_grad": st.sampled_from([False, True, True, "x"]),
                    "on_nonfinite": st.sampled_from(["raise", "skip_step", "skip_task", "x"]),
                    "accumulate": st.sampled_from([1, 2, 0, -1]),
                    "amp": st.sampled_from(["none", "bf16", "fp16", "x"]),
                }[key]
            )
        elif kind == "run":
            key = draw(
                st.sampled_from(
                    ["device", "select", "checkpoint_every", "workers", "baseline", "tensorboard"]
                )
            )
            values[key] = draw(
                {
                    "device": st.sampled_from(["cpu", "cuda", "cuda:3", "tpu", "meta", "", 3]),
                    "select": st.sampled_from(["loss", "last", f"{tasks[0]}/acc", "x", "a/b"]),
                    "checkpoint_every": st.sampled_from([None, 1, 0, -2]),
                    "workers": st.sampled_from([0, -1, "x"]),
                    "baseline": st.sampled_from([None, "/nonexistent/stl_baseline.json"]),
                    "tensorboard": st.sampled_from([False, True]),
                }[key]
            )
        elif kind == "type":  # any key, any type
            key = draw(st.sampled_from([*sorted(values), "lr", "tasks", "method_args"]))
            values[key] = draw(JUNK)
        elif kind == "unknown":
            raw.append(
                draw(
                    st.sampled_from(
                        ["foo=1", "lr.x=1", "=3", "method_args=5", "data_args.=1", "Epochs=1"]
                    )
                )
            )
        else:  # raw text as a value of a random key
            key = draw(st.sampled_from(["lr", "method", "method_args.c", "tasks", "data_args"]))
            raw.append(f"{key}={draw(RAW)}")
    overrides = []
    for key, value in values.items():
        if isinstance(value, dict) and value and draw(st.booleans()):
            overrides += [f"{key}.{k}={render(v)}" for k, v in value.items()]  # dotted form
        else:
            overrides.append(f"{key}={render(value)}")
    return overrides + raw + FIXED


# ------------------------------------------------------------------------------ the harness
OUTCOMES: Counter[str] = Counter()
MESSAGES: Counter[str] = Counter()
UNEXPECTED: list[str] = []


def run_example(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="mtlkit-fuzz-") as folder:
        run_in(overrides, Path(folder) / "run")


def run_in(overrides: list[str], out: Path) -> None:
    """One example, writing into ``out``: counted in ``OUTCOMES``; asserts its outcome."""
    argv = ["train", *overrides, f"out={out}"]
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors (exit 2)
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException as error:
        OUTCOMES["unexpected"] += 1
        UNEXPECTED.append(f"{argv}: {''.join(traceback.format_exception(error))}")
        raise
    err = stderr.getvalue()
    if code == 0:
        OUTCOMES["valid"] += 1
        summary = json.loads((out / "summary.json").read_text())
        assert summary["cost"]["steps"] >= 1 or summary["cost"]["passes"] >= 1, argv
        assert (
            all(math.isfinite(p) for p in _numbers(summary["results"].get("test", {})))
            or summary["config"]["on_nonfinite"] != "raise"
        ), (argv, summary["results"])
        return
    OUTCOMES["rejected"] += 1
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    assert "error: " in err, (argv, err)
    MESSAGES[err.split("error: ", 1)[1].split(";")[0].split(":")[0][:60]] += 1


def _numbers(results: dict) -> list[float]:
    return [v for metrics in results.values() for v in metrics.values() if v is not None]


def report() -> dict[str, Any]:
    return {
        "examples": sum(OUTCOMES.values()),
        **{k: OUTCOMES.get(k, 0) for k in ("valid", "rejected", "unexpected")},
        "messages": dict(MESSAGES.most_common()),
        "unexpected_examples": UNEXPECTED,
    }


@pytest.fixture(autouse=True)
def _write_report(request):
    OUTCOMES.clear()
    MESSAGES.clear()
    UNEXPECTED.clear()
    yield
    path = os.environ.get("MTLKIT_FUZZ_REPORT")
    if path:
        reports = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        reports[request.node.name] = report()
        Path(path).write_text(json.dumps(reports, indent=2))


COMMON = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@settings(max_examples=200, **COMMON)
@given(configs())
def test_fuzzed_configs_train_or_fail_with_exit_code_2(overrides):
    run_example(overrides)


@pytest.mark.slow
@settings(max_examples=3000, **COMMON)
@given(configs())
def test_fuzzed_configs_many(overrides):
    run_example(overrides)


def test_the_base_config_trains():
    """The unmutated example is valid (else the fuzzer would only test rejections)."""
    overrides = [f"{k}={render(v)}" for k, v in {**BASE, "data_args": DATA["multidigits"]}.items()]
    run_example([*overrides, *FIXED])
    assert OUTCOMES["valid"] == 1
