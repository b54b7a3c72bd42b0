"""The Trainer's forward pass: a model's outputs turned into each task's loss.

:class:`ModelForward` is the ``compute_losses`` closure the Trainer hands its strategy (wrapped in
a :class:`~mtlkit.training.forward.SubsetLosses`): ``forward(batch, tasks)`` runs the model under
the run's precision, computes the losses of ``tasks`` (all tasks for ``None``), adds the model's
auxiliary terms, and gives them to the parallel layer (loss scaling, DDP's global values). A
multi-input model runs on the inputs of ``tasks`` only; a single-input model whose
``forward(x, task=t)`` computes task ``t`` alone (``task_forward``, decided by the pre-flight dry
forward) runs its one head for a one-task subset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from mtlkit.errors import MtlkitError
from mtlkit.parallel.ddp import Parallel
from mtlkit.tasks import Task
from mtlkit.training.devices import model_hook
from mtlkit.training.forward import ForwardResult


class ModelForward:
    """One forward pass of ``model`` on a batch: the losses of some or all ``tasks``.

    Args:
        model: the multi-task model.
        tasks: the tasks, in order.
        parallel: the run's precision and data parallelism.
        rep_grad: the model also returns its shared representation (``return_features=True``).
        on_pass: called once per forward pass (the Trainer counts ``passes``).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[Task],
        parallel: Parallel,
        *,
        rep_grad: bool,
        on_pass: Callable[[], None],
    ) -> None:
        self.model = model
        self.by_name: Mapping[str, Task] = {t.name: t for t in tasks}
        self.names = list(self.by_name)
        self.parallel = parallel
        self.rep_grad = rep_grad
        self.multi_input = bool(getattr(model, "multi_input", False))
        self.on_pass = on_pass
        self.task_forward = False

    def __call__(self, batch: Any, tasks: Sequence[str] | None = None) -> ForwardResult:
        """The losses of ``tasks`` (every task for ``None``) on ``batch``, and the features for
        ``rep_grad``."""
        self.on_pass()
        names = self.names if tasks is None else tasks
        losses: dict[str, Tensor] = {}
        if self.multi_input:
            features = []
            for t in names:
                inputs, target = batch[t]
                outputs, z = self.outputs(inputs, task=t)
                losses[t] = self.by_name[t].loss(outputs[t], target)
                features.append(z)
            result = ForwardResult(self._add_auxiliary(losses), features if self.rep_grad else None)
            return self.parallel.prepare(result)  # AMP: loss-scaled; DDP: global values
        inputs, targets = batch
        alone = self.task_forward and len(names) == 1
        outputs, z = self.outputs(inputs, task=names[0] if alone else None)
        for t in names:
            if t not in outputs or t not in targets:
                missing = [t for t in names if t not in outputs or t not in targets]
                raise MtlkitError(
                    f"task(s) {missing} missing from the model outputs {sorted(outputs)} "
                    f"or the targets {sorted(targets)}"
                )
            losses[t] = self.by_name[t].loss(outputs[t], targets[t])
        return self.parallel.prepare(ForwardResult(self._add_auxiliary(losses), z))

    def outputs(
        self, inputs: Any, task: str | None = None
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The model's outputs (float32) and, for ``rep_grad``, its shared representation."""
        kwargs: dict[str, Any] = {} if task is None else {"task": task}
        precision = self.parallel.precision
        if precision.mode == "none" and not self.rep_grad:  # float32: no context, no casts
            return self.model(inputs, **kwargs), None
        with precision.autocast():  # outputs back in float32 for the losses
            if self.rep_grad:
                outputs, z = self.model(inputs, return_features=True, **kwargs)
                return precision.outputs(outputs), z
            return precision.outputs(self.model(inputs, **kwargs)), None

    def _add_auxiliary(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the model's per-task auxiliary terms (``model.auxiliary_losses()``, e.g.
        DSelect-k's gate entropy regulariser) to the task losses computed, so that they are
        optimised."""
        extra = model_hook(self.model, "auxiliary_losses")
        if not extra:
            return losses
        unknown = sorted(set(extra) - set(self.by_name))
        if unknown:
            raise MtlkitError(
                f"{type(self.model).__name__}.auxiliary_losses() names unknown task(s) {unknown}; "
                f"tasks: {self.names}"
            )
        return {t: loss + extra[t] if t in extra else loss for t, loss in losses.items()}
