"""The documentation: the site builds with ``mkdocs build --strict`` (the reference pages are
generated from the registries and the CLI parser, so every method and command has an entry),
and every ``python`` example on its pages and in the README runs.

An example is skipped only when the line before its fence is ``<!-- skip -->``. The examples of
one page run in order in one namespace, in a temporary working directory, with one torch thread.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
SKIP = "<!-- skip -->"


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every ``python`` fenced block not marked ``<!-- skip -->``."""
    blocks = []
    for match in FENCE.finditer(markdown):
        before = markdown[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before == SKIP:
            continue
        line = markdown.count("\n", 0, match.start()) + 1
        blocks.append((line, textwrap.dedent(match.group("code"))))
    return blocks


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)


def example_pages() -> list[Path]:
    """The pages with at least one example to run (the API pages have none)."""
    return [p for p in doc_pages() if python_blocks(p.read_text())]


def run_blocks(path: Path, blocks: list[tuple[int, str]], namespace: dict) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line, code in blocks:
            # Padded so that a traceback's line numbers are those of the Markdown file.
            exec(compile("\n" * line + code, str(path), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_the_block_finder_reads_fences_and_skip_markers():
    text = (
        "a\n```python\nx = 1\n```\n"
        "<!-- skip -->\n```python\nboom()\n```\n"
        "  ```python\n  y = 2\n  ```\n"
    )
    assert python_blocks(text) == [(2, "x = 1\n"), (9, "y = 2\n")]


def test_every_page_with_examples_is_tested_and_there_are_many():
    counted = {p.name: len(python_blocks(p.read_text())) for p in example_pages()}
    assert sum(counted.values()) >= 15, counted
    assert counted.get("index.md", 0) >= 3
    assert {"methods.md", "training.md", "cli.md"} <= set(counted), counted


def test_every_python_fence_is_run_or_marked_skip():
    """A fence the block finder cannot read (``py``, a closing fence indented differently) would
    otherwise never run: every opening ``python``/``py`` fence must be one it finds."""
    for page in [*doc_pages(), ROOT / "README.md"]:
        text = page.read_text()
        opened = len(re.findall(r"^[ \t]*```py(?:thon)?\b", text, re.M))
        assert len(FENCE.findall(text)) == opened, page


@pytest.mark.parametrize("page", example_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_blocks(page, python_blocks(page.read_text()), {"__name__": f"docs_{page.stem}"})


# The README's loop examples use names a real script defines (loader, encoder, ...): a small
# prelude defines them, so that the README's code itself runs unchanged.
README_PRELUDE = """
import torch
from torch import nn
from torch.utils.data import DataLoader
from mtlkit.data.benchmarks import DATASETS

torch.manual_seed(0)
epochs = 2
tasks = ["a", "b"]
encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
heads = {t: nn.Linear(16, 1) for t in tasks}
crit = {t: nn.functional.mse_loss for t in tasks}
x = torch.randn(16, 8)
loader = [(x, {"a": x[:, :1], "b": x[:, 1:2]})] * 2
optimizer = torch.optim.SGD(
    [*encoder.parameters(), *(p for h in heads.values() for p in h.parameters())], lr=0.01
)
_small = DATASETS.get("multidigits", n_train=128, n_val=64, n_test=64)
train_loader = DataLoader(_small.splits["train"], batch_size=64, shuffle=True)
val_loader = DataLoader(_small.splits["val"], batch_size=64)
test_loader = DataLoader(_small.splits["test"], batch_size=64)
"""


def test_readme_examples_run(tmp_path, monkeypatch):
    readme = ROOT / "README.md"
    blocks = python_blocks(readme.read_text())
    assert blocks, "the README has python examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(README_PRELUDE, "README prelude", "exec"), namespace)
    # The README's Trainer example trains for Budget(epochs=10): on the 2 small batches above.
    run_blocks(readme, blocks, namespace)


def test_docs_build_strict_with_an_entry_for_everything(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    for name in ("index.html", "api/engine/index.html", "concepts/methods/index.html"):
        assert (site / name).is_file(), name

    from mtlkit.app.cli import build_parser
    from mtlkit.architectures import ARCHITECTURES
    from mtlkit.data.benchmarks import DATASETS
    from mtlkit.methods import METHODS
    from mtlkit.training.strategies import STRATEGIES

    def ids(page: str) -> set[str]:
        return set(re.findall(r'id="([^"]+)"', (site / page / "index.html").read_text()))

    methods = ids("reference/methods")
    for name in METHODS.available():
        assert name in methods, f"method {name} has no reference entry"
    for page, registry in [
        ("reference/architectures", ARCHITECTURES),
        ("reference/strategies", STRATEGIES),
        ("reference/datasets", DATASETS),
    ]:
        assert set(registry.available()) <= ids(page), page
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    cli = ids("reference/cli")
    for command in commands.choices:
        assert f"mtlkit-{command}" in cli, f"mtlkit {command} has no reference entry"
    # Every method's entry shows its paper reference (the docstring's summary) and arguments.
    text = (site / "reference/methods/index.html").read_text()
    assert "Conflict-averse gradient descent" in text and "the radius factor" in text
