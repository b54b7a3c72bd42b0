"""Per-task gradients: the Jacobian ``[m, n]`` of m scalar losses and its Gramian ``J Jᵀ``.

``jacobian(losses, inputs)`` stacks the gradients of m scalar losses w.r.t. a list of tensors
(flattened and concatenated in order) into a ``[m, n]`` matrix; ``gramian`` returns ``J Jᵀ``.

Routes: a loop of ``torch.autograd.grad`` calls, one per task, or one batched backward
(``is_grads_batched``, vmap over the cotangents). ``route="auto"`` takes the route measured
fastest on every model benchmarked so far (:func:`choose_route`: the loop;
``benchmarks/bench_engine.py`` re-measures both side by side).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

Route = Literal["auto", "loop", "batched"]
Losses = Sequence[Tensor] | Tensor
Inputs = Tensor | Iterable[Tensor]


def loss_list(losses: Losses) -> list[Tensor]:
    """The task losses as a list of scalar tensors (checked).

    A Jacobian row is taken from each scalar itself, not from a stacked tensor: differentiating
    ``torch.stack(losses)[i]`` would send zero cotangents through every other task's graph, which
    makes a loop over m tasks cost m² head backwards. So pass a list where you can; a ``[m]``
    tensor is accepted (and unbound), at that cost.
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(f"losses must be a 1-D tensor [m], got shape {tuple(losses.shape)}")
        return list(losses.unbind())
    losses = list(losses)
    if not losses:
        raise ValueError("losses is empty: give one scalar loss per task")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss {i} must be a scalar tensor, got {shape}")
    return [loss if loss.dim() == 0 else loss.reshape(()) for loss in losses]


def as_tensor_list(inputs: Inputs, what: str) -> list[Tensor]:
    tensors = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if not tensors:
        raise ValueError(f"{what} is empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, expected a tensor")
        if not t.requires_grad:
            raise ValueError(f"{what}[{i}] (shape {tuple(t.shape)}) does not require grad")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise ValueError(f"{what} mix dtypes {sorted(map(str, dtypes))}; use one dtype")
    return tensors


def _rows_per_chunk(m: int, n: int, itemsize: int, max_memory: int | None) -> int:
    """How many Jacobian rows a batched backward may compute at once under ``max_memory``."""
    if max_memory is None:
        return m
    if max_memory <= 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}")
    return max(1, min(m, max_memory // max(1, n * itemsize)))


def graph_leaves(losses: Tensor) -> list[Tensor]:
    """The leaf tensors (``requires_grad``, no ``grad_fn``) that ``losses`` depends on, in a
    deterministic order: those ``Tensor.backward`` would accumulate ``.grad`` into."""
    leaves: dict[int, Tensor] = {}
    seen: set[object] = set()
    stack = [losses.grad_fn] if losses.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.setdefault(id(variable), variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return list(leaves.values())


def choose_route(num_tasks: int, n: int) -> Literal["loop", "batched"]:
    """The measured-fastest route: the loop, for every model measured with torch 2.13 on
    2 CPU cores (``benchmarks/bench_engine.py``): batched ÷ loop was 0.99-1.14 for an MLP
    784-512-512-256 at m = 2-10 tasks and 1.75 at m = 40, 1.07-1.9 for a 3-layer CNN, because
    the batched route runs the losses' backward kernels through slow vmap fallbacks."""
    del num_tasks, n
    return "loop"


def jacobian(
    losses: Losses,
    inputs: Inputs,
    *,
    route: Route = "auto",
    max_memory: int | None = None,
    retain_graph: bool = True,
) -> Tensor:
    """The Jacobian ``[m, n]`` of m scalar losses w.r.t. ``inputs``.

    Row ``i`` is the gradient of ``losses[i]`` w.r.t. all inputs, flattened and concatenated in
    order. Inputs that a loss does not reach get zeros.

    Args:
        losses: m scalar tensors, or a ``[m]`` tensor.
        inputs: tensors that require grad (parameters or intermediate features).
        route: ``"loop"`` (one ``autograd.grad`` per loss), ``"batched"`` (``is_grads_batched``)
            or ``"auto"``: the loop, the route measured fastest offline on every model
            benchmarked (:func:`choose_route`); nothing is timed here. (The Trainer's
            ``route="auto"`` measures the loop against the Gramian route on the run's first
            steps: :mod:`mtlkit.training.route_choice`.)
        max_memory: bytes the batched route may use for the rows it computes at once; it then
            splits the tasks into chunks. ``None``: no cap.
        retain_graph: keep the graph for a later backward (default true).
    """
    scalars = loss_list(losses)
    tensors = as_tensor_list(inputs, "inputs")
    m, n = len(scalars), sum(t.numel() for t in tensors)
    if route == "auto":
        route = choose_route(m, n)
    if route not in ("loop", "batched"):
        raise ValueError(f"unknown route {route!r}; valid routes: auto, loop, batched")
    out = torch.empty(m, n, dtype=tensors[0].dtype, device=tensors[0].device)
    if route == "loop":
        for i in range(m):
            keep = retain_graph or i < m - 1
            grads = torch.autograd.grad(scalars[i], tensors, retain_graph=keep, allow_unused=True)
            _write_rows(out[i : i + 1], grads, tensors)
        return out
    chunk = _rows_per_chunk(m, n, out.element_size(), max_memory)
    stacked = torch.stack(scalars)
    eye = torch.eye(m, dtype=stacked.dtype, device=stacked.device)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        keep = retain_graph or stop < m
        grads = torch.autograd.grad(
            stacked,
            tensors,
            grad_outputs=eye[start:stop],
            retain_graph=keep,
            allow_unused=True,
            is_grads_batched=True,
        )
        _write_rows(out[start:stop], grads, tensors)
    return out


def _write_rows(rows: Tensor, grads: Sequence[Tensor | None], tensors: Sequence[Tensor]) -> None:
    """Copy per-input gradients (each ``[k, *shape]`` or ``[*shape]``) into ``rows [k, n]``."""
    offset = 0
    for grad, tensor in zip(grads, tensors):
        size = tensor.numel()
        block = rows[:, offset : offset + size]
        if grad is None:
            block.zero_()
        else:
            block.copy_(grad.reshape(rows.shape[0], size))
        offset += size


def gramian(
    losses: Losses,
    inputs: Inputs,
    *,
    route: Route = "auto",
    max_memory: int | None = None,
    retain_graph: bool = True,
) -> Tensor:
    """The Gramian ``J Jᵀ`` (``[m, m]``) of the Jacobian of ``losses`` w.r.t. ``inputs``."""
    jac = jacobian(losses, inputs, route=route, max_memory=max_memory, retain_graph=retain_graph)
    return jac @ jac.T
