"""The settings of ``mtlkit compare --search`` (the compare config's ``search`` key), checked
apart from :mod:`mtlkit.app.compare.search` so that the grid can check them at load."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mtlkit.errors import ConfigError

SEARCH_KINDS = ("halving", "grid", "ls")
SEARCH_KEYS = (
    "epochs",
    "eta",
    "full_epochs",
    "trials",
    "mode",
    "resolution",
    "trial_epochs",
    "search_seed",
    "sweep",
)


@dataclass(frozen=True)
class SearchSpec:
    """The ``search`` mapping of a compare config (see :mod:`mtlkit.app.compare.search`)."""

    epochs: int | None = None
    eta: int = 2
    full_epochs: int | None = None
    trials: int = 8
    mode: str = "random"
    resolution: int = 4
    trial_epochs: int = 1
    search_seed: int = 0
    sweep: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("epochs", "eta", "full_epochs", "trials", "resolution", "trial_epochs"):
            value = getattr(self, key)
            low = 2 if key == "eta" else 1
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < low
            ):
                raise ConfigError(f"search.{key} must be an integer >= {low}, got {value!r}")
        if self.mode not in ("random", "grid"):
            raise ConfigError(f"search.mode must be random or grid; got {self.mode!r}")
        if not isinstance(self.sweep, Mapping):
            raise ConfigError("search.sweep must map method names to {arg: [values]}")

    @classmethod
    def parse(cls, value: Any) -> SearchSpec:
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"search must be a mapping of {', '.join(SEARCH_KEYS)}; got {value!r}"
            )
        unknown = sorted(set(map(str, value)) - set(SEARCH_KEYS))
        if unknown:
            raise ConfigError(
                f"search has unknown key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(SEARCH_KEYS)}"
            )
        return cls(**{str(k): v for k, v in value.items()})

    def need(self, key: str, kind: str) -> int:
        value = getattr(self, key)
        if value is None:
            raise ConfigError(f"--search {kind} needs search.{key} (epochs)")
        return value
