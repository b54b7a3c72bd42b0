"""Absurd configs refused before anything is allocated (issue 27, item 9): integer keys out of
range, YAML nested too deeply or expanding through aliases ("billion laughs"), and sizes of data
and models beyond the memory limit (:mod:`mtlkit.app.limits`), each one ``ConfigError`` naming
the key (or file), the estimate and the limit.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import one_line_error

from mtlkit.app import limits
from mtlkit.app.cli import main
from mtlkit.app.config import (
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    TrainConfig,
    load_config,
    parse_value,
    read_config_file,
)
from mtlkit.app.limits import (
    MAX_COPIES,
    check_model_size,
    check_sizes,
    estimate_model_bytes,
    memory_limit,
)
from mtlkit.architectures import build
from mtlkit.data.benchmarks import DATASETS, Problem, estimated_bytes
from mtlkit.errors import ConfigError

HUGE = 2**70

# --- Integer keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (f"batch_size={HUGE}", f"batch_size must be an integer in [1, 2147483647], got {HUGE}"),
        (f"steps={HUGE}", f"steps must be at most 2**63 - 1, got {HUGE}"),
        (f"checkpoint_every={HUGE}", "checkpoint_every must be at most 2**63 - 1"),
        ("workers=100000", "workers must be an integer in [0, 1024], got 100000"),
    ],
)
def test_integer_keys_out_of_range_are_one_clean_error(override, message, capsys, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
        load_config(overrides=[override])
    argv = ["train", override, "epochs=1", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()
    TrainConfig(batch_size=2**31 - 1, steps=2**63 - 1, workers=1024)  # the bounds themselves


# --- YAML -----------------------------------------------------------------------------------------


def nested_list(depth: int) -> str:
    """``x: [[...]]`` with ``depth`` nested lists inside the top mapping (depth + 1 levels)."""
    return "x: " + "[" * depth + "]" * depth + "\n"


def nested_mapping(depth: int) -> str:
    """A block mapping ``depth`` levels deep (``k0: {k1: {...}}`` with indentation)."""
    return "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v: 1\n"


def billion_laughs(levels: int = 9) -> str:
    """Nested aliases: ``levels`` lists of nine aliases of the list before; about 9**levels
    values once expanded, from a few hundred bytes."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("list", nested_list(3000), f"nesting deeper than {MAX_YAML_DEPTH} levels (the limit"),
        ("mapping", nested_mapping(400), f"nesting deeper than {MAX_YAML_DEPTH} levels"),
        ("flow mapping", "x: " + "{a: " * 3000 + "1" + "}" * 3000, "nesting deeper than 64"),
        ("billion laughs", billion_laughs(), f"more than {MAX_YAML_NODES} values with the alias"),
        ("recursive alias", "method_args: &m {again: *m}\n", "an alias of a node inside itself"),
        (
            "deep through aliases",
            "a: &a " + nested_list(40)[3:] + "b: " + "[" * 30 + "*a" + "]" * 30 + "\n",
            "nesting deeper than 64 levels with the aliases expanded",
        ),
    ],
)
def test_hostile_yaml_is_refused_naming_the_file_and_limit(name, text, message, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        read_config_file(path)
    assert time.perf_counter() - start < 5  # refused while composing, nothing expanded
    assert str(error.value).startswith(f"config file {str(path)!r} is refused: ")
    assert message in str(error.value)
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    assert message in one_line_error(capsys)


def test_yaml_limits_are_exact_and_aliases_within_them_still_work(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(nested_list(MAX_YAML_DEPTH - 1))  # the mapping + 63 lists: 64 levels
    value, depth = read_config_file(path)["x"], 1
    while value:
        value, depth = value[0], depth + 1
    assert depth == MAX_YAML_DEPTH - 1
    path.write_text(nested_list(MAX_YAML_DEPTH))
    with pytest.raises(ConfigError, match="nesting deeper than 64 levels"):
        read_config_file(path)
    path.write_text(billion_laughs(4))  # about 75000 values with the aliases expanded
    assert len(read_config_file(path)["a4"][8][8][8]) == 9
    path.write_text(billion_laughs(5))  # about 670000
    with pytest.raises(ConfigError, match="more than 100000 values"):
        read_config_file(path)
    path.write_text(
        "defaults: &d {reduction: mean}\nmethod: ew\nmethod_args: {<<: *d}\nepochs: 1\n"
    )
    assert read_config_file(path)["method_args"] == {"reduction": "mean"}
    with pytest.raises(ConfigError, match=r"value '\[\[\[\[.*\.\.\.' is refused: nesting deeper"):
        parse_value("[" * 3000 + "]" * 3000)


def test_config_file_over_one_mebibyte_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * 110_000 + "epochs: 1\n")
    with pytest.raises(ConfigError, match=r"is 1100010 bytes, more than the limit of 1048576"):
        read_config_file(path)


# --- Sizes against the memory limit ---------------------------------------------------------------


@pytest.fixture
def limit_8g(monkeypatch):
    monkeypatch.setenv(limits.MEMORY_LIMIT_ENV, "8G")
    assert memory_limit() == (8 * 2**30, "MTLKIT_MEMORY_LIMIT")


@pytest.mark.parametrize(
    ("data", "args", "needs"),
    [
        ("multidigits", {"n_train": 10**9}, "1.8 TiB"),
        ("attributes", {"n_train": 10**9}, "3.6 TiB"),
        ("mmoe_synthetic", {"n_train": 10**9}, "1.8 TiB"),
        ("mmoe_synthetic", {"input_dim": 10**7}, "1.7 TiB"),
    ],
)
def test_generated_data_beyond_memory_is_refused_before_generating(limit_8g, data, args, needs):
    config = TrainConfig(data=data, data_args=args)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        check_sizes(config)
    assert time.perf_counter() - start < 1
    given = ", ".join(f"data_args.{k}={v!r}" for k, v in args.items())
    assert str(error.value) == (
        f"generating data {data!r} ({given}) needs about {needs}, more than the memory limit "
        "8.0 GiB (MTLKIT_MEMORY_LIMIT; MTLKIT_MEMORY_LIMIT sets it); use smaller data_args "
        "(n_train, n_val, n_test, input_dim, ...)"
    )
    check_sizes(TrainConfig(data=data))  # the default sizes fit


def _stored_bytes(problem: Problem) -> int:
    return sum(
        value.numel() * value.element_size()
        for split in problem.splits.values()
        for value in vars(split).values()
        if isinstance(value, torch.Tensor)
    )


@pytest.mark.parametrize(
    ("data", "args"),
    [
        ("multidigits", {"shift": 6}),
        ("attributes", {"input_dim": 96, "num_attributes": 12}),
        ("mmoe_synthetic", {"num_sines": 20, "num_tasks": 3}),
    ],
)
def test_data_estimate_per_sample_covers_what_is_stored(data, args):
    """Per added sample, the estimate covers the tensors the splits keep (the peak while
    generating is larger: float64 working copies), within a factor 12 of them (measured: 4.8 to
    8.2)."""
    small, large = ({**args, "n_train": n, "n_val": 50, "n_test": 50} for n in (500, 2500))
    stored = _stored_bytes(DATASETS.get(data, **large)) - _stored_bytes(DATASETS.get(data, **small))
    estimate = estimated_bytes(data, **large) - estimated_bytes(data, **small)
    assert stored <= estimate <= 12 * stored
    assert estimated_bytes("qm9", root="anywhere") is None  # read from files
    assert estimated_bytes(data, n_train="many") is None  # the loader reports the type


@pytest.mark.parametrize(
    ("arch_args", "message"),
    [
        ({"num_experts": 10**6}, f"num_experts=1000000 is too large: at most {MAX_COPIES}"),
        ({"widths": [8] * 5000}, f"arch_args.widths has 5000 entries, at most {MAX_COPIES}"),
    ],
)
def test_module_counts_are_capped_before_building(arch_args, message):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_sizes(TrainConfig(arch="mmoe", arch_args=arch_args))
    assert time.perf_counter() - start < 1
    check_sizes(TrainConfig(arch="mmoe", arch_args={"num_experts": MAX_COPIES}))


@pytest.fixture(scope="module")
def digits() -> Problem:
    return DATASETS.get("multidigits", n_train=50, n_val=10, n_test=10)


def test_model_beyond_memory_is_refused_without_allocating(digits, limit_8g):
    config = TrainConfig(arch_args={"widths": [100000, 100000]})
    # input 1 x 8 x 12 = 96 features; heads left (10), right (10), sum (1)
    parameters = 96 * 100000 + 100000 + 100000 * 100000 + 100000 + 21 * 100000 + 21
    start = time.perf_counter()
    assert estimate_model_bytes(config, digits) == (parameters, parameters * 4 * (4 + 3))
    with pytest.raises(ConfigError) as error:
        check_model_size(config, digits)
    assert time.perf_counter() - start < 5
    assert str(error.value) == (
        f"arch 'hps' with arch_args {{'widths': [100000, 100000]}} has {parameters:,} "
        "parameters; training it (x7: weights, gradients, Adam state, one gradient per task) "
        "needs about 261.1 GiB, more than the memory limit 8.0 GiB (MTLKIT_MEMORY_LIMIT; "
        "MTLKIT_MEMORY_LIMIT sets it); use smaller arch_args (widths, dim, num_experts, ...)"
    )
    overflow = TrainConfig(arch_args={"widths": [10**10, 10**10]})
    with pytest.raises(ConfigError, match="cannot be built: Storage size calculation overflowed"):
        check_model_size(overflow, digits)
    check_model_size(TrainConfig(), digits)


@pytest.mark.parametrize(
    ("arch", "arch_args"),
    [
        ("hps", {}),
        ("mmoe", {"num_experts": 3}),
        ("dselect_k", {"num_experts": 4}),
        ("ple", {}),
        ("cross_stitch", {}),
        ("ltb", {}),
        ("mtan", {"backbone": "cnn"}),
        ("max_roaming", {"widths": [32, 16]}),
    ],
)
def test_meta_estimate_counts_the_parameters_of_the_real_model(digits, arch, arch_args):
    config = TrainConfig(arch=arch, arch_args=arch_args)
    estimate = estimate_model_bytes(config, digits)
    assert estimate is not None
    model = build(arch, digits.input_shape, digits.task_outputs, **arch_args)
    real = sum(p.numel() for p in model.parameters())
    assert estimate[0] == real
    assert estimate[1] >= real * 4 * (4 + len(digits.tasks))


def test_memory_limit_from_the_environment(digits, monkeypatch):
    monkeypatch.setenv(limits.MEMORY_LIMIT_ENV, "1M")
    assert memory_limit() == (2**20, "MTLKIT_MEMORY_LIMIT")
    with pytest.raises(ConfigError, match=r"needs about 1\.6 MiB, more than the memory limit 1\.0"):
        check_model_size(TrainConfig(), digits)  # 60437 parameters x 4 bytes x 7
    monkeypatch.setenv(limits.MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ConfigError, match="MTLKIT_MEMORY_LIMIT='lots' is not a size"):
        memory_limit()
    monkeypatch.delenv(limits.MEMORY_LIMIT_ENV)
    size, source = memory_limit()
    physical = limits.os.sysconf("SC_PAGE_SIZE") * limits.os.sysconf("SC_PHYS_PAGES")
    assert 0 < size <= physical and source in ("physical memory", "the cgroup's memory limit")


def images_problem(n: int) -> Problem:
    """A problem of ``n`` training images of 3 x 20000 x 20000 (4.8 GB each as float32)."""
    return Problem(
        splits={"train": TensorDataset(torch.zeros(n, 1))},
        tasks=[],
        input_shape=(3, 20000, 20000),
        task_outputs={"a": 1},
    )


def test_one_batch_beyond_memory_is_refused(limit_8g):
    config = TrainConfig(arch="hps", arch_args={"backbone": "cnn"}, batch_size=64)
    assert estimate_model_bytes(config, images_problem(100))[0] == 19457  # small (pooled)
    with pytest.raises(ConfigError) as error:
        check_model_size(config, images_problem(100))
    assert str(error.value) == (
        "one batch of batch_size=64 inputs of shape [3, 20000, 20000] needs about 286.1 GiB, "
        "more than the memory limit 8.0 GiB (MTLKIT_MEMORY_LIMIT; MTLKIT_MEMORY_LIMIT sets it); "
        "use a smaller batch_size, or smaller images (data_args.size or image_size)"
    )
    check_model_size(dataclasses.replace(config, batch_size=1), images_problem(100))
    check_model_size(config, images_problem(1))  # a batch is at most the training split
