"""Project files: the README's test command is what CI runs; the examples run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_readme_main_command_runs_mtlkit_train():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints.txt -e . && mtlkit train" in readme
    assert (ROOT / "constraints.txt").read_text().count("torch==") == 1


def test_own_loop_example_trains_above_chance():
    spec = importlib.util.spec_from_file_location("own_loop", ROOT / "examples" / "own_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(epochs=2)
    assert accuracy["left"] > 0.5 and accuracy["right"] > 0.5  # chance: 0.1
