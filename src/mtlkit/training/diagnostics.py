"""Diagnostics of a run: the exploration of the shared parameters, the solvers' statuses.

Exploration (Pascal et al., 2021, Sec. 5).

Alternating independent task steps was found to "explore" the shared parameter space more
widely than the averaged objective. Two measures, over the shared parameters with the task heads
and the normalisation layers excluded (as in the paper):

* the path length, ``Σ_k |θ_{k+1} - θ_k|``, summed over every optimizer step;
* the distance from the initialisation, ``|θ - θ_0|``.

Solver statuses: each step of a solver-based method (MGDA, CAGrad, Nash-MTL, ...) says how its
solve ended (:class:`~mtlkit.engine.contract.SolverStatus`); :func:`solver_row` makes them the
``steps.csv`` cells, :func:`status_label` what the toy counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from mtlkit.engine.contract import SolverStatus
from mtlkit.methods import Method
from mtlkit.methods.solver_report import ReportsSolver

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def exploration_parameters(model: nn.Module, shared: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The shared parameters that do not belong to a normalisation layer of ``model``."""
    normalisation = {
        id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()
    }
    return [p for p in shared if id(p) not in normalisation]


class ExplorationTracker:
    """Accumulates the path length of a set of parameters, one optimizer step at a time.

    Call :meth:`on_step` after every optimizer step; the norms accumulate on the parameters'
    device, so nothing synchronises until :meth:`path_length` is read.
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = list(params)
        with torch.no_grad():
            self.initial = [p.detach().clone() for p in self.params]
            self.previous = [p.detach().clone() for p in self.params]
        device = self.params[0].device if self.params else torch.device("cpu")
        self._path = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def on_step(self) -> None:
        if not self.params:
            return
        current = [p.detach() for p in self.params]
        diffs = torch._foreach_sub(current, self.previous)
        norms = torch._foreach_norm(diffs)
        self._path += torch.linalg.vector_norm(torch.stack(norms).double())
        torch._foreach_copy_(self.previous, current)

    def state_dict(self) -> dict[str, object]:
        return {"initial": self.initial, "previous": self.previous, "path": self._path}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        for mine, saved in ((self.initial, state["initial"]), (self.previous, state["previous"])):
            if len(mine) != len(saved):  # type: ignore[arg-type]
                raise ValueError("the checkpoint tracks a different set of shared parameters")
            torch._foreach_copy_(mine, list(saved))  # type: ignore[arg-type]
        self._path.copy_(state["path"])  # type: ignore[arg-type]

    def path_length(self) -> float:
        """``Σ_k |θ_{k+1} - θ_k|`` over the steps seen so far."""
        return float(self._path)

    @torch.no_grad()
    def distance_from_init(self) -> float:
        """``|θ - θ_0|``."""
        if not self.params:
            return 0.0
        diffs = torch._foreach_sub([p.detach() for p in self.params], self.initial)
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs)).double()))


# --- solver statuses (steps.csv's solver/* columns, the toy's counts) ---------------------------

SOLVER_COLUMNS = ("solver/converged", "solver/iterations", "solver/residual", "solver/message")
"""The ``steps.csv`` columns (and TensorBoard scalars, but the message) of the solver statuses:
``converged`` 1/0, ``iterations``, ``residual`` (relative, as the method defines it) and the
short reason of a step whose solve did not converge."""


def solver_columns(methods: Iterable[Method]) -> list[str]:
    """:data:`SOLVER_COLUMNS` when one of ``methods`` reports a solver status per step (a
    :class:`~mtlkit.methods.solver_report.ReportsSolver`), else none."""
    return list(SOLVER_COLUMNS) if any(isinstance(m, ReportsSolver) for m in methods) else []


def solver_row(statuses: Sequence[SolverStatus], columns: Sequence[str]) -> dict[str, Any]:
    """The solver cells of one ``steps.csv`` row from the statuses of its method steps (several
    with a group strategy): converged if all did, iterations summed, the largest residual, the
    distinct messages; nothing where the log has no such columns or no step reported one."""
    if not statuses or SOLVER_COLUMNS[0] not in columns:
        return {}
    messages = dict.fromkeys(s.message for s in statuses if s.message)
    return {
        "solver/converged": int(all(s.converged for s in statuses)),
        "solver/iterations": sum(s.iterations for s in statuses),
        "solver/residual": max(s.residual for s in statuses),
        "solver/message": "; ".join(messages),
    }


def status_label(status: SolverStatus) -> str:
    """``"newton: converged"`` or ``"newton: <why it stopped>"``: what counts group by."""
    return f"{status.solver}: {'converged' if status.converged else status.message or 'stopped'}"
