"""Name registries for methods, architectures, strategies and datasets.

Names are snake_case; lookups also accept hyphens (``nash-mtl`` finds ``nash_mtl``). Building an
entry checks its keyword arguments against the constructor's signature so that a typo is one clear
error naming the valid arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mtlkit.errors import ConfigError, UnknownNameError

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """``"Nash-MTL"`` -> ``"nash_mtl"``."""
    return name.strip().lower().replace("-", "_")


@dataclass(frozen=True)
class Argument:
    """One constructor argument of a registered entry, for ``mtlkit list``."""

    name: str
    annotation: str
    default: Any  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def __str__(self) -> str:
        text = f"{self.name}: {self.annotation}" if self.annotation else self.name
        return text if self.required else f"{text} = {self.default!r}"


class Registry(Generic[T]):
    """A mapping from snake_case names to factories (usually classes) of one kind of thing."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register a factory under ``name`` (must be snake_case and new)."""
        if name != normalize_name(name):
            raise ValueError(f"registered names are snake_case, got {name!r}")

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = factory
            return factory

        return decorate

    def available(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return normalize_name(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def factory(self, name: str) -> Callable[..., T]:
        key = normalize_name(name)
        if key not in self._entries:
            raise UnknownNameError(self.kind, name, self._entries)
        return self._entries[key]

    def arguments(self, name: str) -> list[Argument]:
        """The keyword arguments that ``get(name, ...)`` accepts."""
        signature = inspect.signature(self.factory(name))
        return [
            Argument(p.name, _annotation(p.annotation), p.default)
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]

    def get(self, name: str, **kwargs: Any) -> T:
        """Build the entry ``name`` with ``kwargs``, rejecting unknown or missing arguments."""
        factory = self.factory(name)
        valid = {a.name: a for a in self.arguments(name)}
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            listing = ", ".join(str(a) for a in valid.values()) or "none"
            raise ConfigError(
                f"{self.kind} {normalize_name(name)!r} has no argument(s) {', '.join(unknown)}; "
                f"valid arguments: {listing}"
            )
        missing = sorted(a for a, arg in valid.items() if arg.required and a not in kwargs)
        if missing:
            raise ConfigError(
                f"{self.kind} {normalize_name(name)!r} needs argument(s) {', '.join(missing)}"
            )
        try:
            return factory(**kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{self.kind} {normalize_name(name)!r}: {error}") from error


def _annotation(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return (
        annotation
        if isinstance(annotation, str)
        else getattr(annotation, "__name__", str(annotation))
    )
