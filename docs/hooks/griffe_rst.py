"""mtlkit's docstrings use two pieces of reStructuredText inside Google style: cross-reference
roles (``:class:`~mtlkit.x.Y```) and ``::`` before an indented literal block. This module turns
both into Markdown for mkdocstrings (as a griffe extension) and for the generated reference pages
(:func:`rst_to_markdown`):

* a role becomes an *optional* autorefs link (a link where the target is documented, plain code
  otherwise, never a warning), titled with the last name part for ``~`` targets;
* ``text::`` becomes ``text:`` (the indented block after it is already a Markdown code block);
* an ``Args:`` entry that documents several arguments at once (``beta, beta_sigma: ...``) becomes
  one entry per argument with the same description (griffe's Google parser takes one name per
  entry).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`<]+?)`")
LITERAL = re.compile(r"(?<=\S)::$", flags=re.M)
ALONE_LITERAL = re.compile(r"^\s*::\s*$", flags=re.M)
ARGS_HEADER = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Params|Other Parameters):\s*$")
SHARED_ENTRY = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+)(\s*(?:\([^)]*\))?:\s.*)$")


def rst_to_markdown(text: str, resolve: Callable[[str], str] | None = None) -> str:
    """Rewrite the roles and ``::`` of ``text``; ``resolve`` maps a role target (as written, maybe
    relative) to the full dotted path used as the autorefs identifier."""

    def role(match: re.Match[str]) -> str:
        tilde, target = match.group(1), match.group(2).strip()
        title = target.rsplit(".", 1)[-1] if tilde else target
        identifier = resolve(target) if resolve is not None else target
        code = f"<code>{html.escape(title)}</code>"
        return f'<autoref identifier="{html.escape(identifier)}" optional>{code}</autoref>'

    text = ROLE.sub(role, text)
    text = ALONE_LITERAL.sub("", text)
    return split_shared_entries(LITERAL.sub(":", text))


def split_shared_entries(text: str) -> str:
    """``a, b: description`` in an ``Args:`` section -> ``a: description``, ``b: description``."""
    lines = text.splitlines()
    out: list[str] = []
    header_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        indent = len(line) - len(line.lstrip())
        if header := ARGS_HEADER.match(line):
            header_indent = len(header.group(1))
        elif header_indent is not None and line.strip() and indent <= header_indent:
            header_indent = None
        entry = SHARED_ENTRY.match(line) if header_indent is not None else None
        if entry is None:
            out.append(line)
            continue
        names = [n.strip() for n in entry.group(2).split(",")]
        continuation = []
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) > indent:
            continuation.append(lines[i])
            i += 1
        for name in names:  # each name gets the whole description
            out += [f"{entry.group(1)}{name}{entry.group(3)}", *continuation]
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _griffe_resolver(obj: griffe.Object) -> Callable[[str], str]:
    def resolve(target: str) -> str:
        scope: Any = obj if obj.is_module or obj.is_class else obj.parent
        try:
            path = scope.resolve(target.split(".")[0])
        except (griffe.NameResolutionError, AttributeError, ValueError):
            return target
        rest = target.split(".")[1:]
        full = ".".join([path, *rest])
        try:
            return scope.modules_collection.get_member(full).canonical_path
        except Exception:  # the target may live outside the loaded packages
            return full

    return resolve


class RstRoles(griffe.Extension):
    """Griffe extension: rewrite every docstring with :func:`rst_to_markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, _griffe_resolver(obj))
