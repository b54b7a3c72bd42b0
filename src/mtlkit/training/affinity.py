"""Inter-task affinities measured during ordinary training, every ``k`` batches.

Two affinities of task ``i`` onto task ``j``, both on the current training batch ``X^t`` and the
current weights, before the batch's training step:

* ``"tag"``: the look-ahead affinity of Fifty et al. (NeurIPS 2021, "Efficiently Identifying
  Task Groupings for Multi-Task Learning", Eq. 1-2): take one step of the shared parameters on
  task ``i``'s loss alone, ``θ_{s|i}^{t+1} = θ_s^t - η ∇_{θ_s} L_i(X^t, θ_s^t, θ_i^t)``, and
  measure how task ``j``'s loss on the same batch changed:
  ``Z_{i→j} = 1 - L_j(X^t, θ_{s|i}^{t+1}, θ_j^t) / L_j(X^t, θ_s^t, θ_j^t)``.
  Positive: a step on ``i`` lowers ``j``'s loss. The paper's look-ahead is this SGD step with
  the learning rate η (``lookahead="sgd"``: the training optimizer's current learning rate, or
  ``lr``); ``lookahead="optimizer"`` takes the training optimizer's own step (e.g. Adam with its
  moments) on ``∇_{θ_s} L_i`` instead. The task heads do not move in either.
* ``"cosine"``: the cosine of the task gradients w.r.t. the shared parameters, from their
  Gramian ``G = J Jᵀ``: ``G_ij / sqrt(G_ii G_jj)`` (0 where a gradient is zero). Cheap: one
  forward and ``m`` backward passes; the look-ahead adds ``m`` forward passes.

The measurement leaves no trace on training: the shared parameters, the buffers (batch-norm
statistics), the gradients, the optimizer state (restored from a deep copy of its
``state_dict``) and the random state (CPU and CUDA) are put back exactly, and its passes are
counted apart from the run's budget (``summary.json`` ``affinity``), so a run with affinity
logging ends with the same weights as one without.

Per epoch the tracker averages the matrices of the epoch's measurements (the paper averages
``Z`` over the steps of training; :meth:`AffinityTracker.mean` is the average over every
measurement so far) and writes ``affinity.csv`` (one row per epoch, kind and source task ``i``,
one column per target task ``j``) and, with ``plot=True``, the heat-map ``affinity.png`` of the
latest epoch (matplotlib: the ``plot`` extra).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.engine.jacobian import jacobian
from mtlkit.errors import ConfigError
from mtlkit.parallel.ddp import Parallel
from mtlkit.tasks import Task
from mtlkit.training.group_selection import AffinityGroups
from mtlkit.training.logs import atomic_file, write_atomic
from mtlkit.training.model_forward import ModelForward

AFFINITY_KINDS = ("tag", "cosine")
LOOKAHEADS = ("sgd", "optimizer")
AFFINITY_CSV = "affinity.csv"
AFFINITY_PNG = "affinity.png"


@dataclass(frozen=True)
class AffinityOptions:
    """What to measure and how often.

    Args:
        every: measure on every ``every``-th training batch (``>= 1``), the first included.
        kinds: among ``"tag"`` and ``"cosine"``.
        lookahead: ``"sgd"`` (the paper's) or ``"optimizer"`` (the training optimizer's step).
        lr: learning rate of the SGD look-ahead; ``None``: the training optimizer's current one.
        plot: write the heat-map ``affinity.png``: ``True`` needs matplotlib (the ``plot``
            extra; an error before training without it), ``None`` draws it when matplotlib is
            installed, ``False`` never.
    """

    every: int
    kinds: tuple[str, ...] = AFFINITY_KINDS
    lookahead: str = "sgd"
    lr: float | None = None
    plot: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(
                f"affinity_every must be an integer >= 1 (batches), got {self.every!r}"
            )
        kinds = tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        bad = [k for k in kinds if k not in AFFINITY_KINDS]
        if not kinds or bad or len(set(kinds)) != len(kinds):
            raise ConfigError(
                f"affinity kinds must be distinct values among {', '.join(AFFINITY_KINDS)}; "
                f"got {list(kinds)}"
            )
        if self.lookahead not in LOOKAHEADS:
            raise ConfigError(
                f"affinity lookahead must be one of {', '.join(LOOKAHEADS)}; got {self.lookahead!r}"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"affinity lr must be a finite number > 0, got {self.lr!r}")
        if self.plot:
            require_matplotlib()

    def draws(self) -> bool:
        """Whether ``affinity.png`` is drawn (``plot=None``: when matplotlib imports)."""
        if self.plot is None:
            try:
                require_matplotlib()
            except ConfigError:
                return False
            return True
        return self.plot


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` (Agg backend), or a ConfigError naming the ``plot`` extra."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            'the affinity heat-map needs matplotlib: pip install "mtlkit[plot]" '
            "(or turn the plot off: affinity_plot=false)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def strategy_optimizer(strategy: Any, task: str) -> torch.optim.Optimizer:
    """The optimizer that trains ``task``'s shared step in ``strategy``: ``Joint``'s one, an
    ``Alternating``'s shared one or the one of the group holding ``task`` (``per_group``)."""
    if getattr(strategy, "optimizer", None) is not None:
        return strategy.optimizer
    optimizers = getattr(strategy, "optimizers", None)
    if optimizers:
        if len(optimizers) == 1:
            return optimizers[0]
        for group, optimizer in zip(strategy.groups, optimizers):
            if task in group:
                return optimizer
    raise ConfigError(
        f"affinity lookahead needs the training optimizer, which {type(strategy).__name__} does "
        "not expose (optimizer or optimizers); use lookahead='sgd' with an explicit lr"
    )


class AffinityTracker:
    """Measures the affinities of :class:`AffinityOptions` on the Trainer's batches; see the
    module docstring. ``measure`` on a batch, ``end_epoch`` to close an epoch's average."""

    def __init__(
        self,
        options: AffinityOptions,
        model: nn.Module,
        tasks: Sequence[Task],
        parallel: Parallel,
        shared: Sequence[nn.Parameter],
    ) -> None:
        if parallel.reducer is not None and not parallel.reducer.passthrough:
            raise ConfigError(
                "affinity logging runs in one process without loss scaling (amp=fp16) or DDP"
            )
        self.options = options
        self.model = model
        self.tasks = [t.name for t in tasks]
        self.shared = [p for p in shared if p.requires_grad]
        self.forward = ModelForward(model, tasks, parallel, rep_grad=False, on_pass=self._pass)
        self.strategy: Any = None
        m = len(self.tasks)
        self._sums = {k: torch.zeros(m, m, dtype=torch.float64) for k in options.kinds}
        self._totals = {k: torch.zeros(m, m, dtype=torch.float64) for k in options.kinds}
        self.count = 0  # measurements in the current epoch
        self.total_count = 0
        self.history: list[tuple[int, dict[str, Tensor]]] = []  # (epoch, {kind: mean})
        self.cost = {"measurements": 0, "passes": 0, "backwards": 0, "seconds": 0.0}
        self.plot = options.draws()

    def attach(self, strategy: Any) -> None:
        """The run's strategy (its optimizer for the look-ahead, its groups' schedule), set up;
        an :class:`~mtlkit.training.group_selection.AffinityGroups` must select from a kind this
        tracker measures."""
        self.strategy = strategy
        spec = _affinity_groups(strategy)
        if spec is not None and spec.affinity not in self.options.kinds:
            raise ConfigError(
                f"AffinityGroups select from the {spec.affinity!r} affinity, which this run does "
                f"not measure (affinity kinds: {list(self.options.kinds)})"
            )

    def _pass(self) -> None:
        self.cost["passes"] += 1

    def due(self, batch_index: int) -> bool:
        """Whether the ``batch_index``-th training batch of the run (from 0) is measured."""
        return batch_index % self.options.every == 0

    # ---------------------------------------------------------------- measuring
    def measure(self, batch: Any) -> dict[str, Tensor]:
        """The affinity matrices ``[m, m]`` (row: source ``i``, column: target ``j``) on
        ``batch``, added to the epoch's sums; training state is left exactly as it was."""
        start = time.perf_counter()
        model = self.model
        params = list(model.parameters())
        grads = [p.grad for p in params]
        buffers = [b.detach().clone() for b in model.buffers()]
        saved = [p.detach().clone() for p in self.shared]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            for p in params:
                p.grad = None
            result = self.forward(batch)
            losses = result.loss_list(self.tasks)
            before = torch.stack([loss.detach() for loss in losses]).double()
            jac = jacobian(losses, self.shared, retain_graph=False)
            self.cost["backwards"] += len(losses)
            del result, losses
            out: dict[str, Tensor] = {}
            if "cosine" in self.options.kinds:
                out["cosine"] = cosine_matrix(jac.double() @ jac.double().T)
            if "tag" in self.options.kinds:
                out["tag"] = self._lookahead(batch, jac, before, saved)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.shared, saved)
                for b, value in zip(model.buffers(), buffers):
                    b.copy_(value)
            for p, g in zip(params, grads):
                p.grad = g
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        for kind, matrix in out.items():
            self._sums[kind] += matrix
            self._totals[kind] += matrix
        self.count += 1
        self.total_count += 1
        self.cost["measurements"] += 1
        self.cost["seconds"] += time.perf_counter() - start
        return out

    def _lookahead(self, batch: Any, jac: Tensor, before: Tensor, saved: list[Tensor]) -> Tensor:
        """``Z[i, j] = 1 - L_j(θ_{s|i}) / L_j(θ_s)`` (Fifty et al., Eq. 2), one look-ahead step
        per source task ``i``."""
        m = len(self.tasks)
        z = torch.zeros(m, m, dtype=torch.float64)
        shapes = [p.shape for p in self.shared]
        sizes = [p.numel() for p in self.shared]
        for i, task in enumerate(self.tasks):
            step = [g.view(s) for g, s in zip(jac[i].split(sizes), shapes)]
            optimizer, state = None, None
            if self.options.lookahead == "optimizer":
                optimizer = strategy_optimizer(self.strategy, task)
                state = copy.deepcopy(optimizer.state_dict())
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                for p, g in zip(self.shared, step):
                    p.grad = g.clone()
                optimizer.step()
                for p in self.shared:
                    p.grad = None
            else:
                with torch.no_grad():
                    torch._foreach_add_(self.shared, step, alpha=-self._lr(task))
            with torch.no_grad():
                after = self.forward(batch).floats()
            with torch.no_grad():
                torch._foreach_copy_(self.shared, saved)
            if optimizer is not None:
                optimizer.load_state_dict(state)
            values = torch.tensor([after[t] for t in self.tasks], dtype=torch.float64)
            z[i] = 1.0 - values / before
        return z

    def _lr(self, task: str) -> float:
        if self.options.lr is not None:
            return self.options.lr
        return float(strategy_optimizer(self.strategy, task).param_groups[0]["lr"])

    # ---------------------------------------------------------------- averages
    def end_epoch(self, epoch: int) -> dict[str, Tensor] | None:
        """Close ``epoch``: its mean matrices (``None`` when nothing was measured in it)."""
        if self.count == 0:
            return None
        means = {k: s / self.count for k, s in self._sums.items()}
        self.history.append((epoch, means))
        for s in self._sums.values():
            s.zero_()
        self.count = 0
        return means

    def mean(self, kind: str) -> Tensor | None:
        """The mean ``kind`` matrix over every measurement so far (``None`` before the first)."""
        if kind not in self._totals:
            raise ConfigError(
                f"affinity {kind!r} is not measured in this run; measured: {list(self._totals)}"
            )
        if self.total_count == 0:
            return None
        return self._totals[kind] / self.total_count

    def close_epoch(self, epoch: int, out_dir: Path | None) -> None:
        """End ``epoch``: its means, the mean so far handed to the groups' schedule of an
        :class:`~mtlkit.training.group_selection.AffinityGroups` strategy, the files."""
        self.end_epoch(epoch)
        spec = _affinity_groups(self.strategy)
        if spec is not None:
            mean = self.mean(spec.affinity)
            if mean is not None:
                self.strategy.schedule.observe(mean, epoch)
            else:
                self.strategy.schedule.epoch = epoch
        if out_dir is not None:
            self.write(out_dir)

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s ``affinity``: the options, the measurement cost (not counted in the
        run's budget) and the groups an AffinityGroups strategy selected."""
        out: dict[str, Any] = {
            "every": self.options.every,
            "kinds": list(self.options.kinds),
            "lookahead": self.options.lookahead,
            **self.cost,
        }
        if _affinity_groups(self.strategy) is not None:
            out["selections"] = self.strategy.schedule.selections
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": self._sums,
            "totals": self._totals,
            "count": self.count,
            "total_count": self.total_count,
            "history": self.history,
            "cost": dict(self.cost),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = {k: v.clone() for k, v in state["sums"].items()}
        self._totals = {k: v.clone() for k, v in state["totals"].items()}
        self.count, self.total_count = state["count"], state["total_count"]
        self.history = list(state["history"])
        self.cost = dict(state["cost"])

    # ---------------------------------------------------------------- files
    def write(self, out_dir: Path) -> None:
        """``affinity.csv`` (every epoch so far) and, with ``plot``, ``affinity.png``."""
        write_atomic(out_dir / AFFINITY_CSV, affinity_csv(self.history, self.tasks))
        if self.plot and self.history:
            plot_affinity(self.history[-1], self.tasks, out_dir / AFFINITY_PNG)


def tracker_for(options: AffinityOptions | None, trainer: Any) -> AffinityTracker | None:
    """The tracker of a :class:`~mtlkit.Trainer` with ``affinity=options`` (``None``: none)."""
    if options is None:
        return None
    shared = list(trainer.model.shared_parameters())
    return AffinityTracker(options, trainer.model, trainer.tasks, trainer.parallel, shared)


def _affinity_groups(strategy: Any) -> AffinityGroups | None:
    spec = getattr(getattr(strategy, "schedule", None), "spec", None)
    return spec if isinstance(spec, AffinityGroups) else None


def check_affinity_groups(strategy: Any, tracker: AffinityTracker | None) -> None:
    """An AffinityGroups strategy needs affinity logging; attach the strategy to the tracker."""
    if tracker is not None:
        tracker.attach(strategy)
    elif _affinity_groups(strategy) is not None:
        raise ConfigError(
            "AffinityGroups select groups from the run's affinities: turn affinity logging on "
            "(Trainer(affinity=AffinityOptions(every=k)); config key affinity_every)"
        )


def cosine_matrix(gramian: Tensor) -> Tensor:
    """``G_ij / sqrt(G_ii G_jj)``, 0 in the rows and columns of zero gradients."""
    norms = gramian.diagonal().clamp(min=0).sqrt()
    outer = norms[:, None] * norms[None, :]
    return torch.where(outer > 0, gramian / outer.clamp(min=1e-300), torch.zeros_like(gramian))


def affinity_csv(history: Sequence[tuple[int, dict[str, Tensor]]], tasks: Sequence[str]) -> str:
    """The text of ``affinity.csv``: ``epoch, kind, source, <target task>...``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", "kind", "source", *tasks])
    for epoch, matrices in history:
        for kind, matrix in matrices.items():
            for i, task in enumerate(tasks):
                writer.writerow([epoch, kind, task, *(f"{v:.6g}" for v in matrix[i].tolist())])
    return buffer.getvalue()


def read_affinity_csv(path: str | Path) -> dict[int, dict[str, Tensor]]:
    """``affinity.csv`` back: ``{epoch: {kind: [m, m] matrix}}`` (task order of its header)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    tasks = rows[0][3:]
    out: dict[int, dict[str, list[list[float]]]] = {}
    for row in rows[1:]:
        out.setdefault(int(row[0]), {}).setdefault(row[1], []).append([float(v) for v in row[3:]])
    return {
        e: {
            k: torch.tensor(v, dtype=torch.float64).reshape(len(tasks), len(tasks))
            for k, v in d.items()
        }
        for e, d in out.items()
    }


def plot_affinity(entry: tuple[int, dict[str, Tensor]], tasks: Sequence[str], path: Path) -> None:
    """One heat-map per kind of the epoch's matrices (source rows, target columns), the colour
    scale set by the off-diagonal entries (the self-affinities would flatten it)."""
    plt = require_matplotlib()
    epoch, matrices = entry
    m = len(tasks)
    size = max(3.0, 0.25 * m + 2)
    fig, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices), size), squeeze=False)
    for ax, (kind, matrix) in zip(axes[0], matrices.items()):
        values = matrix.numpy()
        off = matrix[~torch.eye(m, dtype=torch.bool)] if m > 1 else matrix.flatten()
        bound = float(off.abs().max()) or 1.0  # the diagonal (self-affinity) saturates
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title(f"{kind} affinity, epoch {epoch}")
        ax.set_xlabel("target task j")
        ax.set_ylabel("source task i")
        if m <= 40:
            ax.set_xticks(range(m), tasks, rotation=90, fontsize=6 if m > 12 else 8)
            ax.set_yticks(range(m), tasks, fontsize=6 if m > 12 else 8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with atomic_file(path, "wb") as handle:
        handle.write(buffer.getvalue())
