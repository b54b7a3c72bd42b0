"""The typed experiment config behind ``mtlkit train``.

Every key can be set as ``key=value`` on the command line (values are parsed as YAML scalars or
flow lists/maps, then checked against the field's type), from a YAML file (``--config``), or in
Python. Dict-valued keys take dotted overrides: ``method_args.reduction=mean``. An unknown key or a
value of the wrong type is one :class:`~mtlkit.errors.ConfigError` naming the key and what would
be valid.

Besides the model, method and budget, a config may pick a subset of the problem's ``tasks``
(checked against the data set when the run starts), set the step scheduler with
``scheduler_args`` (``step_size``, ``gamma``), and name a single-task ``baseline`` (an
``stl_baseline.json`` written by ``mtlkit train --stl``) to report the run's Δm% against.
``references`` names published tables (YAML files, see :mod:`mtlkit.app.compare.references`)
that ``mtlkit compare`` prints beside its results; relative paths are relative to the config
file; ``mtlkit train`` does not read them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlkit.errors import ConfigError
from mtlkit.training.affinity import AffinityOptions
from mtlkit.training.trackers import check_loggers

BUDGET_KEYS = ("epochs", "steps", "passes", "seconds", "forward_backward")
"""The budget keys (see :class:`mtlkit.Budget`): training stops at the first limit reached."""


@dataclass
class TrainConfig:
    """One training run. Defaults: HPS (MLP encoder) on MultiDigits with EW, 10 epochs."""

    data: str = "multidigits"
    data_args: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    arch: str = "hps"
    arch_args: dict[str, Any] = field(default_factory=dict)
    method: str = "ew"
    method_args: dict[str, Any] = field(default_factory=dict)
    strategy: str = "joint"
    strategy_args: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "none"
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    epochs: int | None = 10
    steps: int | None = None
    passes: int | None = None
    seconds: float | None = None
    forward_backward: int | None = None
    seed: int = 0
    device: str = "cpu"
    rep_grad: bool = False
    route: str = "auto"
    select: str = "loss"
    baseline: str | None = None
    references: list[str] | None = None  # published tables for mtlkit compare
    out: str | None = None
    progress: bool = True
    plots: bool | None = None  # null: drawn where matplotlib is; true: needs it (checked first)
    track_exploration: bool = True
    checkpoint_every: int | None = None
    workers: int = 0
    tensorboard: bool = False
    loggers: list[str] | str = field(default_factory=list)  # tensorboard, wandb, mlflow
    logger_args: dict[str, Any] = field(default_factory=dict)  # mtlkit.training.trackers
    amp: str = "none"  # none | bf16 | fp16 (CUDA): autocast + loss scaler (mtlkit.engine.precision)
    accumulate: int = 1  # micro-batches per optimizer step
    on_nonfinite: str = "raise"  # raise | skip_step | skip_task (mtlkit.training.nonfinite)
    affinity_every: int | None = None  # task affinities every k batches (mtlkit.training.affinity)
    affinity_kinds: list[str] = field(default_factory=lambda: ["tag", "cosine"])
    affinity_lookahead: str = "sgd"  # sgd (TAG's) | optimizer (the training optimizer's step)
    affinity_lr: float | None = None  # the SGD look-ahead's lr (None: the optimizer's)
    affinity_plot: bool | None = None  # affinity.png: None = when matplotlib is installed

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            setattr(self, name, _check_type(name, value, _hints()[name]))
        positive = {"lr": self.lr, "batch_size": self.batch_size}
        positive.update({k: getattr(self, k) for k in BUDGET_KEYS})
        for key, value in positive.items():
            if value is not None and not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(
                f"checkpoint_every must be >= 1 (batches), got {self.checkpoint_every}"
            )
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        for key in ("lr", "weight_decay", "seconds"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        for key in ("lr", "weight_decay"):  # optimizers apply them in the parameters' float32
            value = getattr(self, key)
            if value > _FLOAT32_MAX:
                raise ConfigError(f"{key} must be at most {_FLOAT32_MAX:.3g}, got {value}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        if self.on_nonfinite not in ("raise", "skip_step", "skip_task"):
            raise ConfigError(
                "on_nonfinite must be one of raise, skip_step, skip_task; "
                f"got {self.on_nonfinite!r}"
            )
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be one of none, bf16, fp16; got {self.amp!r}")
        if self.accumulate < 1:
            raise ConfigError(f"accumulate must be >= 1 (micro-batches), got {self.accumulate}")
        if self.route not in ("auto", "loop", "batched", "gramian"):
            raise ConfigError(
                f"route must be one of auto, loop, batched, gramian; got {self.route!r}"
            )
        if all(getattr(self, k) is None for k in BUDGET_KEYS):
            raise ConfigError(f"set at least one budget: {', '.join(BUDGET_KEYS)}")
        if self.tasks is not None:
            if not self.tasks:
                raise ConfigError("tasks must name at least one task (or be null for all)")
            repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            if repeated:
                raise ConfigError(f"tasks lists {', '.join(map(repr, repeated))} more than once")
        if self.references is not None and (
            not self.references or any(not r.strip() for r in self.references)
        ):
            raise ConfigError(
                "references must be a non-empty list of file paths (or null), got "
                f"{self.references}"
            )
        _check_scheduler_args(self.scheduler, self.scheduler_args)
        if isinstance(self.loggers, str):  # "wandb,mlflow", as --logger takes them
            self.loggers = [n.strip() for n in self.loggers.split(",") if n.strip()]
        check_loggers(self.loggers, self.logger_args)
        affinity_options(self)  # the affinity_* keys, checked
        for name, value in dataclasses.asdict(self).items():  # after the keys' own checks
            low, high = INT_RANGES.get(name, (None, INT64_MAX))
            if isinstance(value, int) and not isinstance(value, bool) and value > high:
                shown = "2**63 - 1" if high == INT64_MAX else f"{high}"
                valid = f"an integer in [{low}, {shown}]" if low is not None else f"at most {shown}"
                raise ConfigError(f"{name} must be {valid}, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_FLOAT32_MAX = 3.4028234663852886e38

INT64_MAX = 2**63 - 1
"""The largest value of an integer key (counts and budgets are stored as int64)."""
INT_RANGES: dict[str, tuple[int, int]] = {
    "batch_size": (1, 2**31 - 1),  # a batch is indexed with int32 (and one batch of the whole
    # training split is what any larger value gives)
    "workers": (0, 1024),  # DataLoader worker processes, each a copy of the main one
}
"""Integer keys with a tighter range than ``[.., INT64_MAX]``: ``{key: (low, high)}``."""

SCHEDULER_ARGS = {"step": {"step_size": int, "gamma": float}}
"""The ``scheduler_args`` each scheduler takes (``scheduler=step``: ``StepLR(step_size, gamma)``,
stepped once per epoch)."""


def affinity_options(config: TrainConfig) -> AffinityOptions | None:
    """The Trainer's affinity logging of ``config`` (``None`` without ``affinity_every``)."""
    keys = ("affinity_lookahead", "affinity_lr", "affinity_plot")
    default = TrainConfig.__dataclass_fields__
    if config.affinity_every is None:
        changed = [k for k in keys if getattr(config, k) != default[k].default]
        if changed or config.affinity_kinds != ["tag", "cosine"]:
            raise ConfigError(
                f"{', '.join(changed or ['affinity_kinds'])} need affinity_every (batches "
                "between two affinity measurements)"
            )
        return None
    return AffinityOptions(
        config.affinity_every,
        tuple(config.affinity_kinds),
        config.affinity_lookahead,
        config.affinity_lr,
        config.affinity_plot,
    )


def _check_scheduler_args(scheduler: str, args: Mapping[str, Any]) -> None:
    if not args:
        return
    valid = SCHEDULER_ARGS.get(scheduler, {})
    if not valid:
        raise ConfigError(
            f"scheduler_args {dict(args)} given, but scheduler {scheduler!r} takes none; "
            f"set scheduler=step to use step_size and gamma"
        )
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ConfigError(
            f"scheduler {scheduler!r} has no argument(s) {', '.join(unknown)}; "
            f"valid scheduler_args: {', '.join(valid)}"
        )
    for key, tp in valid.items():
        if key in args:
            value = _check_type(f"scheduler_args.{key}", args[key], tp)
            if not value > 0:
                raise ConfigError(f"scheduler_args.{key} must be > 0, got {value!r}")


@functools.cache
def _hints() -> dict[str, Any]:  # cached: resolving the hints is slow, and each field asks
    return typing.get_type_hints(TrainConfig)


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float allowed), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError:
                continue
        names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        names = [k for k in value if not isinstance(k, str)]
        if names:
            raise ConfigError(f"config key {key!r} must map names to values; got key(s) {names}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_check_type(key, v, item) for v in value]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1023:
            raise ConfigError(f"config key {key!r} is too large for a float: {value}")
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")
    return value


MAX_YAML_DEPTH = 64
"""The deepest nesting of lists and mappings a config may have (real configs have 3 or 4)."""
MAX_YAML_NODES = 100_000
"""The most values a config may hold with its aliases expanded (a config has a few hundred); a
"billion laughs" document of nested aliases is refused here instead of expanding forever."""
MAX_CONFIG_BYTES = 2**20
"""The largest config file read (1 MiB)."""


class YAMLLimitError(yaml.YAMLError):
    """A YAML document is nested too deeply, expands to too many values through its aliases,
    or holds a recursive alias."""


class SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no Python objects are ever built), which also
    reads an exponent without a dot (``1e-3``, ``5E4``) as a float, as YAML 1.2 does (YAML 1.1
    reads it as a string, so ``lr=1e-3`` was refused).

    It bounds the document while composing it, before anything is built: nesting at most
    :data:`MAX_YAML_DEPTH` deep (PyYAML recurses per level, so a 3000-deep list was a
    ``RecursionError``), at most :data:`MAX_YAML_NODES` values once aliases are expanded (an
    alias is the anchored node again, so nested aliases grow exponentially), and no alias of a
    node inside itself (a recursive list). Each limit is a :class:`YAMLLimitError`.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, height)

    def compose_document(self) -> Any:
        self._sizes = {}
        try:
            return super().compose_document()
        finally:
            self._sizes = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(
                    f"nesting deeper than {MAX_YAML_DEPTH} levels (the limit; {where})"
                )
            if self.check_event(yaml.AliasEvent):
                anchored = self.anchors.get(self.peek_event().anchor)
                if anchored is not None and id(anchored) not in self._sizes:  # still composing
                    raise YAMLLimitError(f"an alias of a node inside itself ({where})")
            node = super().compose_node(parent, index)
            size, height = self._measure(node)
            if size > MAX_YAML_NODES:
                raise YAMLLimitError(
                    f"more than {MAX_YAML_NODES} values with the aliases expanded (the limit; "
                    f"{where})"
                )
            if self._depth - 1 + height > MAX_YAML_DEPTH:
                raise YAMLLimitError(
                    f"nesting deeper than {MAX_YAML_DEPTH} levels with the aliases expanded "
                    f"(the limit; {where})"
                )
            return node
        finally:
            self._depth -= 1

    def _measure(self, node: Any) -> tuple[int, int]:
        """``(values, height)`` of ``node`` with its aliases expanded (its children are
        measured already: they were composed first)."""
        known = self._sizes.get(id(node))
        if known is not None:  # an alias: the anchored node, measured when it was composed
            return known
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        size, height = 1, 1
        for child in children:
            child_size, child_height = self._sizes[id(child)]
            size += child_size
            height = max(height, 1 + child_height)
        self._sizes[id(node)] = (size, height)
        return size, height


SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load(text: str) -> Any:
    """``text`` parsed as YAML with :class:`SafeLoader`."""
    return yaml.load(text, Loader=SafeLoader)  # a SafeLoader subclass: plain data only


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalar or flow collection (``0.3``, ``true``, ``[1, 2]``)."""
    try:
        return safe_load(text) if text != "" else ""
    except YAMLLimitError as error:
        shown = text if len(text) <= 60 else f"{text[:60]}..."
        raise ConfigError(f"value {shown!r} is refused: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse value {text!r}: {error}") from error


def apply_overrides(base: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (dotted keys go into dict-valued keys) to a config dict."""
    result = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    valid = config_keys()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        top, _, sub = key.partition(".")
        if top not in valid:
            raise ConfigError(f"unknown config key {top!r}; valid keys: {', '.join(valid)}")
        value = parse_value(text)
        if sub:
            if top not in result and typing.get_origin(_hints()[top]) is dict:
                result[top] = {}
            if not isinstance(result.get(top), Mapping):
                raise ConfigError(f"config key {top!r} is not a mapping; cannot set {key!r}")
            result[top][sub] = value
        else:
            result[top] = value
    return result


def logger_override(names: Sequence[str]) -> list[str]:
    """The ``loggers=[...]`` override of the ``--logger`` flags (none when not given)."""
    flat = [n.strip() for item in names for n in item.split(",") if n.strip()]
    return [f"loggers=[{', '.join(flat)}]"] if flat else []


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The mapping of a YAML config file (``{}`` for ``None``), keys with ``-`` read as ``_``;
    not validated (:func:`load_config` does that)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {str(path)!r} is {size} bytes, more than the limit of "
                f"{MAX_CONFIG_BYTES} (1 MiB)"
            )
        loaded = safe_load(path.read_text(encoding="utf-8"))
    except YAMLLimitError as error:
        raise ConfigError(f"config file {str(path)!r} is refused: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error}") from error
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config from a YAML file (optional) and ``key=value`` overrides, validated."""
    data = read_config_file(path)
    unknown = sorted(set(data) - set(config_keys()))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(config_keys())}"
        )
    data = apply_overrides(data, overrides)
    return TrainConfig(**data)
