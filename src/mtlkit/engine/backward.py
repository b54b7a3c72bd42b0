"""The multi-task ``backward``: fill ``.grad`` from m task losses and a method.

``backward(losses, shared, method)`` fills ``.grad`` like ``Tensor.backward``: the shared
tensors receive the method's combined direction, every other leaf the gradient of
``Σ_i w_i L_i`` (``w`` the method's task weights where it has them, 1 otherwise). With
``features=z`` the Jacobian is taken w.r.t. the shared representation ``z`` instead (the
"rep_grad" of LibMTL): much cheaper, since only the task heads are differentiated m times.
With ``capture=`` (a :class:`~mtlkit.engine.layer_capture.LayerCapture`) a Gramian weighting
gets ``J Jᵀ`` layer by layer and ``J`` is never formed.

The method is known only by its contract (:mod:`mtlkit.engine.contract`); what it decided comes
back as a :class:`~mtlkit.engine.contract.Decision`. :func:`backward` is one call of the method:
it refuses a method that depends on more of the step protocol (hooks before or after the
optimizer step, extra batches, epoch ends), which :class:`mtlkit.Step` runs;
:func:`method_backward` is the same engine without that check, for the step driver.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.engine.contract import Decision, Reducer
from mtlkit.engine.jacobian import (
    Inputs,
    Losses,
    Route,
    as_tensor_list,
    graph_leaves,
    jacobian,
    loss_list,
)
from mtlkit.engine.layer_capture import LayerCapture
from mtlkit.errors import ConfigError, NonFiniteError

StepRoute = Literal["auto", "loop", "batched", "gramian"]
"""Routes of a training step: the Jacobian routes, or ``"gramian"`` (the layer-wise Gramian of
:mod:`mtlkit.engine.layer_capture`, for Gramian weightings on the parameter route)."""


def check_finite(losses: Tensor) -> None:
    """Raise :class:`NonFiniteError` naming the first task whose loss is NaN or infinite."""
    if math.isfinite(float(losses.detach().sum())):  # one read; NaN/inf make the sum so
        return
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise NonFiniteError(f"loss of task {bad} is {float(losses.detach()[bad])}")


def backward(
    losses: Losses,
    shared: Inputs | None = None,
    method: Any = None,
    features: Inputs | None = None,
    *,
    route: Route = "auto",
    max_memory: int | None = None,
    retain_graph: bool = False,
    capture: LayerCapture | None = None,
    reducer: Reducer | None = None,
) -> Decision:
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
        route, max_memory: see :func:`jacobian` (``"auto"`` is the loop; the explicit routes
            are ``"loop"`` and ``"batched"``; the Gramian route is ``capture=``).
        retain_graph: keep the graph after the backward.
        capture: the layer capture of the Gramian route (parameter route only; the method must
            be a :class:`~mtlkit.methods.GramianWeighting`).
        reducer: data parallelism and loss scaling (:class:`mtlkit.parallel.ddp.Reducer`): the
            Jacobian is unscaled and reduced across processes before the aggregator runs (not
            with ``capture=`` unless it is a pass-through (bf16 in one process): the
            parameter-route Gramian needs the all-reduced Jacobian).

    Returns:
        What the method decided: its task weights (detached, ``[m]``; ``None`` for an aggregator
        that has none), head weights and solver status (:class:`~mtlkit.engine.contract.Decision`).

    Raises:
        ConfigError: if the method depends on more of the step protocol than one call
            (``method.protocol()``: FAMO's losses after the step, DWA's epoch ends, the bilevel
            methods' probes, extra batches, ...): use :class:`mtlkit.Step`, which runs it all.
    """
    refuse_protocol(method)
    return method_backward(
        losses,
        shared,
        method,
        features,
        route=route,
        max_memory=max_memory,
        retain_graph=retain_graph,
        capture=capture,
        reducer=reducer,
    )


def refuse_protocol(method: Any) -> None:
    """Raise a ConfigError if ``method`` needs more of the step protocol than one call."""
    needs = () if method is None else tuple(method.protocol())
    if needs:
        name = type(method).__name__
        raise ConfigError(
            f"{name} depends on {', '.join(needs)} of the step protocol, which "
            f"mtlkit.backward cannot run (it sees one step's losses only): use "
            f"step = mtlkit.Step({name}(...), optimizer, loss_fn, shared=...) and call "
            "step(batch) per batch and step.end_epoch() per epoch (README, 'Use it in your own "
            "loop')"
        )


def method_backward(
    losses: Losses,
    shared: Inputs | None = None,
    method: Any = None,
    features: Inputs | None = None,
    *,
    route: Route = "auto",
    max_memory: int | None = None,
    retain_graph: bool = False,
    capture: LayerCapture | None = None,
    reducer: Reducer | None = None,
    check_losses: bool = True,
) -> Decision:
    """:func:`backward` without the protocol check: the caller (the step driver) runs the
    method's hooks. ``check_losses=False``: the caller has checked that the losses are finite
    (the step driver's non-finite guard)."""
    scalars = loss_list(losses)
    stacked = torch.stack(scalars)
    if check_losses:
        check_finite(stacked)
    kind = "loss" if method is None else getattr(method, "kind", None)
    if kind == "loss":
        if method is None:
            weights, extra = torch.ones_like(stacked).detach(), None
        else:
            weighted = method(stacked)
            weights, extra = weighted.weights, weighted.extra
        if weights.requires_grad:  # learnable weights: differentiate through them
            weighted.total(stacked).backward(retain_graph=retain_graph)
        else:  # Σ_i w_i L_i: each loss seeded with its weight, no stack/mul/sum in the graph
            _seeded_backward(scalars, weights, extra, stacked.dtype, retain_graph)
        return Decision(weights=weights.detach() if weights.requires_grad else weights)
    if kind != "gradient":
        raise TypeError(f"method must be a LossWeighting or a GradientAggregator, got {method!r}")
    if capture is not None:
        if reducer is not None and not reducer.passthrough:
            raise ValueError(
                "capture= (the Gramian route) cannot take a reducer that reduces or unscales "
                "(DDP or fp16 loss scaling): the Gramian of the global batch has cross terms "
                "between processes that only the all-reduced Jacobian gives; use the Jacobian "
                "route (route=auto, loop or batched) or the features route"
            )
        gramian_based = getattr(method, "gramian_weighting", False)
        if not gramian_based or features is not None or shared is None:
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


def _seeded_backward(
    scalars: list[Tensor], weights: Tensor, extra: Tensor | None, dtype: torch.dtype, retain: bool
) -> None:
    """The backward of ``Σ_i w_i L_i (+ extra)``: each loss seeded with its weight (as
    ``dtype``). Weights of ones on the CPU (EW; the read costs no synchronisation there) are the
    default seeds of ``backward``, which skips the seeds' checks (the same gradients)."""
    seeds = weights if weights.dtype == dtype else weights.to(dtype)
    roots = scalars if extra is None else [*scalars, extra]
    if seeds.device.type == "cpu":
        values = seeds.tolist()
        if values.count(1.0) == len(values):
            torch.autograd.backward(roots, retain_graph=retain)
            return
    grads = seeds.unbind() if extra is None else [*seeds.unbind(), None]
    torch.autograd.backward(roots, grad_tensors=grads, retain_graph=retain)


def _aggregate_shared(
    scalars: list[Tensor],
    shared: Inputs,
    method: Any,
    route: Route,
    max_memory: int | None,
    retain_graph: bool,
    reducer: Reducer | None = None,
) -> Decision:
    losses = torch.stack(scalars)
    params = as_tensor_list(shared, "shared")
    shared_ids = {id(p) for p in params}
    others = [leaf for leaf in graph_leaves(losses) if id(leaf) not in shared_ids]
    jac = jacobian(scalars, params, route=route, max_memory=max_memory, retain_graph=True)
    decision = _decide(method, jac, losses.detach(), params, reducer, features=False)
    if others:
        combine, _ = _head_weights(decision, losses)
        torch.autograd.backward((combine * losses).sum(), inputs=others, retain_graph=retain_graph)
    _accumulate(params, decision.direction)
    return _detached(decision)


def _aggregate_gramian(
    scalars: list[Tensor],
    shared: Inputs,
    method: Any,
    capture: LayerCapture,
    retain_graph: bool,
) -> Decision:
    losses = torch.stack(scalars)
    params = as_tensor_list(shared, "shared")
    shared_ids = {id(p) for p in params}
    others = [leaf for leaf in graph_leaves(losses) if id(leaf) not in shared_ids]
    gradients = capture.task_gradients(scalars, params)
    decision = method.decide(gradients.gramian, losses.detach())
    weights = decision.weights.to(losses.dtype).detach()
    if others:
        combine, _ = _head_weights(decision, losses)
        torch.autograd.backward((combine * losses).sum(), inputs=others, retain_graph=retain_graph)
    gradients.accumulate(weights)
    return _detached(decision)


def _aggregate_features(
    scalars: list[Tensor],
    features: Inputs,
    method: Any,
    route: Route,
    max_memory: int | None,
    retain_graph: bool,
    reducer: Reducer | None = None,
) -> Decision:
    losses = torch.stack(scalars)
    reps = as_tensor_list(features, "features")
    jac = jacobian(scalars, reps, route=route, max_memory=max_memory, retain_graph=True)
    decision = _decide(method, jac, losses.detach(), reps, reducer, features=True)
    combine, exact = _head_weights(decision, losses)
    roots, grads = [(combine * losses).sum()], [None]
    if not exact:
        # The weighted sum sends Σ_i c_i J_i to z; add what makes it the method's direction.
        correction = decision.direction - combine.to(jac.dtype) @ jac
        offset = 0
        for rep in reps:
            roots.append(rep)
            grads.append(correction[offset : offset + rep.numel()].view_as(rep))
            offset += rep.numel()
    torch.autograd.backward(roots, grad_tensors=grads, retain_graph=retain_graph)
    return _detached(decision)


def _head_weights(decision: Decision, losses: Tensor) -> tuple[Tensor, bool]:
    """The weights of the task losses for the parameters that are not aggregated (the heads):
    the decision's ``head_weights`` if it has them, else its ``weights`` (the direction's),
    else ones (``Σ_i ∇L_i``: each head gets its own task's gradient); and whether they are the
    direction's own weights."""
    if decision.head_weights is not None:
        return decision.head_weights.to(losses.dtype).detach(), False
    if decision.weights is not None:
        return decision.weights.to(losses.dtype).detach(), True
    return torch.ones_like(losses), False


def _decide(
    method: Any,
    jac: Tensor,
    losses: Tensor,
    inputs: Sequence[Tensor],
    reducer: Reducer | None,
    features: bool,
) -> Decision:
    """``method.aggregate(jac)``, or with a ``reducer`` the decision on the global batch with
    this process's part of its direction (:meth:`mtlkit.parallel.ddp.Reducer.aggregate`)."""
    if reducer is None:
        decision = method.aggregate(jac, losses, blocks=[t.numel() for t in inputs])
    else:
        decision = reducer.aggregate(method, jac, losses, inputs, features=features)
    if decision.direction is None:
        raise TypeError(f"{type(method).__name__}.aggregate returned a Decision without direction")
    return decision


def _detached(decision: Decision) -> Decision:
    """The decision as the caller gets it: weights detached, no direction (it is in ``.grad``)."""
    weights = None if decision.weights is None else decision.weights.detach()
    heads = None if decision.head_weights is None else decision.head_weights.detach()
    return Decision(weights=weights, head_weights=heads, status=decision.status)


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
