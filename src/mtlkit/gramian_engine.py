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

from mtlkit.errors import MtlkitError


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
                raise MtlkitError(
                    f"the output of {record.module} was modified in place after the forward "
                    "(e.g. ReLU(inplace=True)); the Gramian route needs it intact: use "
                    "inplace=False in the shared layers, or the Jacobian route"
                )
        m = len(losses)
        kernel_modules = [group for group in _by_module(records) if _kernel_pays(group, m)]
        kernel_ids = {id(p) for group in kernel_modules for p in group[0].module.parameters()}
        others = [p for p in shared if id(p) not in kernel_ids]
        outputs = [r.output for group in kernel_modules for r in group]
        per_task = [
            torch.autograd.grad(loss, [*outputs, *others], retain_graph=True, allow_unused=True)
            for loss in losses
        ]
        dtype, device = shared[0].dtype, shared[0].device
        result = TaskGradients(torch.zeros(m, m, dtype=dtype, device=device))
        position = 0
        for group in kernel_modules:
            module = group[0].module
            rows = torch.cat([r.inputs.reshape(-1, module.in_features) for r in group])
            deltas = torch.cat(
                [
                    _stack([g[position + c] for g in per_task], r.output).reshape(
                        m, -1, module.out_features
                    )
                    for c, r in enumerate(group)
                ],
                dim=1,
            )
            position += len(group)
            _add_kernel_gramian(result.gramian, rows, deltas)
            if module.bias is not None:
                bias = deltas.sum(dim=1)
                result.gramian.addmm_(bias, bias.T)
            result.kernel_layers.append(_KernelLayer(module, rows, deltas))
        for k, tensor in enumerate(others):
            grads = _stack([g[position + k] for g in per_task], tensor)
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


def _stack(grads: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """``[m, *like.shape]`` from per-task gradients, zeros where a task does not reach."""
    return torch.stack([torch.zeros_like(like) if g is None else g for g in grads])


def _add_kernel_gramian(gram: Tensor, rows: Tensor, deltas: Tensor) -> None:
    """Add ``⟨Δ_i, X Xᵀ Δ_j⟩`` for ``X = rows [N, in]`` and ``deltas [m, N, out]``."""
    m = deltas.shape[0]
    mixed = torch.matmul(rows @ rows.T, deltas)  # [m, N, out]
    gram.addmm_(deltas.reshape(m, -1), mixed.reshape(m, -1).T)


def _verify(gram: Tensor, losses: Sequence[Tensor], shared: Sequence[Tensor]) -> None:
    """Raise unless ``gram`` equals ``J Jᵀ`` from the Jacobian route."""
    from mtlkit.autograd import jacobian

    jac = jacobian(list(losses), list(shared), route="loop", retain_graph=True)
    reference = jac @ jac.T
    scale = float(reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny))
    error = float((gram - reference).abs().max()) / scale
    if error > 1e-4:
        raise MtlkitError(
            f"the layer-wise Gramian differs from J Jᵀ by {error:.2e} (relative): a captured "
            "layer's parameters are used outside its forward (weight tying?) or a captured "
            "layer is not shared; capture only the shared layers, or use the Jacobian route"
        )
