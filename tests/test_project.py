"""Project files: the README's test command is what CI runs, its torch pin is that of
``constraints.txt``, its command lines are valid configs, and the examples run."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import yaml

from mtlkit.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_the_readme_names_the_torch_pin_of_constraints_txt():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints.txt -e . && mtlkit train" in readme
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line]
    named = re.search(r"`constraints\.txt` pins `(torch==[^`]+)`", readme)
    assert named is not None and pins == [named.group(1)]


def readme_cli_lines() -> list[list[str]]:
    """The arguments of every ``mtlkit train``/``mtlkit compare`` line of the README's bash
    blocks (comments cut), except those that need a file the reader makes first."""
    readme = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S):
        for line in block.splitlines():
            if not line.startswith(("mtlkit ", "python -m mtlkit ")):
                continue
            args = shlex.split(line.split(" #")[0])
            if args[:2] == ["python", "-m"]:
                args = args[2:]
            if args[1:2] not in (["train"], ["compare"]):
                continue
            if "exp.yaml" in args or "--resume" in args:  # the reader's own config, a run folder
                continue
            lines.append(args[1:])
    return lines


def test_the_readme_cli_examples_are_valid_configs(capsys):
    lines = readme_cli_lines()
    assert len(lines) >= 10 and ["train"] in lines and ["compare"] in [a[:1] for a in lines]
    for args in lines:
        assert main([*args, "--print-config"]) == 0, args
        capsys.readouterr()
    # the bare command is what the README says: "HPS + EW on MultiDigits, 10 epochs"
    assert main(["train", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["arch"], config["method"], config["data"]) == ("hps", "ew", "multidigits")
    assert config["epochs"] == 10


def test_own_loop_example_trains_above_chance():
    spec = importlib.util.spec_from_file_location("own_loop", ROOT / "examples" / "own_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(epochs=2)
    assert accuracy["left"] > 0.5 and accuracy["right"] > 0.5  # chance: 0.1
