"""The run folders of a compare grid: whether a run is finished, and whether a folder holds
the results of the same config (so that a grid is resumed, never mixed with another)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mtlkit.app.config import TrainConfig
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.tasks import Task

# Keys that do not change what a run computes: a finished run is reused whatever their values.
PRESENTATION_KEYS = {
    "progress",
    "plots",
    "tensorboard",
    "loggers",
    "logger_args",
    "workers",
    "checkpoint_every",
    "out",
    "baseline",
    "references",
}


def is_finished(run_dir: Path, tasks: Sequence[Task]) -> bool:
    """Whether ``run_dir/summary.json`` holds the test value of every metric of every task
    (the Trainer writes it atomically after the test evaluation)."""
    summary = read_json(run_dir / "summary.json")
    test = (summary or {}).get("results", {}).get("test")
    if not isinstance(test, Mapping) or "cost" not in (summary or {}):
        return False
    return all(
        isinstance(test.get(t.name), Mapping) and all(m in test[t.name] for m in t.metrics)
        for t in tasks
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_same_config(folder: Path, expected: TrainConfig, what: str) -> None:
    """Raise a ConfigError if ``folder`` holds the results of another config than
    ``expected`` (keys that do not change results aside)."""
    saved = folder / "config.yaml"
    if not saved.is_file():
        return
    try:
        loaded = yaml.safe_load(saved.read_text(encoding="utf-8"))
        old = TrainConfig(**loaded).to_dict()
    except (yaml.YAMLError, TypeError, MtlkitError) as error:
        raise ConfigError(
            f"{what} {str(folder)!r} holds a config.yaml this version cannot read ({error}); "
            "move it away or choose another out"
        ) from error
    new = expected.to_dict()
    changed = [k for k in new if k not in PRESENTATION_KEYS and old.get(k) != new[k]]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(
            f"{what} {str(folder)!r} was trained with another config ({diff}); give another "
            "out, or remove that folder to retrain it"
        )
