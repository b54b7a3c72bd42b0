"""Exploration of the shared parameters (Pascal et al., 2021, Sec. 5).

Alternating independent task steps was found to "explore" the shared parameter space more
widely than the averaged objective. Two measures, over the shared parameters with the task heads
and the normalisation layers excluded (as in the paper):

* the path length, ``Σ_k |θ_{k+1} - θ_k|``, summed over every optimizer step;
* the distance from the initialisation, ``|θ - θ_0|``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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
