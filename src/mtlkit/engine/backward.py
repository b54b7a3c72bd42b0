"""Per-task gradients: the Jacobian and Gramian of task losses, and the multi-task ``backward``.

``jacobian(losses, inputs)`` stacks the gradients of m scalar losses w.r.t. a list of tensors
(flattened and concatenated in order) into a ``[m, n]`` matrix; ``gramian`` returns ``J Jᵀ``.
``backward(losses, shared, method)`` fills ``.grad`` like ``Tensor.backward``: the shared
tensors receive the method's combined direction, every other leaf the gradient of
``Σ_i w_i L_i`` (``w`` the method's task weights where it has them, 1 otherwise). With
``features=z`` the Jacobian is taken w.r.t. the shared representation ``z`` instead (the
"rep_grad" of LibMTL): much cheaper, since only the task heads are differentiated m times.

Routes for the Jacobian: a loop of ``torch.autograd.grad`` calls, one per task, or one batched
backward (``is_grads_batched``, vmap over the cotangents). ``route="auto"`` picks by measurement
(:func:`choose_route`; ``benchmarks/bench_engine.py`` re-measures both side by side).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mtlkit.engine.layer_capture import LayerCapture
from mtlkit.errors import NonFiniteError
from mtlkit.methods.base import GradientAggregator, GramianWeighting, LossWeighting, Method

if TYPE_CHECKING:
    from mtlkit.parallel.ddp import Reducer

Route = Literal["auto", "loop", "batched"]
StepRoute = Literal["auto", "loop", "batched", "gramian"]
"""Routes of a training step: the Jacobian routes, or ``"gramian"`` (the layer-wise Gramian of
:mod:`mtlkit.engine.layer_capture`, for Gramian weightings on the parameter route)."""
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


def _as_list(inputs: Inputs, what: str) -> list[Tensor]:
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
            or ``"auto"`` (the measured-fastest for the graph).
        max_memory: bytes the batched route may use for the rows it computes at once; it then
            splits the tasks into chunks. ``None``: no cap.
        retain_graph: keep the graph for a later backward (default true).
    """
    scalars = loss_list(losses)
    tensors = _as_list(inputs, "inputs")
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


def check_finite(losses: Tensor) -> None:
    """Raise :class:`NonFiniteError` naming the first task whose loss is NaN or infinite."""
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise NonFiniteError(f"loss of task {bad} is {float(losses.detach()[bad])}")


def backward(
    losses: Losses,
    shared: Inputs | None = None,
    method: Method | None = None,
    features: Inputs | None = None,
    *,
    route: Route = "auto",
    max_memory: int | None = None,
    retain_graph: bool = False,
    capture: LayerCapture | None = None,
    reducer: Reducer | None = None,
) -> Tensor | None:
    """Multi-task backward: fill ``.grad`` (accumulating, like ``Tensor.backward``).

    * A loss weighting (or ``method=None``, equal weights): one backward of
      ``Σ_i w_i L_i (+ extra)``; every leaf, the method's own parameters included, gets its
      gradient. ``shared`` and ``features`` are not needed.
    * A gradient aggregator, parameter route: the Jacobian ``J`` w.r.t. ``shared`` is combined
      into a direction ``d = method(J)``, added to the shared tensors' ``.grad``; every other
      leaf gets the gradient of ``Σ_i w_i L_i``, with ``w`` the method's weights (``d = w @ J``)
      or ones when the method has none.
    * A gradient aggregator with ``features=z``: the Jacobian is taken w.r.t. ``z`` and the
      combined direction flows back through the encoder in the same pass that gives the heads
      the gradient of ``Σ_i w_i L_i``.
    * A Gramian weighting with ``capture=`` (a :class:`~mtlkit.engine.layer_capture.LayerCapture` on
      the shared layers, registered before the forward): the Gramian ``J Jᵀ`` is formed layer by
      layer from activations, ``J`` never exists, and the update is one backward of
      ``Σ_i w_i L_i`` (the Gramian route; cheapest on the parameter route).

    Args:
        losses: m scalar task losses (or a ``[m]`` tensor).
        shared: the shared parameters (parameter route of a gradient aggregator).
        method: a :class:`~mtlkit.methods.Method`; ``None`` means equal weights (sum).
        features: the shared representation(s) (the encoder's output); multi-input models give
            one tensor per task.
        route, max_memory: see :func:`jacobian`.
        retain_graph: keep the graph after the backward.
        capture: the layer capture of the Gramian route (parameter route only; the method must
            be a :class:`~mtlkit.methods.GramianWeighting`).
        reducer: data parallelism and loss scaling (:class:`mtlkit.parallel.ddp.Reducer`): the
            Jacobian is unscaled and reduced across processes before the aggregator runs (not
            with ``capture=`` unless it is a pass-through (bf16 in one process): the
            parameter-route Gramian needs the all-reduced Jacobian).

    Returns:
        The task weights the method used (detached, ``[m]``), or ``None`` for an aggregator
        that has no weights.
    """
    scalars = loss_list(losses)
    stacked = torch.stack(scalars)
    check_finite(stacked)
    if method is None or isinstance(method, LossWeighting):
        if method is None:
            weights = torch.ones_like(stacked).detach()
            total = stacked.sum()
        else:
            decision = method(stacked)
            weights, total = decision.weights, decision.total(stacked)
        total.backward(retain_graph=retain_graph)
        return weights.detach()
    if not isinstance(method, GradientAggregator):
        raise TypeError(f"method must be a LossWeighting or a GradientAggregator, got {method!r}")
    if capture is not None:
        if reducer is not None and not reducer.passthrough:
            raise ValueError(
                "capture= (the Gramian route) cannot take a reducer that reduces or unscales "
                "(DDP or fp16 loss scaling): the Gramian of the global batch has cross terms "
                "between processes that only the all-reduced Jacobian gives; use the Jacobian "
                "route (route=auto, loop or batched) or the features route"
            )
        if not isinstance(method, GramianWeighting) or features is not None or shared is None:
            raise ValueError(
                "capture= (the Gramian route) needs a GramianWeighting method on the parameter "
                f"route (shared=..., no features=); got {type(method).__name__}"
                + (" with features" if features is not None else "")
                + (" without shared" if shared is None else "")
            )
        return _aggregate_gramian(scalars, shared, method, capture, retain_graph)
    if features is not None:
        return _aggregate_features(
            scalars, features, method, route, max_memory, retain_graph, reducer
        )
    if shared is None:
        raise ValueError(
            f"{type(method).__name__} aggregates gradients: give shared=<the shared parameters> "
            "or features=<the shared representation>"
        )
    return _aggregate_shared(scalars, shared, method, route, max_memory, retain_graph, reducer)


def _aggregate_shared(
    scalars: list[Tensor],
    shared: Inputs,
    method: GradientAggregator,
    route: Route,
    max_memory: int | None,
    retain_graph: bool,
    reducer: Reducer | None = None,
) -> Tensor | None:
    losses = torch.stack(scalars)
    params = _as_list(shared, "shared")
    shared_ids = {id(p) for p in params}
    others = [leaf for leaf in graph_leaves(losses) if id(leaf) not in shared_ids]
    jac = jacobian(scalars, params, route=route, max_memory=max_memory, retain_graph=True)
    method.last_weights = method.head_weights = None
    direction = _direction(method, jac, losses.detach(), params, reducer, features=False)
    weights = method.last_weights
    if others:
        combine, _ = _head_weights(method, losses)
        torch.autograd.backward(
            (combine.detach() * losses).sum(), inputs=others, retain_graph=retain_graph
        )
    _accumulate(params, direction)
    return None if weights is None else weights.detach()


def _aggregate_gramian(
    scalars: list[Tensor],
    shared: Inputs,
    method: GramianWeighting,
    capture: LayerCapture,
    retain_graph: bool,
) -> Tensor:
    losses = torch.stack(scalars)
    params = _as_list(shared, "shared")
    shared_ids = {id(p) for p in params}
    others = [leaf for leaf in graph_leaves(losses) if id(leaf) not in shared_ids]
    gradients = capture.task_gradients(scalars, params)
    method.last_weights = method.head_weights = None
    weights = method.weights(gradients.gramian, losses.detach()).to(losses.dtype).detach()
    method.last_weights = weights
    if others:
        combine, _ = _head_weights(method, losses)
        torch.autograd.backward((combine * losses).sum(), inputs=others, retain_graph=retain_graph)
    gradients.accumulate(weights)
    return weights


def _aggregate_features(
    scalars: list[Tensor],
    features: Inputs,
    method: GradientAggregator,
    route: Route,
    max_memory: int | None,
    retain_graph: bool,
    reducer: Reducer | None = None,
) -> Tensor | None:
    losses = torch.stack(scalars)
    reps = _as_list(features, "features")
    jac = jacobian(scalars, reps, route=route, max_memory=max_memory, retain_graph=True)
    method.last_weights = method.head_weights = None
    direction = _direction(method, jac, losses.detach(), reps, reducer, features=True)
    weights = method.last_weights
    combine, exact = _head_weights(method, losses)
    roots, grads = [(combine * losses).sum()], [None]
    if not exact:
        # The weighted sum sends Σ_i c_i J_i to z; add what makes it the method's direction.
        correction = direction - combine.to(jac.dtype) @ jac
        offset = 0
        for rep in reps:
            roots.append(rep)
            grads.append(correction[offset : offset + rep.numel()].view_as(rep))
            offset += rep.numel()
    torch.autograd.backward(roots, grad_tensors=grads, retain_graph=retain_graph)
    return None if weights is None else weights.detach()


def _head_weights(method: GradientAggregator, losses: Tensor) -> tuple[Tensor, bool]:
    """The weights of the task losses for the parameters that are not aggregated (the heads):
    the method's ``head_weights`` if it set them, else its ``last_weights`` (the direction's),
    else ones (``Σ_i ∇L_i``: each head gets its own task's gradient); and whether they are the
    direction's own weights."""
    if method.head_weights is not None:
        return method.head_weights.to(losses.dtype).detach(), False
    if method.last_weights is not None:
        return method.last_weights.to(losses.dtype).detach(), True
    return torch.ones_like(losses), False


def _direction(
    method: GradientAggregator,
    jac: Tensor,
    losses: Tensor,
    inputs: Sequence[Tensor],
    reducer: Reducer | None,
    features: bool,
) -> Tensor:
    """``method(jac)``, or with a ``reducer`` this process's part of the global batch's direction
    (:meth:`mtlkit.parallel.ddp.Reducer.aggregate`)."""
    if reducer is None:
        return method(jac, losses, blocks=[t.numel() for t in inputs])
    return reducer.aggregate(method, jac, losses, inputs, features=features)


def _accumulate(tensors: Sequence[Tensor], direction: Tensor) -> None:
    """Add slices of a flat ``direction`` to the ``.grad`` of ``tensors``."""
    offset = 0
    for tensor in tensors:
        piece = direction[offset : offset + tensor.numel()].view_as(tensor)
        offset += tensor.numel()
        if tensor.grad is None:
            tensor.grad = piece.detach().clone()
        else:
            tensor.grad.add_(piece)
