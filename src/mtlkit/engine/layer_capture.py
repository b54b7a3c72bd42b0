"""The Gramian ``J Jᵀ`` of the task losses w.r.t. shared parameters, without forming ``J``.

A linear layer ``y = x Wᵀ + b`` applied to N rows (batch × positions) has, for task ``i``, the
weight gradient ``∇_W L_i = Δ_iᵀ X`` with ``X [N, in]`` the layer's inputs and
``Δ_i = ∂L_i/∂y [N, out]``. Hence, layer by layer,

    ⟨∇_W L_i, ∇_W L_j⟩ = tr(Δ_iᵀ X Xᵀ Δ_j) = ⟨Δ_i, K Δ_j⟩,   K = X Xᵀ  [N, N],
    ⟨∇_b L_i, ∇_b L_j⟩ = (1ᵀ Δ_i) · (1ᵀ Δ_j),

and, once the method has chosen its weights ``w``, the layer's update is
``Σ_i w_i ∇_W L_i = (Σ_i w_i Δ_i)ᵀ X``: one matmul. So such a layer needs only the m activation
gradients ``Δ_i``, from a backward per task that skips its weight gradients (the costly half of
a backward), and never its ``[m, out·in]`` block of ``J``. This "kernel form" costs
``N²(in + m·out) + m²·N·out + N·in·out`` multiply-adds against ``m·N·in·out + m²·in·out`` for the
block form (the per-task weight gradients); each layer takes the cheaper one, so the kernel form
wins for wide layers, many tasks and moderate N (an MLP's hidden layers), and a conv net (huge N)
keeps the block form, where this route costs what the Jacobian route costs.

Every other shared tensor (conv weights, normalisation weights, embeddings, layers whose
kernel form does not pay) gets its per-task gradients from autograd, stacked per tensor: the
Gramian adds their block products and the update their weighted sums. Nothing is backpropagated
again after the weights are known, except the task heads' ``Σ_i w_i L_i``.

This is the route for :class:`~mtlkit.methods.GramianWeighting` methods (MGDA, UPGrad, CAGrad,
PCGrad, Nash-MTL, IMTL-G, ...). See :func:`mtlkit.backward` (``capture=``), ``route="gramian"``
of the Trainer, and ``benchmarks/bench_step.py`` for the measured speed and memory.

Usage::

    capture = LayerCapture(model.encoder)        # registers forward hooks, before the forward
    losses = [loss_fn(out[t], y[t]) for t in tasks]
    mtlkit.backward(losses, shared=model.encoder.parameters(), method=UPGrad(), capture=capture)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtlkit.engine.jacobian import jacobian
from mtlkit.errors import MtlkitError


class CaptureUnsupported(MtlkitError):
    """The captured layers cannot give this model's Gramian: an output was modified in place
    after the forward, or the first Gramian differs from ``J Jᵀ`` (weight tying). Raised by
    :meth:`LayerCapture.task_gradients` before any gradient is accumulated, so the same forward
    pass can still take the Jacobian route."""


@dataclass
class _Record:
    """One call of a captured layer: its input rows and its output (in the graph)."""

    module: nn.Linear
    inputs: Tensor  # detached
    output: Tensor
    version: int


@dataclass
class _KernelLayer:
    """A linear layer in the kernel form: its input rows ``[N, in]`` and the tasks' output
    gradients ``[m, N, out]``."""

    module: nn.Linear
    rows: Tensor
    deltas: Tensor


@dataclass
class TaskGradients:
    """What the Gramian route keeps of one backward per task: the Gramian and enough to form
    ``Σ_i w_i ∇L_i`` for every shared tensor once ``w`` is known.

    Attributes:
        gramian: ``J Jᵀ`` ``[m, m]``.
        kernel_layers: the linear layers in the kernel form.
        stacked: per-task gradients ``[m, *shape]`` of every other shared tensor, in order.
    """

    gramian: Tensor
    kernel_layers: list[_KernelLayer] = field(default_factory=list)
    stacked: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def accumulate(self, weights: Tensor) -> None:
        """Add ``Σ_i w_i ∇L_i`` to the ``.grad`` of every shared tensor."""
        for layer in self.kernel_layers:
            combined = torch.tensordot(weights.to(layer.deltas.dtype), layer.deltas, dims=1)
            _add_grad(layer.module.weight, combined.T @ layer.rows)
            if layer.module.bias is not None:
                _add_grad(layer.module.bias, combined.sum(dim=0))
        for tensor, grads in self.stacked:
            _add_grad(tensor, torch.tensordot(weights.to(grads.dtype), grads, dims=1))


def _add_grad(tensor: Tensor, grad: Tensor) -> None:
    if tensor.grad is None:
        tensor.grad = grad.detach()
    else:
        tensor.grad.add_(grad)


class LayerCapture:
    """Records the inputs and outputs of the ``nn.Linear`` layers of ``modules`` during the
    forward pass, so that :meth:`task_gradients` can form ``J Jᵀ`` without ``J``.

    Only layers whose parameters are all shared are captured: pass the shared part of the model
    (e.g. ``model.encoder``), or the whole model and ``shared=`` its shared parameters. A
    captured layer's parameters must be used only through that layer's forward (no weight tying
    with code outside it): ``verify=True`` (the default) checks the first Gramian against the
    Jacobian route and raises on a mismatch.

    Only calls made with gradients enabled are recorded; records are consumed (and released) by
    :meth:`task_gradients`. Use as a context manager, or call :meth:`remove` to take the hooks
    off.

    Args:
        modules: the module(s) whose linear layers to capture.
        shared: if given, capture only the layers whose parameters are all in ``shared``.
        verify: compare the first Gramian with ``J Jᵀ`` from the Jacobian (relative tolerance
            ``1e-4`` of the largest entry) and raise :class:`MtlkitError` if they differ.
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module],
        *,
        shared: Iterable[Tensor] | None = None,
        verify: bool = True,
    ) -> None:
        roots = [modules] if isinstance(modules, nn.Module) else list(modules)
        layers = {id(m): m for root in roots for m in root.modules() if type(m) is nn.Linear}
        if shared is not None:
            shared_ids = {id(p) for p in shared}
            layers = {
                key: m
                for key, m in layers.items()
                if all(id(p) in shared_ids for p in m.parameters())
            }
        self.layers: list[nn.Linear] = list(layers.values())
        self.records: list[_Record] = []
        self.verify = verify
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        assert isinstance(module, nn.Linear)
        self.records.append(_Record(module, args[0].detach(), output, output._version))

    def remove(self) -> None:
        """Take the forward hooks off the layers and drop the records."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.records = []

    def clear(self) -> None:
        """Drop the records (and the graphs they keep alive)."""
        self.records = []

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def gramian(self, losses: Sequence[Tensor], shared: Sequence[Tensor]) -> Tensor:
        """``J Jᵀ`` ``[m, m]`` of the scalar ``losses`` w.r.t. ``shared``."""
        return self.task_gradients(losses, shared).gramian

    def task_gradients(self, losses: Sequence[Tensor], shared: Sequence[Tensor]) -> TaskGradients:
        """The Gramian of ``losses`` w.r.t. ``shared`` and what forms any weighted update.

        Consumes the records of the forward pass that produced ``losses``; the graph is kept.
        """
        records, self.records = self.records, []
        shared = list(shared)
        shared_ids = {id(p) for p in shared}
        for layer in self.layers:
            if not all(id(p) in shared_ids for p in layer.parameters()):
                raise MtlkitError(
                    f"the parameters of the captured {layer} are not all in shared; capture "
                    "only the shared part of the model (e.g. LayerCapture(model.encoder))"
                )
        for record in records:
            if record.output._version != record.version:
                raise CaptureUnsupported(
                    f"the output of {record.module} was modified in place after the forward "
                    "(e.g. ReLU(inplace=True)); the Gramian route needs it intact: use "
                    "inplace=False in the shared layers, or the Jacobian route"
                )
        m = len(losses)
        kernel_modules = [group for group in _by_module(records) if _kernel_pays(group, m)]
        kernel_ids = {id(p) for group in kernel_modules for p in group[0].module.parameters()}
        others = [p for p in shared if id(p) not in kernel_ids]
        outputs = [r.output for group in kernel_modules for r in group]
        dtype, device = shared[0].dtype, shared[0].device
        rows = [
            torch.cat([r.inputs.reshape(-1, group[0].module.in_features) for r in group])
            for group in kernel_modules
        ]
        deltas = [
            torch.zeros(m, len(x), group[0].module.out_features, dtype=dtype, device=device)
            for x, group in zip(rows, kernel_modules)
        ]
        stacked = [torch.zeros(m, *p.shape, dtype=dtype, device=device) for p in others]
        for i, loss in enumerate(losses):  # one backward per task, written in place at once
            grads = torch.autograd.grad(
                loss, [*outputs, *others], retain_graph=True, allow_unused=True
            )
            position = 0
            for group, delta in zip(kernel_modules, deltas):
                offset = 0
                for record in group:
                    grad, size = grads[position], record.output.numel() // delta.shape[2]
                    if grad is not None:
                        delta[i, offset : offset + size].copy_(grad.reshape(size, -1))
                    position, offset = position + 1, offset + size
            for buffer, grad in zip(stacked, grads[position:]):
                if grad is not None:
                    buffer[i].copy_(grad)
            del grads
        result = TaskGradients(torch.zeros(m, m, dtype=dtype, device=device))
        for group, x, delta in zip(kernel_modules, rows, deltas):
            module = group[0].module
            _add_kernel_gramian(result.gramian, x, delta)
            if module.bias is not None:
                bias = delta.sum(dim=1)
                result.gramian.addmm_(bias, bias.T)
            result.kernel_layers.append(_KernelLayer(module, x, delta))
        for tensor, grads in zip(others, stacked):
            flat = grads.reshape(m, -1)
            result.gramian.addmm_(flat, flat.T)
            result.stacked.append((tensor, grads))
        if self.verify:
            self.verify = False
            _verify(result.gramian, losses, shared)
        return result


def _by_module(records: Sequence[_Record]) -> list[list[_Record]]:
    """The records grouped by layer (a layer may be called several times), in first-call order."""
    groups: dict[int, list[_Record]] = {}
    for record in records:
        groups.setdefault(id(record.module), []).append(record)
    return list(groups.values())


def _kernel_pays(group: Sequence[_Record], m: int) -> bool:
    """Whether the kernel form takes fewer multiply-adds than the block form for this layer."""
    module = group[0].module
    n_rows = sum(r.inputs.numel() // module.in_features for r in group)
    width_in, width_out = module.in_features, module.out_features
    kernel = n_rows * n_rows * (width_in + m * width_out) + m * m * n_rows * width_out
    kernel += n_rows * width_in * width_out  # forming the update (Σ w_i Δ_i)ᵀ X
    block = m * n_rows * width_in * width_out + m * m * width_in * width_out
    return kernel < block


def _add_kernel_gramian(
    gram: Tensor, rows: Tensor, deltas: Tensor, chunk_bytes: int = 1 << 22
) -> None:
    """Add ``⟨Δ_i, X Xᵀ Δ_j⟩`` for ``X = rows [N, in]`` and ``deltas [m, N, out]``, a few tasks at
    a time (``K Δ_j`` for at most ``chunk_bytes`` at once)."""
    m = deltas.shape[0]
    kernel = rows @ rows.T
    flat = deltas.reshape(m, -1)
    step = max(1, chunk_bytes // max(1, deltas[0].numel() * deltas.element_size()))
    for start in range(0, m, step):
        mixed = torch.matmul(kernel, deltas[start : start + step])  # [k, N, out]
        gram[:, start : start + step].addmm_(flat, mixed.reshape(len(mixed), -1).T)


def _verify(gram: Tensor, losses: Sequence[Tensor], shared: Sequence[Tensor]) -> None:
    """Raise unless ``gram`` equals ``J Jᵀ`` from the Jacobian route."""
    jac = jacobian(list(losses), list(shared), route="loop", retain_graph=True)
    reference = jac @ jac.T
    scale = float(reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny))
    error = float((gram - reference).abs().max()) / scale
    if error > 1e-4:
        raise CaptureUnsupported(
            f"the layer-wise Gramian differs from J Jᵀ by {error:.2e} (relative): a captured "
            "layer's parameters are used outside its forward (weight tying?) or a captured "
            "layer is not shared; capture only the shared layers, or use the Jacobian route"
        )
