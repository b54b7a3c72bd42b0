"""``route="auto"`` in training: the backward route of a Gramian weighting, chosen by measuring.

A Gramian weighting (MGDA, UPGrad, CAGrad, PCGrad, Nash-MTL, IMTL-G, ...: a direction
``d = w(J Jᵀ) @ J``) on the parameter route has two engines that compute the same update up to
float rounding: the **loop** (one ``autograd.grad`` per task forms ``J``, :func:`mtlkit.jacobian`)
and the **Gramian** route (:class:`~mtlkit.engine.layer_capture.LayerCapture`: ``J Jᵀ`` layer by
layer, ``J`` never formed). Which is faster depends on the layers, the batch, the number of tasks
and the device (for MGDA with 10 tasks on an MLP 784-512-512-256 the Gramian route's backward was
4x faster on one CPU thread; on convolution-heavy models it is not), so :class:`AutoRoute`
measures both on the run's own first steps:

1. the first step of such a method takes the loop and registers the capture's forward hooks;
2. the next ``1 + trials`` steps take the loop too, and before each of them the Gramian route
   runs on the same forward pass as a trial: on a copy of the method, the random state restored,
   its gradients discarded (the first trial, untimed, checks its Gramian against ``J Jᵀ``);
   both are timed (a backward: the Jacobian or Gramian, the method's decision, the gradients
   written), with CUDA synchronised around each;
3. from step ``3 + trials`` on, the Gramian route is used if its median is below ``margin`` (0.9)
   times the loop's, else the loop (and the hooks are removed).

So the trajectory of the first ``2 + trials`` steps is the loop's whatever the timings, and the
switch happens at a fixed step. The decision is cached in the process, keyed by the method, the
number of tasks, the shared parameters' shapes and the device: a later run of that shape (a
second seed, ``mtlkit compare``, a resume) skips the trials (same schedule, same choice), so
runs in one process are bitwise reproducible. Runs in different processes may choose
differently when the timings are close; the routes then differ in rounding only. Pin
``route="loop"`` or ``route="gramian"`` for bitwise-equal runs across processes. The choice and
the timings are in ``summary.json`` (``route``) and in checkpoints (a resumed run keeps them).

A model whose layers the Gramian route cannot take (an output modified in place, weight tying:
:class:`~mtlkit.engine.layer_capture.CaptureUnsupported`, raised by the trial) keeps the loop,
with the reason recorded. Every other case takes the loop Jacobian without measuring (what
``route="auto"`` of :func:`mtlkit.jacobian` and :func:`mtlkit.backward` always means): loss
weightings, aggregators that need ``J`` itself, the features route, DDP or fp16 loss scaling,
gradient accumulation.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.engine.contract import Decision
from mtlkit.engine.jacobian import graph_leaves
from mtlkit.engine.layer_capture import CaptureUnsupported, LayerCapture

__all__ = ["ROUTE_CACHE", "AutoRoute"]

ROUTE_CACHE: dict[tuple[Any, ...], str] = {}
"""Decisions of :class:`AutoRoute` in this process, by problem shape."""


class AutoRoute:
    """Chooses between the loop and the Gramian route by timing both on the first steps
    (module docstring).

    Args:
        model: the model (the capture takes its linear layers whose parameters are all shared).
        shared: the shared parameters.
        device: where the model runs.
        trials: timed steps per route.
        margin: the Gramian route is chosen when its median time is below ``margin`` times the
            loop's.
        clock: seconds now (``time.perf_counter``; a test gives a fake one).
        cache: decisions by problem shape (:data:`ROUTE_CACHE`).
    """

    def __init__(
        self,
        model: nn.Module,
        shared: Sequence[nn.Parameter],
        device: torch.device,
        *,
        trials: int = 3,
        margin: float = 0.9,
        clock: Callable[[], float] = time.perf_counter,
        cache: dict[tuple[Any, ...], str] | None = None,
    ) -> None:
        if trials < 1:
            raise ValueError(f"AutoRoute needs trials >= 1, got {trials}")
        self.model = model
        self.shared = list(shared)
        self.device = device
        self.trials = trials
        self.margin = margin
        self.clock = clock
        self.cache = ROUTE_CACHE if cache is None else cache
        self.position = 0  # measured steps taken
        self.seconds: dict[str, list[float]] = {"loop": [], "gramian": []}
        self.choice: str | None = None  # None while measuring
        self.reason = ""
        self.capture: LayerCapture | None = None
        self._key: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        return f"AutoRoute(choice={self.choice!r}, step {self.position} of {self.steps})"

    @property
    def steps(self) -> int:
        """Steps that take the loop before the choice applies."""
        return 2 + self.trials

    # ------------------------------------------------------------------ a step's calls
    def route(self, method: Any, num_tasks: int) -> str:
        """The route of this step's backward for ``method`` (a Gramian weighting): the choice,
        or the loop while measuring."""
        if self.choice is not None:
            return self.choice
        if self._key is None:
            self._key = (
                type(method).__name__,
                num_tasks,
                tuple(tuple(p.shape) for p in self.shared),
                str(self.device),
            )
        if self.capture is None:  # recording from the next forward pass on
            self.capture = LayerCapture(self.model, shared=self.shared, verify=True)
            if not self.capture.layers:
                self._decide("loop", "no nn.Linear layer among the shared parameters to record")
        return "loop"

    def measure(
        self, method: Any, losses: Sequence[Tensor], backward: Callable[..., Decision]
    ) -> Decision:
        """This step's backward while measuring: ``backward(method, capture, retain_graph)``
        on the loop (the update), after the Gramian trial on the same losses when one is due
        (module docstring). Returns the loop's decision."""
        cached = self.cache.get(self._key) if self._key is not None else None
        trial = self.position >= 1 and cached is None and self.choice is None
        if trial and self.capture is not None and self.capture.records:
            try:
                elapsed = self._trial(method, losses, backward)
            except CaptureUnsupported as error:
                self._decide("loop", f"the Gramian route cannot take this model: {error}")
            else:
                if self.position >= 2:
                    self.seconds["gramian"].append(elapsed)
        if self.capture is not None:
            self.capture.clear()
        start = self._now()
        decision = backward(method, None, False)
        if trial and self.position >= 2 and self.choice is None:
            self.seconds["loop"].append(self._now() - start)
        self.position += 1
        if self.position >= self.steps and self.choice is None:
            self._finish(cached)
        return decision

    def _trial(self, method: Any, losses: Sequence[Tensor], backward: Callable) -> float:
        """The Gramian route on a copy of ``method``, its gradients discarded and the random
        state restored; returns its seconds."""
        leaves = graph_leaves(torch.stack(list(losses)))
        saved = [leaf.grad for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        copy_of = copy.deepcopy(method)
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        try:
            start = self._now()
            backward(copy_of, self.capture, True)
            return self._now() - start
        finally:
            for leaf, grad in zip(leaves, saved):
                leaf.grad = grad
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)

    # ------------------------------------------------------------------- the decision
    def _finish(self, cached: str | None) -> None:
        if cached is not None:
            self._decide(cached, "cached: the same problem shape earlier in this process")
            return
        if not (self.seconds["loop"] and self.seconds["gramian"]):  # no trial could run
            self._decide("loop", "no Gramian trial ran: no shared layer was recorded")
            return
        loop = statistics.median(self.seconds["loop"])
        gramian = statistics.median(self.seconds["gramian"])
        faster = "gramian" if gramian < self.margin * loop else "loop"
        self._decide(
            faster,
            f"median backward {loop * 1e3:.3f} ms (loop), {gramian * 1e3:.3f} ms (gramian)",
        )
        if self._key is not None:
            self.cache[self._key] = faster

    def _decide(self, route: str, reason: str) -> None:
        self.choice, self.reason = route, reason
        if route == "loop" and self.capture is not None:
            self.capture.remove()
            self.capture = None
        if route == "loop" and self._key is not None and reason.startswith("the Gramian"):
            self.cache[self._key] = "loop"

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    # --------------------------------------------------------------------- reporting
    def summary(self) -> dict[str, Any]:
        """The choice (``None`` while measuring), the reason, and the timings in seconds."""
        return {
            "choice": self.choice,
            "reason": self.reason,
            "seconds": {k: list(v) for k, v in self.seconds.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.summary(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved measurement, or keep its choice (the capture's hooks are registered
        now, before the next forward pass, where the Gramian route may be next)."""
        choice = state["choice"]
        if choice not in (None, "loop", "gramian"):
            raise ValueError(f"route choice must be null, loop or gramian, got {choice!r}")
        self.seconds = {k: [float(x) for x in state["seconds"][k]] for k in ("loop", "gramian")}
        self.position, self.reason, self.choice = (
            int(state["position"]),
            str(state["reason"]),
            choice,
        )
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        if choice == "gramian" or (choice is None and self.position > 0):
            verify = choice is None and self.position <= 1  # the checked trial is still due
            self.capture = LayerCapture(self.model, shared=self.shared, verify=verify)
