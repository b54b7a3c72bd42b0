"""Hugging Face Transformers: multi-loss fine-tuning with ``transformers.Trainer``.

:class:`MultiTaskTrainer` is a ``transformers.Trainer`` whose ``training_step`` runs one mtlkit
method step (:func:`mtlkit.training.step.method_step`, the driver of :class:`mtlkit.Step`) for a
model with several heads and losses; by default on the **features route**, w.r.t. the pooled
representation that the heads share (the Jacobian is ``[m, batch x hidden]`` and only the heads
are differentiated ``m`` times)::

    from transformers import BertConfig, BertModel, TrainingArguments
    from mtlkit import methods
    from mtlkit.integrations.transformers import MultiHeadModel, MultiTaskTrainer

    model = MultiHeadModel(
        BertModel(BertConfig(...)),
        heads={"sentiment": nn.Linear(h, 3), "score": nn.Linear(h, 1)},
        losses={"sentiment": nn.functional.cross_entropy, "score": mse},
    )
    trainer = MultiTaskTrainer(
        model=model, args=TrainingArguments("out", ...), train_dataset=data,
        method=methods.UPGrad(), tasks=["sentiment", "score"],
    )
    trainer.train()

The model's forward returns a mapping with ``"losses"`` (``{task: scalar}``) and, on the
features route, ``"features"`` (the shared representation); :class:`MultiHeadModel` does so
around any encoder whose output has ``pooler_output`` or ``last_hidden_state``. Another
contract: ``task_losses=fn(model, inputs)`` returning ``{task: loss}`` or a
:class:`mtlkit.ForwardResult`.

Each optimizer step is mtlkit's whole step protocol: ``before_step``, the forward pass (under
the Trainer's autocast), the method's backward, the ``on_nonfinite`` checks, the gradient
clipping of ``args.max_grad_norm`` (the norm before clipping is what ``grad_norm`` logs), the
optimizer step, ``after_step`` (FAMO's losses after the step); ``on_epoch_end`` at the end of
each epoch. The Trainer's own ``optimizer.step()`` that follows finds no gradient and moves
nothing; its learning-rate scheduler steps as usual. The method's state is saved in each
checkpoint folder (``mtlkit_method.pt``) and restored by ``train(resume_from_checkpoint=...)``.
The logs gain ``loss/<task>`` and ``weight/<task>`` of the last step.

Refused with a :class:`~mtlkit.errors.ConfigError`: ``gradient_accumulation_steps > 1`` (summed
aggregated micro-batch directions are not the method's direction on the accumulated batch; use a
larger batch), ``fp16`` (the loss scaler sits inside a backward that mtlkit takes itself; bf16
works), and more than one process or GPU (DDP/DataParallel: use
:mod:`mtlkit.integrations.lightning` or mtlkit's Trainer under ``torchrun``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.engine.backward import StepRoute
from mtlkit.errors import ConfigError
from mtlkit.integrations import require
from mtlkit.methods import Method
from mtlkit.methods import get as get_method
from mtlkit.training.forward import ForwardResult, as_forward_result
from mtlkit.training.step import StepEnvironment, StepResult, check_method, method_step

__all__ = ["METHOD_FILE", "MultiHeadModel", "MultiTaskTrainer", "MultiTaskTrainerMixin"]  # noqa: F822

METHOD_FILE = "mtlkit_method.pt"
"""The file of a checkpoint folder that holds the method's state and the step counter."""

_POOLINGS = ("pooler", "cls", "mean")


class MultiHeadModel(nn.Module):
    """An encoder (a ``transformers`` model such as ``BertModel``) with one head and loss per
    task on its pooled representation.

    ``forward(**inputs)`` takes the encoder's inputs and each task's targets under the task's
    name; it returns ``{"loss": Σ losses, "losses": {task: loss}, "features": pooled,
    "logits": {task: head output}}`` (targets absent: ``logits`` and ``features`` only).

    Args:
        encoder: the shared model; its output has ``pooler_output`` or ``last_hidden_state``.
        heads: ``{task: module}`` on the pooled ``[batch, hidden]`` representation.
        losses: ``{task: fn(head output, target) -> scalar}``; a one-output head's output is
            squeezed to ``[batch]`` first.
        pooling: ``"pooler"`` (the encoder's ``pooler_output``), ``"cls"`` (the first token's
            hidden state) or ``"mean"`` (the mean over the tokens the attention mask keeps).
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        losses: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
        pooling: str = "pooler",
    ) -> None:
        super().__init__()
        if set(heads) != set(losses) or not heads:
            raise ConfigError(
                f"heads and losses must name the same tasks; got {sorted(heads)} and "
                f"{sorted(losses)}"
            )
        if pooling not in _POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(_POOLINGS)}; got {pooling!r}")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.loss_fns = dict(losses)
        self.pooling = pooling

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def pool(self, output: Any, attention_mask: Tensor | None) -> Tensor:
        if self.pooling == "pooler":
            pooled = getattr(output, "pooler_output", None)
            if pooled is None:
                raise ConfigError(
                    f"{type(self.encoder).__name__} gives no pooler_output: use pooling='cls' "
                    "or 'mean'"
                )
            return pooled
        hidden = output.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, **inputs: Any) -> dict[str, Any]:
        targets = {t: inputs.pop(t) for t in self.tasks if t in inputs}
        output = self.encoder(**inputs)
        pooled = self.pool(output, inputs.get("attention_mask"))
        logits = {t: head(pooled) for t, head in self.heads.items()}
        result: dict[str, Any] = {"features": pooled, "logits": logits}
        if targets:
            losses = {}
            for task, target in targets.items():
                out = logits[task]
                out = out.squeeze(-1) if out.dim() == 2 and out.shape[1] == 1 else out
                losses[task] = self.loss_fns[task](out, target)
            result["losses"] = losses
            result["loss"] = torch.stack(list(losses.values())).sum()
        return result


def _model_losses(model: nn.Module, inputs: Mapping[str, Any]) -> ForwardResult:
    """The default contract: ``model(**inputs)`` returns ``losses`` and ``features``."""
    outputs = model(**inputs)
    try:
        losses = outputs["losses"]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{type(model).__name__}(**inputs) must return a mapping with 'losses' ({{task: "
            "loss}}) and 'features' (the shared representation), as MultiHeadModel does, or "
            "give MultiTaskTrainer(task_losses=fn(model, inputs))"
        ) from None
    features = outputs.get("features") if isinstance(outputs, Mapping) else None
    return ForwardResult(dict(losses), features)


class MultiTaskTrainerMixin:
    """The mtlkit part of :class:`MultiTaskTrainer` (mixed before ``transformers.Trainer``).

    Args:
        method: a mtlkit method or its registered name.
        tasks: the task names, in the order the method sees them.
        features: the features route (default): the model returns the shared representation
            under ``"features"``; ``False``: the parameter route, w.r.t. ``shared``.
        shared: the shared parameters (the parameter route of a gradient aggregator).
        task_losses: ``fn(model, inputs) -> {task: loss} | ForwardResult`` (default: the
            model's ``losses`` and ``features`` outputs).
        route: the Jacobian route (``auto``, ``loop``, ``batched``).
        on_nonfinite: ``raise``, ``skip_step`` or ``skip_task``.
        *args, **kwargs: the ``transformers.Trainer`` arguments.
    """

    def __init__(
        self,
        *args: Any,
        method: Method | str,
        tasks: Iterable[str],
        features: bool = True,
        shared: Iterable[nn.Parameter] | None = None,
        task_losses: Callable[[nn.Module, Any], Any] | None = None,
        route: StepRoute = "auto",
        on_nonfinite: str = "raise",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        training = self.args  # type: ignore[attr-defined]
        if training.gradient_accumulation_steps != 1:
            raise ConfigError(
                f"gradient_accumulation_steps={training.gradient_accumulation_steps}: the "
                "method's direction on an accumulated batch is not the sum of its directions on "
                "the micro-batches; use gradient_accumulation_steps=1 and a larger batch"
            )
        if training.fp16:
            raise ConfigError("fp16 needs a loss scaler inside mtlkit's backward: use bf16=True")
        if training.world_size > 1 or training.n_gpu > 1:
            raise ConfigError(
                f"MultiTaskTrainer runs in one process on one device (world_size="
                f"{training.world_size}, n_gpu={training.n_gpu}); for DDP use "
                "mtlkit.integrations.lightning or mtlkit's Trainer under torchrun"
            )
        if isinstance(self.model, MultiHeadModel) and training.remove_unused_columns:  # type: ignore[attr-defined]
            raise ConfigError(
                "MultiHeadModel.forward takes **inputs (the encoder's inputs and each task's "
                "targets under its name), so the Trainer cannot tell the columns it uses: give "
                "TrainingArguments(remove_unused_columns=False)"
            )
        method = get_method(method) if isinstance(method, str) else method
        if not isinstance(method, Method):
            raise ConfigError(f"method must be a mtlkit method; got {type(method).__name__}")
        self.mtl_tasks = [str(t) for t in tasks]
        if not self.mtl_tasks or len(set(self.mtl_tasks)) != len(self.mtl_tasks):
            raise ConfigError(f"tasks must be distinct names, at least one; got {self.mtl_tasks}")
        self.mtl_shared = [] if shared is None else list(shared)
        if method.kind == "gradient" and not features and not self.mtl_shared:
            raise ConfigError(
                f"{type(method).__name__} on the parameter route (features=False) needs "
                "shared=<the encoder's parameters>"
            )
        self.mtl_method = method
        self.mtl_task_losses = task_losses or _model_losses
        self.mtl_environment = StepEnvironment(
            rep_grad=bool(features),
            route=route,
            on_nonfinite=on_nonfinite,
            draw_batches=self._mtl_draw,
            optimizer_step=self._mtl_optimizer_step,
        )
        check_method(method, self.mtl_environment)
        method.setup(len(self.mtl_tasks))
        method.to(training.device)
        self.mtl_last: StepResult | None = None
        self.mtl_epoch = 0
        self._mtl_grad_norm: float | None = None
        self._mtl_extra: Iterator[Any] | None = None
        self.add_callback(_callback_class()(self))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ Trainer hooks
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the method's learnable parameters (UW's) as a group of
        their own, without weight decay."""
        optimizer = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        _add_method_parameters(optimizer, self.mtl_method)
        return optimizer

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Tensor:
        """One mtlkit method step on ``inputs`` (the Trainer's own step then finds no gradient)."""
        model.train()
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # type: ignore[attr-defined]
        _add_method_parameters(optimizer, self.mtl_method)  # an optimizer given to __init__
        shared_ids = {id(p) for p in self.mtl_shared}
        held = [p for group in optimizer.param_groups for p in group["params"]]
        parameters = self.mtl_shared + [p for p in held if id(p) not in shared_ids]
        self.mtl_last = method_step(
            self.mtl_method,
            optimizer,
            inputs,
            lambda batch: self._mtl_compute(model, batch),
            tasks=self.mtl_tasks,
            shared=self.mtl_shared,
            parameters=parameters,
            index=self.state.global_step,  # type: ignore[attr-defined]
            environment=self.mtl_environment,
        )
        total = sum(self.mtl_last.losses.values())
        return torch.tensor(total, device=self.args.device)  # type: ignore[attr-defined]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's logs, with each task's loss and weight of the last step and the norm
        mtlkit's step clipped (the Trainer's own clipping finds no gradient)."""
        if self.mtl_last is not None and "loss" in logs:
            logs.update({f"loss/{t}": v for t, v in self.mtl_last.losses.items()})
            logs.update({f"weight/{t}": v for t, v in self.mtl_last.weights.items()})
            if "grad_norm" in logs and self._mtl_grad_norm is not None:
                logs["grad_norm"] = self._mtl_grad_norm
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                from transformers.trainer_utils import get_last_checkpoint

                folder = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            path = Path(str(folder)) / METHOD_FILE
            if path.exists():
                state = torch.load(path, map_location="cpu", weights_only=False)
                self.mtl_method.load_state_dict(state["method"])
                self.mtl_environment.guard.load_state_dict(state["guard"])
                self.mtl_epoch = int(state["epoch"])
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ mtlkit's part
    def _mtl_compute(self, model: nn.Module, inputs: Any) -> ForwardResult:
        with self.compute_loss_context_manager():  # type: ignore[attr-defined]
            value = self.mtl_task_losses(model, inputs)
        result = as_forward_result(value, self.mtl_tasks)
        if self.mtl_environment.rep_grad and result.features is None:
            raise ConfigError(
                "features=True: the model must return the shared representation under "
                "'features' (or task_losses a mtlkit.ForwardResult with features=)"
            )
        return result

    def _mtl_optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.args.max_grad_norm  # type: ignore[attr-defined]
        if limit is not None and limit > 0:
            self._mtl_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the Trainer's optimizer.step() moves nothing
        return True

    def _mtl_draw(self, count: int) -> list[Any]:
        """Training batches independent of the current one (a second pass over the training
        loader), for methods with extra batches or virtual steps."""
        batches = []
        for _ in range(count):
            if self._mtl_extra is None:
                self._mtl_extra = iter(self.get_train_dataloader())  # type: ignore[attr-defined]
            try:
                batch = next(self._mtl_extra)
            except StopIteration:
                self._mtl_extra = iter(self.get_train_dataloader())  # type: ignore[attr-defined]
                batch = next(self._mtl_extra)
            batches.append(self._prepare_inputs(batch))  # type: ignore[attr-defined]
        return batches

    def mtl_end_epoch(self) -> None:
        """The end of a training epoch: the weights are checked, then the method's hook."""
        self.mtl_environment.guard.check_weights()
        self.mtl_method.on_epoch_end(self.mtl_epoch)
        self.mtl_epoch += 1

    def mtl_save(self, folder: Path) -> None:
        state = {
            "method": self.mtl_method.state_dict(),
            "guard": self.mtl_environment.guard.state_dict(),
            "epoch": self.mtl_epoch,
        }
        torch.save(state, folder / METHOD_FILE)


def _add_method_parameters(optimizer: torch.optim.Optimizer, method: Method) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    own = [p for p in method.parameters() if id(p) not in held]
    if own:
        optimizer.add_param_group({"params": own, "weight_decay": 0.0})


def _callback_class() -> type:
    """A ``TrainerCallback`` that runs the method's epoch hook and saves its state."""
    transformers = require("transformers", "transformers", "mtlkit.integrations.transformers")

    class _MethodHooks(transformers.TrainerCallback):
        def __init__(self, trainer: MultiTaskTrainerMixin) -> None:
            self.trainer = trainer

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.trainer.mtl_end_epoch()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                self.trainer.mtl_save(folder)

    return _MethodHooks


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """``MultiTaskTrainer`` is built on first use, so that this module imports without
    ``transformers`` (then the access raises an error naming the extra)."""
    if name != "MultiTaskTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        transformers = require("transformers", "transformers", "mtlkit.integrations.transformers")
        _BUILT[name] = type(
            "MultiTaskTrainer",
            (MultiTaskTrainerMixin, transformers.Trainer),
            {
                "__doc__": "``transformers.Trainer`` with mtlkit's method step (module docstring;"
                " arguments: :class:`MultiTaskTrainerMixin`).",
                "__module__": __name__,
            },
        )
    return _BUILT[name]
