"""What a training step does when a number goes non-finite: the ``on_nonfinite`` policy.

A long run must neither die on a single bad batch when the user asked it not to, nor silently
train on NaN. The step driver (:mod:`mtlkit.training.step`: :class:`mtlkit.Step` in a user's own
loop, and the strategies ``Joint`` and ``Alternating``) runs every optimizer step through a
:class:`NonFiniteGuard`, the same for every method, which checks, in this order:

1. **the task losses** of the step's forward pass, before any backward;
2. **the method's update**: a method that meets a non-finite Jacobian or Gramian raises
   :class:`~mtlkit.errors.NonFiniteError`, a failed QP solve raises
   :class:`~mtlkit.methods.solvers.SolverError`. A singular Gramian is *not* a fault (the
   solvers work in the Gramian's range; tested with zero, collinear and opposed gradients), and a
   solve that stops before its tolerance only warns (``RuntimeWarning``, the update is used);
3. **the gradients** of every parameter the optimizer is about to step (model and method
   parameters), after the backward and before ``optimizer.step()``: the final guard, so that an
   update is never applied with a NaN or infinite gradient;
4. **the weights** a step left (:meth:`NonFiniteGuard.check_weights`): finite gradients can
   still overflow the weights (a huge learning rate). This always raises: the previous weights
   are gone. It is not a pass over the weights after every step: a non-finite weight that the
   next forward pass uses makes that pass's losses or gradients non-finite, and every fault is
   first checked against the weights stepped so far, so it is reported as the weights' fault;
   the weights no forward pass has used since are checked in full by ``check_weights()``,
   which the Trainer calls before each checkpoint (so a checkpoint never holds them), at the
   end of each epoch and of ``fit``, and :class:`mtlkit.Step` at ``end_epoch()``.

What happens then is the policy (config key ``on_nonfinite``, ``Trainer(on_nonfinite=...)``,
``StrategyContext(on_nonfinite=...)``):

=================  ==========================  ===================  =========================
fault              ``raise`` (default)         ``skip_step``        ``skip_task``
=================  ==========================  ===================  =========================
task loss NaN/inf  NonFiniteError naming the   no update this step  the step goes on without
                   task(s); the Trainer adds                        the task(s)
                   epoch, batch and step
gradient NaN/inf,  NonFiniteError naming the   no update this step  the tasks whose own
or a method's      tasks whose own gradient                         gradient is non-finite are
NonFiniteError     is non-finite (or saying                         dropped and the update is
                   that the method's                                redone; if there is none
                   combination is)                                  (the method's fault), as
                                                                    skip_step
solver failure     SolverError (the Trainer    no update this step  as skip_step (not a task's
                   adds epoch, batch, step)                         fault)
weights NaN/inf    NonFiniteError              NonFiniteError       NonFiniteError
after the step
=================  ==========================  ===================  =========================

**No update** (``skip_step``): the gradients are cleared, ``optimizer.step()`` is not called (the
optimizer state does not move), the method's state is put back to what it was at the start of the
step (its ``state_dict()``, copied at the start of each step under the skip policies; what a
method keeps outside its state dict, and what ``before_step`` / ``prepare`` did, is not undone),
and ``after_step``, the Trainer's per-step hooks and the exploration tracker are not called. The
step still counts toward the ``steps`` budget and the step index advances, so a run with faults
keeps its schedule.

**Dropping tasks** (``skip_task``): the method is called on the remaining ``m' < m`` tasks (its
Jacobian or loss vector has ``m'`` rows; the dropped tasks' weights are reported as 0). A method
with per-task state refuses a changed task count with ``ValueError`` (UW, DWA, FAMO, GradNorm,
MoCo, IMTL, Krum below its minimum, ...): it then gets all ``m`` tasks, each dropped one replaced
by a *stand-in*, a constant equal to the task's loss (its last finite value when the loss is not
finite, or the mean of the step's other losses before there is one) with a zero gradient. A loss
weighting then sees a plausible loss and the task moves no parameter; a gradient aggregator sees
a zero Jacobian row (for min-norm methods such as MGDA a zero row can make the whole step zero;
use ``skip_step`` if that matters). If every task is dropped, or the gradients are still not
finite without the dropped tasks, the step is skipped. Finding which tasks' gradients are not
finite costs one more forward pass on the batch (counted in ``passes``) and one backward per task,
on a faulty step only. With gradient accumulation (``accumulate > 1``) ``skip_task`` skips the
step instead (the micro-batches' gradients are summed in ``.grad`` and cannot be split by task).

Under fp16 loss scaling the gradient checks are left to the loss scaler (an overflow of the
scaled gradients is expected: it skips the step and lowers the scale); the loss check stays. The
skip policies need every process to take the same decision and are refused under DDP.

Counters (:meth:`NonFiniteGuard.counts`, in ``summary.json`` under ``nonfinite`` and kept in
checkpoints): ``nonfinite_losses`` and ``nonfinite_gradients`` (faults seen), ``solver_failures``,
``skipped_steps`` and ``skipped_tasks`` (``{task: steps}``). Skips also warn
(``RuntimeWarning``, at the 1st, 2nd, 4th, 8th, ... skip).

Cost: two reductions per step, each with one device synchronisation: one over the step's losses,
one fused L2 norm over the step's gradients (``torch._foreach_norm``: a NaN or infinite entry
makes it non-finite; an overflow of finite values is told apart by a per-tensor check); under
the skip policies also a copy of the method's state per step. Measured on 1 CPU thread (MLP
34-256-256, 11 heads): about 2 % of a step (``benchmarks/bench_loop.py``).

Not covered: the virtual steps of bilevel methods (``prepare``: Auto-Lambda, MOML, FORUM) and
FAMO's losses after the step, which raise their own ``NonFiniteError`` under every policy.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError, NonFiniteError
from mtlkit.methods.solvers import SolverError

__all__ = [
    "POLICIES",
    "NonFiniteGuard",
    "NonFinitePolicy",
    "check_policy",
    "first_nonfinite",
]

NonFinitePolicy = Literal["raise", "skip_step", "skip_task"]
POLICIES: tuple[str, ...] = ("raise", "skip_step", "skip_task")

Outcome = tuple[dict[str, float], int, Any]
"""``(task weights, backward passes, solver status or None)``: what one backward reports."""
Update = Callable[[Any, Sequence[str]], Outcome]
"""``(forward result, tasks) -> outcome``: the backward of one method over ``tasks``
(:func:`mtlkit.training.step.method_update`, unguarded)."""


def check_policy(policy: str) -> NonFinitePolicy:
    """``policy`` if it is one of :data:`POLICIES`, else a ConfigError listing them."""
    if policy not in POLICIES:
        raise ConfigError(f"on_nonfinite must be one of {', '.join(POLICIES)}; got {policy!r}")
    return policy  # type: ignore[return-value]


def first_nonfinite(tensors: Iterable[Tensor | None]) -> Tensor | None:
    """The first tensor with a NaN or infinite entry, or ``None`` when all are finite (then one
    fused reduction and one synchronisation)."""
    present = [
        t.detach() for t in tensors if t is not None and (t.is_floating_point() or t.is_complex())
    ]
    if not present:
        return None
    # One fused L2 norm (several times cheaper than the inf-norm on CPU): finite unless an entry
    # is NaN/inf or the squares of finite entries overflow, which the loop below tells apart.
    if math.isfinite(float(torch.stack(torch._foreach_norm(present)).sum())):
        return None
    for tensor in present:
        if not bool(torch.isfinite(tensor).all()):
            return tensor
    return None  # pragma: no cover - only an overflow of finite values gets here


def _first_nonfinite_grad(params: Sequence[Tensor]) -> Tensor | None:
    """:func:`first_nonfinite` of the parameters' gradients (the per-step check: one fused norm,
    its values summed in Python floats, which a sum of finite float32 norms cannot overflow; on
    the CPU each norm is read as it is, elsewhere they are stacked for one synchronisation)."""
    grads = []
    for p in params:  # a loop, not a comprehension: no frame of its own
        if p.grad is not None:
            grads.append(p.grad)
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    values = map(float, norms) if grads[0].device.type == "cpu" else torch.stack(norms).tolist()
    if math.isfinite(sum(values)):
        return None
    return first_nonfinite(grads)


def _own_parameters(method: nn.Module) -> list[Tensor]:
    """``list(method.parameters())``, without walking the module tree of a method that has no
    parameter and no submodule (the usual loss weighting)."""
    if not method._parameters and not method._modules:
        return []
    return list(method.parameters())


_STEPPED_LISTS = 16
"""How many distinct parameter lists :meth:`NonFiniteGuard.stepped` keeps before folding them."""


class _Fault(Exception):
    """Internal: this step must be skipped (the reason is the message)."""


class NonFiniteGuard:
    """Applies the ``on_nonfinite`` policy to the optimizer steps of a strategy.

    A strategy calls :meth:`begin` before a step's forward pass, the backward goes through
    :meth:`update` (``method_update`` does that when its context has a guard), then
    :meth:`commit` says whether to call ``optimizer.step()``, :meth:`stepped` follows the step,
    and :meth:`check_weights` checks the weights stepped since the last check.

    Args:
        policy: ``"raise"``, ``"skip_step"`` or ``"skip_task"`` (module docstring).
        accumulate: micro-batches per step; above 1, ``skip_task`` skips the step.
        distributed: whether several processes train together (the skip policies are refused).

    Raises:
        ConfigError: for an unknown policy, or a skip policy under DDP.
    """

    def __init__(self, policy: str = "raise", accumulate: int = 1, distributed: bool = False):
        self.policy = check_policy(policy)
        if distributed and self.policy != "raise":
            raise ConfigError(
                f"on_nonfinite={policy} is not supported with several processes (DDP): every "
                "process would have to agree on each skip; use on_nonfinite=raise"
            )
        self.accumulate = accumulate
        self.nonfinite_losses = 0
        self.nonfinite_gradients = 0
        self.solver_failures = 0
        self.skipped_steps = 0
        self.skipped_tasks: dict[str, int] = {}
        self._stand_ins: dict[str, Tensor] = {}  # each task's last finite loss (detached)
        self._params: list[Tensor] = []
        # Every parameter stepped since the last check: the lists of the steps (by identity: a
        # strategy passes the same list each step), folded into single parameters when many.
        self._stepped_lists: dict[int, list[Tensor]] = {}
        self._stepped: dict[int, Tensor] = {}
        self._method: nn.Module | None = None
        self._redo: Callable[[], Any] | None = None
        self._snapshot: dict[str, Any] | None = None
        self._skip: str | None = None
        self._checked = False
        self.busy = False

    def __repr__(self) -> str:
        return f"NonFiniteGuard(policy={self.policy!r})"

    # ------------------------------------------------------------------- a step's calls
    def begin(self, params: Iterable[Tensor], method: nn.Module, redo: Callable[[], Any]) -> None:
        """Start a step: the parameters it updates (model and method ones), its method (whose
        state a skip restores), and ``redo``, a new forward pass on the step's batch."""
        own = _own_parameters(method)
        self._params = params if not own and type(params) is list else [*params, *own]
        self._method = method
        self._redo = redo
        self._skip = None
        self._checked = False
        self._snapshot = None
        if self.policy != "raise":
            state = method.state_dict()
            self._snapshot = copy.deepcopy(state) if state else None

    def update(
        self, result: Any, tasks: Sequence[str], update: Update, context: Any = None
    ) -> Outcome:
        """The guarded backward of ``tasks`` on the forward pass ``result``: ``update(result,
        tasks)`` with the checks and the policy of the module docstring.

        Args:
            result: a :class:`~mtlkit.training.forward.ForwardResult`.
            update: the unguarded backward ``(result, tasks) -> (weights, backwards, status)``.
            context: the strategy context (its loss scaler turns the gradient checks off; its
                Gramian-route capture is cleared when the step is skipped or redone).

        Raises:
            NonFiniteError: under ``raise``, naming the task(s) at fault.
            SolverError: under ``raise``, when the method's solver failed.
        """
        if self._skip is not None:  # an earlier micro-batch of this step failed
            return {}, 0, None
        self.busy = True
        try:
            return self._update(result, tasks, update, context)
        except _Fault as fault:
            self._skip = str(fault)
            self._clear(context)
            return {}, 0, None
        finally:
            self.busy = False

    def commit(self, context: Any = None) -> bool:
        """Whether the strategy should take the optimizer step now. On a skip: the gradients
        are cleared, the method's state is restored, the skip is counted (and warned about).

        Raises:
            NonFiniteError: under ``raise``, if a gradient is not finite (checked here when no
                guarded update checked it).
        """
        if self._skip is None and not self._checked and not _scaled(context):
            bad = _first_nonfinite_grad(self._params)
            if bad is not None:
                self.check_weights()
                self.nonfinite_gradients += 1
                reason = f"a gradient is not finite (parameter of shape {list(bad.shape)})"
                if self.policy == "raise":
                    raise NonFiniteError(reason)
                self._skip = reason
        if self._skip is None:
            return True
        self._clear(context)
        self._restore()
        self.skipped_steps += 1
        self._warn(f"skipped a step: {self._skip}")
        return False

    def stepped(self) -> None:
        """After ``optimizer.step()``: the step's parameters are checked by the next fault or
        :meth:`check_weights` (module docstring, check 4)."""
        params = self._params
        if id(params) not in self._stepped_lists:
            if len(self._stepped_lists) >= _STEPPED_LISTS:
                self._fold_stepped()
            self._stepped_lists[id(params)] = params

    def _fold_stepped(self) -> None:
        """The stepped lists as single parameters, in the order they were first stepped."""
        for params in self._stepped_lists.values():
            for p in params:
                self._stepped.setdefault(id(p), p)
        self._stepped_lists.clear()

    def check_weights(self) -> None:
        """Raise if a parameter stepped since the last check is NaN or infinite (under every
        policy: the steps cannot be undone); the Trainer calls it before each checkpoint and at
        the end of each epoch.

        Raises:
            NonFiniteError: naming the parameter's shape.
        """
        self._fold_stepped()
        bad = first_nonfinite(self._stepped.values())
        if bad is not None:
            raise NonFiniteError(
                f"an optimizer step made a parameter of shape {list(bad.shape)} non-finite "
                "although every gradient was finite (the learning rate is probably too large)"
            )
        self._stepped.clear()

    # ------------------------------------------------------------------------ counters
    def counts(self) -> dict[str, Any]:
        """The fault counters (what ``summary.json`` reports under ``nonfinite``)."""
        return {
            "policy": self.policy,
            "nonfinite_losses": self.nonfinite_losses,
            "nonfinite_gradients": self.nonfinite_gradients,
            "solver_failures": self.solver_failures,
            "skipped_steps": self.skipped_steps,
            "skipped_tasks": dict(self.skipped_tasks),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters and stand-in losses, for checkpoints (the policy is the run's config)."""
        state = self.counts()
        del state["policy"]
        state["stand_ins"] = {t: v.cpu() for t, v in self._stand_ins.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite_losses = int(state["nonfinite_losses"])
        self.nonfinite_gradients = int(state["nonfinite_gradients"])
        self.solver_failures = int(state["solver_failures"])
        self.skipped_steps = int(state["skipped_steps"])
        self.skipped_tasks = {str(t): int(n) for t, n in state["skipped_tasks"].items()}
        self._stand_ins = dict(state.get("stand_ins", {}))

    # ------------------------------------------------------------------------- the policy
    def _update(self, result: Any, tasks: Sequence[str], update: Update, context: Any) -> Outcome:
        drop_tasks = self.policy == "skip_task" and self.accumulate == 1
        bad = _nonfinite_losses(result, tasks)
        if bad:
            self.check_weights()  # a weight an earlier step overflowed is the fault
            self.nonfinite_losses += 1
            reason = ", ".join(
                f"loss of task {list(tasks).index(t)} ({t!r}) is "
                f"{float(result.losses[t].detach().float().sum())}"
                for t in bad
            )
            if self.policy == "raise":
                raise NonFiniteError(reason)
            if not drop_tasks or len(bad) == len(tasks):
                raise _Fault(reason)
            return self._drop(bad, result, tasks, update, context, reason)
        fault = self._attempt(result, tasks, update, context)
        if not isinstance(fault, Exception):
            self._remember(result, tasks)
            return fault
        if isinstance(fault, SolverError):
            self.solver_failures += 1
            if self.policy == "raise":
                raise fault
            raise _Fault(f"solver failed: {fault}")
        self.check_weights()
        self.nonfinite_gradients += 1
        if self.policy == "skip_step" or (self.policy == "skip_task" and not drop_tasks):
            raise _Fault(str(fault))
        self._restore()
        fresh = self._fresh(context)
        culprits = self._culprits(fresh, tasks)
        reason = _explain(str(fault), culprits, tasks)
        if self.policy == "raise":
            raise NonFiniteError(reason)
        if not culprits or len(culprits) == len(tasks):
            raise _Fault(reason)
        return self._drop(culprits, fresh, tasks, update, context, reason)

    def _attempt(
        self, result: Any, tasks: Sequence[str], update: Update, context: Any
    ) -> Outcome | NonFiniteError | SolverError:
        """``update(result, tasks)`` and the gradient check: its value, or the fault (the
        gradients are then cleared). A ``ValueError`` of the method passes through."""
        try:
            outcome = update(result, tasks)
        except (NonFiniteError, SolverError) as error:
            self._clear(context)
            return error
        if _scaled(context):
            return outcome
        self._checked = True
        bad = _first_nonfinite_grad(self._params)
        if bad is not None:
            self._clear(context)
            value = float(bad[~torch.isfinite(bad)].flatten()[0])
            return NonFiniteError(
                f"a gradient is {value} after the backward (parameter of shape {list(bad.shape)})"
            )
        return outcome

    def _drop(
        self,
        dropped: list[str],
        result: Any,
        tasks: Sequence[str],
        update: Update,
        context: Any,
        reason: str,
    ) -> Outcome:
        """The step without ``dropped``: the method on the other tasks, or (if it refuses a
        changed task count) on all tasks with stand-ins for the dropped ones."""
        keep = [t for t in tasks if t not in dropped]
        try:
            outcome = self._attempt(result, keep, update, context)
        except ValueError:  # the method keeps per-task state: all m tasks, with stand-ins
            self._clear(context, capture=False)
            self._restore()
            outcome = self._attempt(self._stand_in(result, dropped, keep), tasks, update, context)
        if isinstance(outcome, Exception):
            raise _Fault(f"{reason}; without task(s) {dropped}: {outcome}")
        weights, backwards, status = outcome
        weights = {**weights, **dict.fromkeys(dropped, 0.0)}
        for t in dropped:
            self.skipped_tasks[t] = self.skipped_tasks.get(t, 0) + 1
        self._remember(result, keep)
        self._warn(f"dropped task(s) {dropped} from a step: {reason}")
        return weights, backwards, status

    def _stand_in(self, result: Any, dropped: Sequence[str], keep: Sequence[str]) -> Any:
        """``result`` with each dropped task's loss replaced by a constant of its value (its
        last finite value, or the mean of the kept losses, when it is not finite) attached to the
        graph with a zero gradient (so that every gradient route can differentiate it)."""
        stand = copy.copy(result)
        stand.losses = dict(result.losses)
        anchor = result.losses[keep[0]]
        mean = torch.stack([result.losses[t].detach().float().sum() for t in keep]).mean()
        for t in dropped:
            value = result.losses[t].detach()
            if not bool(torch.isfinite(value).all()):
                value = self._stand_ins.get(t, mean)
            value = value.to(device=anchor.device, dtype=anchor.dtype).reshape(anchor.shape)
            stand.losses[t] = value + 0.0 * anchor
        return stand

    def _fresh(self, context: Any) -> Any:
        """A new forward pass on the step's batch (the capture's records of the first one are
        dropped first)."""
        if self._redo is None:
            raise _Fault("no forward pass to redo (NonFiniteGuard.begin was not called)")
        self._clear(context)
        return self._redo()

    def _culprits(self, result: Any, tasks: Sequence[str]) -> list[str]:
        """The tasks whose own loss, or gradient w.r.t. the step's parameters, is not finite."""
        bad = _nonfinite_losses(result, tasks)
        inputs = [p for p in self._params if p.requires_grad]
        for t in tasks:
            loss = result.losses[t]
            if t in bad or not inputs or not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            if first_nonfinite(grads) is not None:
                bad.append(t)
        return [t for t in tasks if t in bad]

    # -------------------------------------------------------------------------- helpers
    def _remember(self, result: Any, tasks: Sequence[str]) -> None:
        """Keep each task's last finite loss, the stand-in of ``skip_task``."""
        if self.policy != "skip_task":
            return  # only skip_task uses stand-ins (no detach per task otherwise)
        for t in tasks:
            self._stand_ins[t] = result.losses[t].detach()

    def _clear(self, context: Any, capture: bool = True) -> None:
        for p in self._params:
            p.grad = None
        if capture and getattr(context, "capture", None) is not None:
            context.capture.clear()

    def _restore(self) -> None:
        """Put the method's state back to the start of the step; buffers that the step created
        are reset to ``None`` (they did not exist before it)."""
        method, snapshot = self._method, self._snapshot
        if method is None or snapshot is None:
            return
        result = method.load_state_dict(snapshot, strict=False)
        for key in result.missing_keys:
            owner_name, _, name = key.rpartition(".")
            owner = method.get_submodule(owner_name) if owner_name else method
            if name in owner._buffers:
                setattr(owner, name, None)

    def _warn(self, message: str) -> None:
        count = self.skipped_steps + sum(self.skipped_tasks.values())
        if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th, ...
            warnings.warn(
                f"on_nonfinite={self.policy}: {message} ({count} skip(s) so far)",
                RuntimeWarning,
                stacklevel=4,
            )


def _scaled(context: Any) -> bool:
    """Whether the gradients carry an fp16 loss scale (overflows are then the scaler's job)."""
    return getattr(getattr(context, "reducer", None), "scaler", None) is not None


def _nonfinite_losses(result: Any, tasks: Sequence[str]) -> list[str]:
    """The tasks whose loss in ``result`` is NaN or infinite (one synchronisation)."""
    values = result.floats()  # one read, shared with the step's report
    if math.isfinite(sum(values.values())):  # the usual case, without a loop over the tasks
        return []
    return [t for t in tasks if not math.isfinite(values[t])]


def _explain(reason: str, culprits: Sequence[str], tasks: Sequence[str]) -> str:
    if culprits:
        return f"{reason}; non-finite gradient of task(s) {', '.join(map(repr, culprits))}"
    return (
        f"{reason}; every task's own gradient is finite (tasks {list(tasks)}): the method's "
        "combination of them is not"
    )
