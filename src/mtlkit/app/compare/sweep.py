"""Preference sweeps of ``mtlkit compare``: one method entry, one run per preference vector.

A method entry of a compare config may carry ``preferences``: a list of preference vectors
(one positive number per task each), or ``{count: k}`` for ``k`` vectors spread evenly inside
the simplex (:func:`mtlkit.methods.preference.simplex_grid`: ``k`` of 1, 2, 3, ... for two
tasks; 1, 3, 6, 10, ... for three). The entry then stands for one run per vector, each with the
vector as the method's ``preference`` argument (``weights`` for ``ls``, the fixed-weight linear
scalarisation), labelled ``<label>_p<p_1>_<p_2>...``; together they form the *front*
``<label>``, whose hypervolume the report computes (:mod:`mtlkit.app.compare.front`). Any
entry may also name the front it belongs to with ``front: <name>`` (hand-made weights, say),
and an entry without either is a front of its own single point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mtlkit.errors import ConfigError
from mtlkit.methods import METHODS
from mtlkit.methods.preference import simplex_grid

SWEEP_ARGUMENT = {"ls": "weights"}
"""The argument a sweep sets, for the methods that call it otherwise than ``preference``."""


def sweep_argument(name: str) -> str:
    """The constructor argument of method ``name`` that a sweep sets.

    Raises:
        ConfigError: if the method takes no preference (naming those that do).
    """
    argument = SWEEP_ARGUMENT.get(name, "preference")
    if not any(a.name == argument for a in METHODS.arguments(name)):
        takers = [
            n
            for n in METHODS.available()
            if any(a.name == SWEEP_ARGUMENT.get(n, "preference") for a in METHODS.arguments(n))
        ]
        raise ConfigError(
            f"methods: {name!r} takes no preference vector, so it cannot be swept; methods that "
            f"do: {', '.join(takers)}"
        )
    return argument


def check_sweep(name: str, args: Mapping[str, Any], spec: Any) -> tuple[Any, ...] | int:
    """The validated ``preferences`` of entry ``name``: a tuple of vectors, or a count.

    Raises:
        ConfigError: naming the bad value and the valid forms.
    """
    argument = sweep_argument(name)
    if argument in args:
        raise ConfigError(
            f"methods: {name!r} gives both args.{argument} and preferences; give the sweep's "
            "vectors in preferences only"
        )
    if isinstance(spec, Mapping):
        if set(spec) != {"count"}:
            raise ConfigError(
                f"methods: preferences of {name!r} must be a list of vectors or {{count: k}}, "
                f"got {dict(spec)}"
            )
        count = spec["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"methods: preferences count of {name!r} must be >= 1, got {count!r}")
        return count
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
        raise ConfigError(
            f"methods: preferences of {name!r} must be a non-empty list of vectors (e.g. "
            f"[[0.2, 0.8], [0.8, 0.2]]) or {{count: k}}, got {spec!r}"
        )
    vectors = []
    for vector in spec:
        ok = isinstance(vector, Sequence) and not isinstance(vector, (str, bytes)) and vector
        numbers = ok and all(type(v) in (int, float) for v in vector)  # not bool, not "1"
        values = [float(v) for v in vector] if numbers else []
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise ConfigError(
                f"methods: preference {vector!r} of {name!r} must be a list of numbers > 0, "
                "one per task"
            )
        vectors.append(tuple(values))
    if len(set(vectors)) != len(vectors):
        raise ConfigError(f"methods: preferences of {name!r} list a vector twice: {spec!r}")
    return tuple(vectors)


def expand_sweeps(entries: Sequence[Any], num_tasks: Any) -> list[Any]:
    """``entries`` with each swept one replaced by one entry per preference vector (its
    ``front`` set to the entry's label); ``num_tasks()`` is called only for a ``count``.

    Raises:
        ConfigError: if a vector has the wrong length or two labels coincide.
    """
    out = []
    for entry in entries:
        if entry.sweep is None:
            out.append(entry)
            continue
        if isinstance(entry.sweep, int):
            try:
                vectors = [tuple(v) for v in simplex_grid(num_tasks(), entry.sweep)]
            except ValueError as error:
                raise ConfigError(f"methods: preferences of {entry.label!r}: {error}") from error
        else:
            vectors = list(entry.sweep)
        m = num_tasks()
        wrong = [list(v) for v in vectors if len(v) != m]
        if wrong:
            raise ConfigError(
                f"methods: preferences of {entry.label!r} need one number per task ({m}); got "
                f"{wrong}"
            )
        argument = sweep_argument(entry.name)
        for vector in vectors:
            label = f"{entry.label}_p" + "_".join(_label_number(v) for v in vector)
            args = {**entry.args, argument: [float(v) for v in vector]}
            METHODS.get(entry.name, **args)
            out.append(dataclasses.replace(entry, args=args, label=label, sweep=None,
                                           front=entry.front or entry.label))  # fmt: skip
    repeated = repeated_labels([e.label for e in out])
    if repeated:
        raise ConfigError(
            f"methods: label(s) {repeated} used twice after expanding the preference sweeps; "
            "give the entries other labels"
        )
    return out


def repeated_labels(labels: Sequence[str]) -> str:
    """The labels that occur more than once, quoted and comma-separated (``""``: none)."""
    return ", ".join(repr(label) for label in sorted({x for x in labels if labels.count(x) > 1}))


def _label_number(value: float) -> str:
    """``0.25`` -> ``"0.25"``, without an exponent (labels hold letters, digits, ``_``, ``.``)."""
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
