"""How the solver-based methods report trouble: a status per step, a warning once per run.

A solve that stops above its tolerance, or has no solution (Pareto-stationary gradients for
Nash-MTL), is normal along a training trajectory (near a Pareto front most steps are such): a
warning per step flooded the log (Nash-MTL on the 2-D toy: over 20,000 in 35,000 steps). Each
decision carries a :class:`~mtlkit.engine.contract.SolverStatus` instead (the Trainer writes it
to ``steps.csv`` and TensorBoard, the toy counts it), and :meth:`ReportsSolver.warn_once` warns
the first time each kind of trouble occurs until the method is ``reset`` (a new run).
"""

from __future__ import annotations

import warnings

from mtlkit.engine.contract import SolverStatus

__all__ = ["ReportsSolver", "SolverStatus"]


class ReportsSolver:
    """Mixin of a method whose solver can end above its tolerance: :meth:`warn_once`. List it
    before the method's base class (``class MGDA(ReportsSolver, Float64GramianWeighting)``)."""

    def warn_once(self, kind: str, message: str) -> None:
        """A ``RuntimeWarning`` with ``message`` the first time ``kind`` occurs in this run."""
        warned: set[str] = self.__dict__.setdefault("_warned_kinds", set())
        if kind in warned:
            return
        warned.add(kind)
        warnings.warn(
            f"{message}. Warned once per run: later steps record it in their solver status "
            "(Decision.status; the Trainer's steps.csv columns solver/*)",
            RuntimeWarning,
            stacklevel=4,
        )

    def reset(self) -> None:
        self.__dict__.pop("_warned_kinds", None)
        super().reset()  # type: ignore[misc]
