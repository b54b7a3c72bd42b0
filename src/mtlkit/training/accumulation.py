"""Gradient accumulation: one optimizer step over ``k`` micro-batches of a batch.

**Accumulation** (``accumulate=k``): a batch is cut into ``k`` micro-batches (:func:`accumulate`).
Gradient aggregators accumulate the per-task Jacobians (w.r.t. the shared parameters and the
heads: ``Σ_j (b_j/b) J_j``) and aggregate **once**, on the Jacobian of the whole batch; loss
weightings are called once per micro-batch and the gradients of ``Σ w_i L_i`` are averaged
(weights per micro-batch: exact when the weights do not depend on the current losses, e.g. EW,
LS, UW, IMTL-L, DWA; otherwise the weights of micro-batch losses).

:func:`check_parallel` refuses the method x (accumulation, DDP, loss scaling, Gramian route)
combinations that cannot be exact, before training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.engine.jacobian import graph_leaves, jacobian
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods.base import Method
from mtlkit.training.forward import ComputeLosses, ForwardResult
from mtlkit.training.nonfinite import Outcome


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` cut into ``min(parts, smallest first dimension)`` micro-batches along the first
    dimension of every tensor (sizes differ by at most one)."""
    sizes = [t.shape[0] for t in _tensors(batch) if t.dim() > 0]
    if not sizes:
        raise MtlkitError("cannot split a batch that holds no tensor with a batch dimension")
    count = max(1, min(parts, min(sizes)))

    def split(value: Any) -> list[Any]:
        if isinstance(value, Tensor):
            return list(torch.tensor_split(value, count)) if value.dim() > 0 else [value] * count
        if isinstance(value, Mapping):
            pieces = {k: split(v) for k, v in value.items()}
            return [{k: pieces[k][j] for k in value} for j in range(count)]
        if isinstance(value, (list, tuple)):
            pieces = [split(v) for v in value]
            return [type(value)(p[j] for p in pieces) for j in range(count)]
        return [value] * count

    return split(batch)


def _task_size(part: Any, task: str) -> int:
    """The number of samples of ``task`` in a micro-batch (its own entry for multi-input)."""
    source = part[task] if isinstance(part, Mapping) and task in part else part
    for tensor in _tensors(source):
        if tensor.dim() > 0:
            return int(tensor.shape[0])
    raise MtlkitError(f"no tensor with a batch dimension for task {task!r} in the batch")


def _scale_grads(tensors: Iterable[Tensor], factor: float) -> None:
    if factor == 1.0:
        return
    for tensor in tensors:
        if tensor.grad is not None:
            tensor.grad.mul_(factor)


Update = Callable[..., Outcome]


def accumulate(
    batch: Any,
    tasks: Sequence[str],
    method: Method,
    shared: Sequence[nn.Parameter],
    parameters: Sequence[nn.Parameter],
    context: Any,
    compute_losses: ComputeLosses,
    update: Update,
) -> tuple[ForwardResult, dict[str, float], int, Any]:
    """Forward and backward of one optimizer step over ``context.accumulate`` micro-batches of
    ``batch`` (see the module docstring); fills ``.grad`` like one backward on the whole batch.

    Args:
        parameters: the parameters the step updates (their ``.grad`` is rescaled).
        context: the :class:`~mtlkit.training.step.StepEnvironment` of the run.
        update: the step driver's ``method_update`` (one backward of a method over ``tasks``).

    Returns:
        The task losses of the whole batch (the micro-batches' weighted by their sizes), the task
        weights (likewise averaged, or the aggregator's), the backward passes through the shared
        part of the model, and the method's solver status (the last one).
    """
    parts = split_batch(batch, context.accumulate)
    sizes = torch.tensor([[_task_size(p, t) for t in tasks] for p in parts], dtype=torch.float64)
    fractions = sizes / sizes.sum(dim=0)  # [micro-batches, tasks]
    if method.kind == "gradient":
        losses, weights, backwards, status = _accumulate_jacobians(
            parts, fractions, tasks, method, shared, context, compute_losses, update
        )
    else:
        params = [*parameters, *method.parameters()]
        losses, weights, backwards, status = _accumulate_weighted(
            parts, fractions, tasks, method, shared, params, context, compute_losses, update
        )
    return ForwardResult(dict(zip(tasks, losses.unbind()))), weights, backwards, status


def _accumulate_weighted(
    parts: list[Any],
    fractions: Tensor,
    tasks: Sequence[str],
    method: Method,
    shared: Sequence[nn.Parameter],
    params: Sequence[nn.Parameter],
    context: Any,
    compute_losses: ComputeLosses,
    update: Update,
) -> tuple[Tensor, dict[str, float], int, Any]:
    """Loss weightings: one backward per micro-batch; ``.grad`` ends as ``Σ_j (b_j/b) g_j``."""
    shares = fractions[:, 0]
    if not torch.allclose(fractions, shares[:, None]):
        raise MtlkitError(
            f"accumulate={context.accumulate}: the tasks' batches do not split into micro-batches "
            "of the same proportions (multi-input batches of sizes not divisible by accumulate); "
            "use batch sizes divisible by accumulate"
        )
    losses = torch.zeros(len(tasks), dtype=torch.float64)
    weights: dict[str, float] = {}
    backwards, previous, status = 0, None, None
    for part, share in zip(parts, shares.tolist()):
        if previous is not None:
            _scale_grads(params, previous / share)  # .grad holds Σ_{i<j} c_i g_i / c_j
        result = compute_losses(part)
        named, passes, status = update(result, tasks, method, shared, context, compute_losses)
        losses += share * result.stacked(tasks).detach().cpu().to(torch.float64)
        for task, value in named.items():
            weights[task] = weights.get(task, 0.0) + share * value
        backwards += passes
        previous = share
    _scale_grads(params, previous)
    return losses, weights, backwards, status


def _accumulate_jacobians(
    parts: list[Any],
    fractions: Tensor,
    tasks: Sequence[str],
    method: Method,
    shared: Sequence[nn.Parameter],
    context: Any,
    compute_losses: ComputeLosses,
    update: Update,
) -> tuple[Tensor, dict[str, float], int, Any]:
    """Gradient aggregators: the per-task Jacobian of the whole batch w.r.t. the shared
    parameters and the other leaves (heads), ``Σ_j (b_j/b) J_j``, then one aggregation."""
    shared = list(shared)
    shared_ids = {id(p) for p in shared}
    leaves: list[Tensor] | None = None
    total: Tensor | None = None
    losses = torch.zeros(len(tasks), dtype=torch.float64)
    for part, share in zip(parts, fractions):
        result = compute_losses(part)
        scalars = result.loss_list(tasks)
        if leaves is None:
            others = graph_leaves(torch.stack(scalars))
            leaves = shared + [leaf for leaf in others if id(leaf) not in shared_ids]
        jac = jacobian(scalars, leaves, route=context.jacobian_route, retain_graph=False)
        jac.mul_(share.to(jac)[:, None])
        total = jac if total is None else total.add_(jac)
        losses += share * torch.stack([s.detach() for s in scalars]).cpu().to(torch.float64)
    assert total is not None and leaves is not None
    # Linear surrogate losses: the values of the batch's losses, the Jacobian ``total``.
    flat = torch.cat([leaf.reshape(-1) for leaf in leaves])
    delta = flat - flat.detach()  # zeros, with the leaves' graph
    values = losses.to(total)
    surrogate = {t: values[i] + total[i] @ delta for i, t in enumerate(tasks)}
    surrogates = ForwardResult(surrogate)
    weights, _, status = update(surrogates, tasks, method, shared, context, compute_losses)
    return losses, weights, len(parts) * len(tasks), status


def check_parallel(method: Method, context: Any) -> None:
    """Reject method x (accumulation, DDP, loss scaling) combinations that cannot be exact."""
    name = type(method).__name__
    if getattr(context, "accumulate", 1) > 1:
        if method.needs_probe or method.extra_batches or method.needs_losses_after:
            raise ConfigError(
                f"{name} cannot use accumulate > 1: it evaluates the losses of the step's batch "
                "itself (extra batches, a probe, or the losses after the step), which "
                "micro-batches would change; use accumulate=1"
            )
        if method.kind == "gradient" and context.rep_grad:
            raise ConfigError(
                f"{name} with rep_grad cannot use accumulate > 1: the direction for each "
                "micro-batch's features depends on every micro-batch's feature Jacobian, so all "
                "their graphs would have to be kept; use the parameter route (rep_grad=false)"
            )
    reducer = getattr(context, "reducer", None)
    if getattr(context, "route", None) == "gramian" and method.kind == "gradient":
        if reducer is not None and not reducer.passthrough:
            what = "DDP" if reducer.distributed else "a loss scaler (amp=fp16)"
            raise ConfigError(
                f"route=gramian cannot run under {what}: the Gramian of the global batch, "
                "(1/N²) Σ_r Σ_s J_r J_sᵀ, has cross terms between the processes' Jacobians J_r "
                "that the local Gramians lack (and the engine's Gramian carries the loss scale "
                "squared); use route=auto, loop or batched (the per-task Jacobian is all-reduced "
                "before the method) or rep_grad=true (the features route: the local Gramians "
                "add, one m x m all-reduce)"
            )
        if getattr(context, "accumulate", 1) > 1:
            raise ConfigError(
                "route=gramian cannot accumulate micro-batches (the Gramian of the whole batch is "
                "not the sum of the micro-batches' Gramians); use route=auto"
            )
    scaled = reducer is not None and (reducer.distributed or reducer.scaler is not None)
    if scaled and method.needs_probe:
        raise ConfigError(
            f"{name} takes virtual steps with its own backward passes, which are neither "
            "reduced across processes nor loss-scaled: it cannot run under DDP or amp=fp16"
        )
