"""Generate the reference pages from the registries, the docstrings and the CLI parser.

An MkDocs hook (``hooks:`` in ``mkdocs.yml``): at every build, :func:`on_files` adds the pages of
:func:`generate` to the site, so the reference is never a stale copy (a committed file at one of
these paths is an error). Run it as a script to look at the Markdown it makes::

    python docs/hooks/reference.py OUT_DIR

Every registered method, architecture, backbone, strategy and data set gets one entry: its
registered name, what it is, its docstring (paper reference and update rule for methods), and a
table of its arguments with their defaults (from the signature that ``Registry.get`` checks
against) and their descriptions (from the docstring's ``Args:``). The CLI page renders the
``--help`` of every subcommand of ``mtlkit.app.cli.build_parser()`` and the config keys of
``TrainConfig``. A registered entry without a docstring, or a data set that reads a root folder
without a known layout, stops the build.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import griffe
from griffe_rst import rst_to_markdown  # a sibling: mkdocs puts this folder on sys.path

# For each data set: the module whose docstring describes it, the name of its layout constant
# (``None``: generated or embedded, nothing on disk) and the loader whose ``Args:`` describe the
# arguments that the registered factory passes on.
DATASET_DOCS: dict[str, tuple[str, str | None, str]] = {
    "multidigits": ("mtlkit.data.multidigits", None, "MultiDigitsConfig"),
    "two_domain_digits": ("mtlkit.data.multi_input", None, "two_domain_digits"),
    "attributes": ("mtlkit.data.attributes", None, "AttributesConfig"),
    "mmoe_synthetic": ("mtlkit.data.synthetic", None, "mmoe_synthetic"),
    "nyuv2": ("mtlkit.data.nyuv2", "LAYOUT", "nyuv2"),
    "cityscapes": ("mtlkit.data.cityscapes", "LAYOUT", "cityscapes"),
    "celeba": ("mtlkit.data.celeba", "LAYOUT", "celeba"),
    "office_31": ("mtlkit.data.office", "OFFICE31_LAYOUT", "office"),
    "office_home": ("mtlkit.data.office", "OFFICE_HOME_LAYOUT", "office"),
    "qm9": ("mtlkit.data.qm9", "LAYOUT", "qm9"),
    "multi_mnist": ("mtlkit.data.multimnist", "LAYOUT", "multimnist"),
    "multi_fashion": ("mtlkit.data.multimnist", "LAYOUT", "multimnist"),
}

# Architecture arguments that come from the data set, not from ``arch_args``.
PROBLEM_ARGUMENTS = ("input_shape", "task_outputs", "multi_input")

# The arguments every stage-wise builder passes to ``build_backbone``.
BACKBONE_ARGUMENTS = {
    "backbone": "the backbone whose stages the architecture is built on: `mlp`, `cnn`, `resnet` "
    "or `segnet` ([backbones](#backbones)).",
    "widths": "the backbone's widths, one per stage; `None`: the backbone's default.",
    "weights": "a file of pretrained backbone weights to load (optional).",
}


ROLE_NAMES = re.compile(r":class:`~?([\w.]+)`")


class ReferenceError(RuntimeError):
    """The reference cannot be generated (a missing docstring or layout)."""


# --------------------------------------------------------------------------- docstrings
def _resolver(module_name: str) -> Callable[[str], str]:
    """Role targets as written in ``module_name`` -> full dotted paths (autorefs identifiers)."""
    module = importlib.import_module(module_name)

    def resolve(target: str) -> str:
        head, _, rest = target.partition(".")
        obj = getattr(module, head, None)
        if obj is None:
            return target
        if inspect.ismodule(obj):
            base = obj.__name__
        elif hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
            base = f"{obj.__module__}.{obj.__qualname__}"
        else:
            return f"{module_name}.{target}"
        return f"{base}.{rest}" if rest else base

    return resolve


def own_doc(obj: Any, what: str) -> str:
    """``obj``'s own docstring, dedented; a missing one stops the build."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    if not doc or not doc.strip():
        raise ReferenceError(f"{what} has no docstring; the reference is made from docstrings")
    return inspect.cleandoc(doc)


@dataclasses.dataclass
class ParsedDoc:
    summary: str
    body: str  # Markdown, without the summary and the Args section
    params: dict[str, str]  # argument -> description (Markdown)


def parse_doc(doc: str, module_name: str) -> ParsedDoc:
    """Split a Google-style docstring into summary, body (Markdown) and argument descriptions."""
    text = rst_to_markdown(doc, _resolver(module_name))
    sections = griffe.Docstring(
        text,
        parser="google",
        parser_options={"warn_missing_types": False, "returns_multiple_items": False},
    ).parse()
    parts: list[str] = []
    params: dict[str, str] = {}
    for section in sections:
        kind = section.kind.value
        if kind == "text":
            parts.append(section.value)
        elif kind in ("parameters", "other parameters"):
            params.update({param.name: param.description for param in section.value})
        elif kind == "attributes":
            rows = [f"- `{a.name}`: {_one_line(a.description)}" for a in section.value]
            parts.append("**Attributes**\n\n" + "\n".join(rows))
        elif kind == "raises":
            rows = [f"- `{r.annotation}`: {_one_line(r.description)}" for r in section.value]
            parts.append("**Raises**\n\n" + "\n".join(rows))
        elif kind == "returns":
            rows = [_one_line(r.description) for r in section.value]
            parts.append("**Returns**\n\n" + "\n\n".join(rows))
        elif kind == "admonition":
            title = section.title or section.value.annotation or ""
            parts.append(f"**{title.strip().rstrip(':')}**\n\n{section.value.description}")
        else:  # examples, warns, ...: as text
            parts.append(str(section.value))
    body = "\n\n".join(parts).strip()
    summary, _, rest = body.partition("\n\n")
    return ParsedDoc(summary=_one_line(summary), body=rest.strip(), params=params)


def inherited_params(cls: type) -> dict[str, str]:
    """Argument descriptions from the docstrings of ``cls``'s bases (an alias class such as
    ``CRMOGM(Smoothed)`` documents its arguments in the base)."""
    params: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        doc = base.__dict__.get("__doc__")
        if doc and base.__module__.startswith("mtlkit."):
            params.update(parse_doc(inspect.cleandoc(doc), base.__module__).params)
    return params


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|") or "—"


def _repr_default(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "*required*"
    return f"`{value!r}`"


def arguments_table(
    arguments: list[Any], params: dict[str, str], skip: tuple[str, ...] = ()
) -> str:
    """A Markdown table of a registry entry's arguments (name, type, default, description)."""
    rows = [
        f"| `{a.name}` | `{a.annotation or 'Any'}` | {_repr_default(a.default)} | "
        f"{_cell(params.get(a.name, ''))} |"
        for a in arguments
        if a.name not in skip
    ]
    if not rows:
        return "*No arguments.*"
    header = "| argument | type | default | description |\n|---|---|---|---|\n"
    return header + "\n".join(rows)


def _example_value(argument: Any) -> str | None:
    if argument.default is inspect.Parameter.empty or argument.default is None:
        return None
    if isinstance(argument.default, bool | int | float | str):
        return repr(argument.default)
    return None


def _py(value: str) -> str:
    """A repr with double quotes for strings (as the examples in the docs are written)."""
    return f'"{value[1:-1]}"' if value[:1] == "'" and '"' not in value else value


def undocumented(registry: Any, name: str, params: dict[str, str], skip=()) -> list[str]:
    return [a.name for a in registry.arguments(name) if a.name not in params and a.name not in skip]


# --------------------------------------------------------------------------- methods
def method_group(cls: type) -> str:
    from mtlkit.methods import GramianWeighting

    if cls.kind == "loss":
        return "bilevel" if cls.needs_probe else "loss"
    return "gramian" if issubclass(cls, GramianWeighting) else "gradient"


METHOD_GROUPS = {
    "loss": (
        "Loss weightings",
        "See the task losses only; the update is the gradient of `Σ w_i L_i (+ extra)` for every "
        "parameter (one backward).",
    ),
    "bilevel": (
        "Bilevel loss weightings",
        "Loss weightings that set the weights by a virtual step on the batch, evaluated on an "
        "independent batch (`needs_probe`: the strategy gives them a `StepProbe`).",
    ),
    "gramian": (
        "Gradient aggregators: Gramian weightings",
        "The direction is `w @ J` with `w` a function of the Gramian `G = J Jᵀ` (and the losses): "
        "they offer `weights(G)`, so the engine may skip the Jacobian (the Gramian route).",
    ),
    "gradient": (
        "Other gradient aggregators",
        "Map the Jacobian `J` (`[m, n]`) of the task losses w.r.t. the shared parameters (or "
        "features) to one direction `[n]`.",
    ),
}


def methods_page() -> tuple[str, list[str]]:
    from mtlkit.methods import METHODS

    problems: list[str] = []
    names = METHODS.available()
    by_group: dict[str, list[str]] = {g: [] for g in METHOD_GROUPS}
    for name in names:
        by_group[method_group(METHODS.factory(name))].append(name)
    out = [
        "# Methods reference",
        "",
        f"Every registered method ({len(names)}), generated from the registry "
        "(`mtlkit.methods.METHODS`) and the docstrings at build time. Build one with "
        '`mtlkit.methods.get("name", **arguments)` or the class, or from the command line with '
        "`--method name method_args.argument=value`. The kinds and how the engine calls them: "
        "[Methods](../concepts/methods.md).",
        "",
        "| name | class | kind | reference |",
        "|---|---|---|---|",
    ]
    for group, members in by_group.items():
        for name in members:
            cls = METHODS.factory(name)
            doc = parse_doc(own_doc(cls, f"method {name!r}"), cls.__module__)
            out.append(
                f"| [`{name}`](#{name}) | `{cls.__name__}` | {METHOD_GROUPS[group][0]} | "
                f"{_cell(doc.summary)} |"
            )
    for group, members in by_group.items():
        title, intro = METHOD_GROUPS[group]
        out += ["", f"## {title}", "", intro]
        for name in members:
            entry, missing = method_entry(name)
            out += ["", entry]
            problems += [f"method {name}: argument {a!r} not in the docstring" for a in missing]
    return "\n".join(out) + "\n", problems


def method_entry(name: str) -> tuple[str, list[str]]:
    from mtlkit.methods import METHODS

    cls = METHODS.factory(name)
    doc = parse_doc(own_doc(cls, f"method {name!r}"), cls.__module__)
    doc.params = {**inherited_params(cls), **doc.params}
    arguments = METHODS.arguments(name)
    kind = {
        "loss": "loss weighting",
        "bilevel": "bilevel loss weighting",
        "gramian": "gradient aggregator, Gramian weighting",
        "gradient": "gradient aggregator",
    }[method_group(cls)]
    properties = []
    if "generator" in inspect.signature(cls.__init__).parameters:
        properties.append("stochastic (seeded by `generator`)")
    if cls.needs_losses_after:
        properties.append("needs the losses after the step (one more forward pass)")
    if cls.needs_probe:
        properties.append("needs a step probe (bilevel)")
    extra = getattr(cls, "extra_batches", 0)
    if isinstance(extra, int) and extra:
        properties.append(f"{extra} extra independent batch(es) per step")
    examples = {a.name: _example_value(a) for a in arguments}
    shown = {k: v for k, v in examples.items() if v is not None}
    call = ", ".join([f'"{name}"', *(f"{k}={_py(v)}" for k, v in list(shown.items())[:2])])
    cli = " ".join(
        [
            f"--method {name}",
            *(f"method_args.{k}={v.strip(chr(39))}" for k, v in list(shown.items())[:2]),
        ]
    )
    lines = [
        f"### `{name}`: {cls.__name__} {{ #{name} }}",
        "",
        f"[](){{ #{cls.__module__}.{cls.__qualname__} }}",
        f"**{doc.summary}**",
        "",
        "| | |",
        "|---|---|",
        f"| class | `mtlkit.methods.{cls.__name__}` (`{cls.__module__}`) |",
        f"| kind | {kind} |",
    ]
    if properties:
        lines.append(f"| needs | {'; '.join(properties)} |")
    lines += [
        f"| Python | `methods.get({call})` |",
        f"| CLI | `mtlkit train {cli}` |",
        "",
    ]
    if doc.body:
        lines += [doc.body, ""]
    lines += ["**Arguments**", "", arguments_table(arguments, doc.params)]
    return "\n".join(lines), undocumented(METHODS, name, doc.params)


# --------------------------------------------------------------------------- architectures
def architectures_page() -> tuple[str, list[str]]:
    from mtlkit.architectures import ARCHITECTURES
    from mtlkit.architectures.backbones import BACKBONES

    problems: list[str] = []
    out = [
        "# Architectures reference",
        "",
        f"Every registered architecture ({len(ARCHITECTURES.available())}) and backbone "
        f"({len(BACKBONES.available())}), generated from the registries at build time. "
        "`mtlkit.architectures.build(name, input_shape, task_outputs, **arguments)` or "
        "`--arch name arch_args.argument=value`; the input shape and the outputs per task "
        "(`input_shape`, `task_outputs`, `multi_input`) come from the data set. The model "
        "contract: [Architectures](../concepts/architectures.md).",
        "",
        "| name | shared representation (`rep_grad`) | summary |",
        "|---|---|---|",
    ]
    entries = []
    for name in ARCHITECTURES.available():
        factory = ARCHITECTURES.factory(name)
        raw = own_doc(factory, f"architecture {name!r}")
        doc = parse_doc(raw, factory.__module__)
        module = sys.modules[factory.__module__]
        # The builder passes its arguments on to the class it returns (and the classes its
        # docstring names, e.g. mpnn's encoder); their ``Args:`` describe them.
        described = [typing.get_type_hints(factory).get("return")]
        described += [getattr(module, n, None) for n in ROLE_NAMES.findall(raw)]
        params = dict(BACKBONE_ARGUMENTS)
        for cls in described:
            if isinstance(cls, type) and cls.__dict__.get("__doc__"):
                params.update(parse_doc(inspect.cleandoc(cls.__doc__), cls.__module__).params)
        doc.params = {**params, **doc.params}
        rep = name == "hps"
        out.append(f"| [`{name}`](#{name}) | {'yes' if rep else 'no'} | {_cell(doc.summary)} |")
        lines = [
            f"### `{name}` {{ #{name} }}",
            "",
            f"**{doc.summary}**",
            "",
            f"`mtlkit train --arch {name}` · builder `{factory.__module__}.{factory.__name__}`",
            "",
        ]
        if doc.body:
            lines += [doc.body, ""]
        lines += [
            "**Arguments** (`arch_args`)",
            "",
            arguments_table(ARCHITECTURES.arguments(name), doc.params, PROBLEM_ARGUMENTS),
        ]
        if module.__doc__:
            about = rst_to_markdown(inspect.cleandoc(module.__doc__), _resolver(module.__name__))
            lines += ["", f'??? info "Module `{module.__name__}`"', "", _indent(about)]
        entries.append("\n".join(lines))
        problems += [
            f"architecture {name}: argument {a!r} not in the docstring"
            for a in undocumented(ARCHITECTURES, name, doc.params, PROBLEM_ARGUMENTS)
        ]
    out += ["", "## Architectures", "", "\n\n".join(entries), "", "## Backbones", ""]
    out.append(
        "The stage-wise architectures run on any backbone given as stages "
        "(`arch_args.backbone=NAME`, `arch_args.widths=[...]`, optional `arch_args.weights=FILE`)."
    )
    for name in BACKBONES.available():
        factory = BACKBONES.factory(name)
        doc = parse_doc(own_doc(factory, f"backbone {name!r}"), factory.__module__)
        out += [
            "",
            f"### `{name}` {{ #backbone-{name} }}",
            "",
            doc.summary + ("\n\n" + doc.body if doc.body else ""),
            "",
            arguments_table(BACKBONES.arguments(name), doc.params, ("input_shape",)),
        ]
    return "\n".join(out) + "\n", problems


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line.strip() else "" for line in text.splitlines())


# --------------------------------------------------------------------------- strategies
def strategies_page() -> tuple[str, list[str]]:
    from mtlkit.training.strategies import STRATEGIES

    out = [
        "# Strategies reference",
        "",
        "Every registered update strategy, generated at build time. From the command line: "
        "`--strategy name strategy_args.argument=value`; in Python, the classes "
        "`mtlkit.Joint` and `mtlkit.Alternating`. What they do and why: "
        "[Update strategies](../concepts/strategies.md).",
    ]
    problems: list[str] = []
    for name in STRATEGIES.available():
        factory = STRATEGIES.factory(name)
        doc = parse_doc(own_doc(factory, f"strategy {name!r}"), factory.__module__)
        lines = ["", f"## `{name}` {{ #{name} }}", "", f"**{doc.summary}**", ""]
        if doc.body:
            lines += [doc.body, ""]
        params = dict(doc.params)
        if not isinstance(factory, type):  # a builder function: add what it builds
            built = typing.get_type_hints(factory).get("return")
            if isinstance(built, type) and built.__doc__:
                built_doc = parse_doc(own_doc(built, built.__name__), built.__module__)
                params = {**built_doc.params, **params}
                lines += [
                    f"It builds `{built.__module__}.{built.__name__}`: {built_doc.summary}",
                    "",
                    built_doc.body,
                    "",
                ]
        lines += [
            "**Arguments** (`strategy_args`; `method` is the run's method)",
            "",
            arguments_table(STRATEGIES.arguments(name), params),
        ]
        out += lines
        problems += [
            f"strategy {name}: argument {a!r} not in the docstring"
            for a in undocumented(STRATEGIES, name, params)
        ]
    return "\n".join(out) + "\n", problems


# --------------------------------------------------------------------------- datasets
def datasets_page() -> tuple[str, list[str]]:
    from mtlkit.data.benchmarks import DATASETS

    out = [
        "# Data sets reference",
        "",
        f"Every registered data set ({len(DATASETS.available())}), generated at build time. "
        "`mtlkit.data.benchmarks.DATASETS.get(name, **arguments)` returns a `Problem` (splits, "
        "tasks, input shape, outputs per task); from the command line: `--data name "
        "data_args.argument=value` (`--data-root PATH` for `data_args.root`). Nothing is "
        "downloaded: the real data sets are read from a folder laid out as shown. More: "
        "[Tasks and data sets](../concepts/tasks-data.md).",
        "",
        "| name | on disk | summary |",
        "|---|---|---|",
    ]
    problems: list[str] = []
    entries = []
    for name in DATASETS.available():
        factory = DATASETS.factory(name)
        doc = parse_doc(own_doc(factory, f"dataset {name!r}"), factory.__module__)
        arguments = DATASETS.arguments(name)
        reads_root = any(a.name == "root" for a in arguments)
        if name not in DATASET_DOCS:
            if reads_root:
                raise ReferenceError(
                    f"dataset {name!r} reads a root folder: add its module and layout to "
                    "DATASET_DOCS in docs/hooks/reference.py"
                )
            module_name, layout_name, loader_name = factory.__module__, None, None
        else:
            module_name, layout_name, loader_name = DATASET_DOCS[name]
        module = importlib.import_module(module_name)
        layout = getattr(module, layout_name) if layout_name else None
        if loader_name:  # the loader documents the arguments the factory passes on
            loader = getattr(module, loader_name)
            loader_doc = parse_doc(own_doc(loader, f"{module_name}.{loader_name}"), module_name)
            doc.params = {**loader_doc.params, **doc.params}
        if reads_root and not layout:
            raise ReferenceError(f"dataset {name!r} reads a root folder but has no layout")
        where = "`root` folder" if reads_root else "generated / embedded"
        out.append(f"| [`{name}`](#{name}) | {where} | {_cell(doc.summary)} |")
        lines = [f"## `{name}` {{ #{name} }}", "", f"**{doc.summary}**", ""]
        if doc.body:
            lines += [doc.body, ""]
        if layout:
            lines += ["**Layout on disk**", "", "```text", layout.strip("\n"), "```", ""]
        lines += ["**Arguments** (`data_args`)", "", arguments_table(arguments, doc.params)]
        if module.__doc__:
            about = rst_to_markdown(inspect.cleandoc(module.__doc__), _resolver(module_name))
            lines += ["", f'??? info "Module `{module_name}`"', "", _indent(about)]
        entries.append("\n".join(lines))
    out += ["", "\n\n".join(entries)]
    return "\n".join(out) + "\n", problems


# --------------------------------------------------------------------------- CLI
@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser``, by name, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_page() -> tuple[str, list[str]]:
    from mtlkit.app.cli import build_parser
    from mtlkit.app.config import TrainConfig

    with _columns(100):
        parser = build_parser()
        commands = subcommands(parser)
        out = [
            "# Command-line reference",
            "",
            "The `--help` of every `mtlkit` command, rendered from `mtlkit.app.cli.build_parser()` at "
            "build time, and every config key. How the pieces fit: "
            "[Command line and configs](../concepts/cli.md).",
            "",
            "| command | what it does |",
            "|---|---|",
        ]
        helps = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in action._choices_actions}
        for name in commands:
            out.append(f"| [`mtlkit {name}`](#mtlkit-{name}) | {_cell(helps.get(name) or '')} |")
        out += ["", "## `mtlkit`", "", "```text", parser.format_help().rstrip(), "```"]
        for name, sub in commands.items():
            out += [
                "",
                f"## `mtlkit {name}` {{ #mtlkit-{name} }}",
                "",
                "```text",
                sub.format_help().rstrip(),
                "```",
            ]
    hints = typing.get_type_hints(TrainConfig)
    out += [
        "",
        "## Config keys { #config-keys }",
        "",
        "The fields of `mtlkit.app.config.TrainConfig`: a YAML config file (`--config`) sets them by "
        "name, `key=value` on the command line overrides them (`method_args.c=0.4` sets one "
        "entry of a `*_args` mapping), `mtlkit train --print-config` shows the resolved config.",
        "",
        "| key | type | default |",
        "|---|---|---|",
    ]
    for field in dataclasses.fields(TrainConfig):
        if field.default is not dataclasses.MISSING:
            default = f"`{field.default!r}`"
        elif field.default_factory is not dataclasses.MISSING:
            default = f"`{field.default_factory()!r}`"
        else:
            default = "*required*"
        type_name = str(hints[field.name]).replace("typing.", "")
        type_name = getattr(hints[field.name], "__name__", type_name)
        out.append(f"| `{field.name}` | `{type_name}` | {default} |")
    return "\n".join(out) + "\n", []


# --------------------------------------------------------------------------- build
GENERATORS = {
    "reference/methods.md": methods_page,
    "reference/architectures.md": architectures_page,
    "reference/strategies.md": strategies_page,
    "reference/datasets.md": datasets_page,
    "reference/cli.md": cli_page,
}


def generate() -> tuple[dict[str, str], list[str]]:
    """``{path relative to docs/: Markdown}`` and the arguments that lack a description."""
    pages: dict[str, str] = {}
    problems: list[str] = []
    for path, make in GENERATORS.items():
        pages[path], found = make()
        problems += found
    return pages, problems


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated pages."""
    from mkdocs.structure.files import File

    pages, _ = generate()
    for path, content in pages.items():
        if files.get_file_from_path(path) is not None:
            raise ReferenceError(
                f"docs/{path} is generated at build time: delete the committed copy"
            )
        files.append(File.generated(config, path, content=content))
    return files


LAYOUTS_MARKER = "<!-- mtlkit:dataset-layouts -->"


def dataset_layouts() -> str:
    """The layout on disk of every registered data set that reads a root folder."""
    from mtlkit.data.benchmarks import DATASETS

    parts = []
    for name in DATASETS.available():
        module_name, layout_name, _ = DATASET_DOCS.get(name, ("", None, ""))
        if layout_name is None:
            continue
        layout = getattr(importlib.import_module(module_name), layout_name)
        parts.append(f"`{name}`\n\n```text\n{layout.strip(chr(10))}\n```")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: fill the markers of the hand-written pages."""
    if LAYOUTS_MARKER in markdown:
        markdown = markdown.replace(LAYOUTS_MARKER, dataset_layouts())
    return markdown


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python docs/hooks/reference.py OUT_DIR", file=sys.stderr)
        return 2
    pages, problems = generate()
    for path, content in pages.items():
        target = Path(argv[0]) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        print(f"wrote {target}")
    for problem in problems:
        print(f"undocumented: {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
