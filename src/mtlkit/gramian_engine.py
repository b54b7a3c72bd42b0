"""The Gramian ``J Jᵀ`` of the task losses w.r.t. shared parameters, without forming ``J``.

A linear layer ``y = x Wᵀ + b`` applied to N rows (batch × positions) has, for task ``i``, the
weight gradient ``∇_W L_i = Δ_iᵀ X`` with ``X [N, in]`` the layer's inputs and
``Δ_i = ∂L_i/∂y [N, out]``. Hence, layer by layer,

    ⟨∇_W L_i, ∇_W L_j⟩ = tr(Δ_iᵀ X Xᵀ Δ_j) = ⟨Δ_i, K Δ_j⟩,   K = X Xᵀ  [N, N],
    ⟨∇_b L_i, ∇_b L_j⟩ = (1ᵀ Δ_i) · (1ᵀ Δ_j).

So the Gramian needs only the m activation gradients ``Δ_i`` (a backward per task that skips
every weight gradient, the costly half of a backward) and never the ``[m, n]`` Jacobian. Where
``K`` is the dearer way (many rows, narrow layers) a layer's Jacobian block ``Δᵀ X``
(``[m, out, in]``, one batched matmul over the tasks) is formed and dropped at once. ``Conv2d``
layers (``groups=1``, numeric padding) use the block form on unfolded patches. Shared tensors
outside such layers (normalisation weights, embeddings, ...) get their Jacobian columns from
autograd directly; they are small.

This is the route for :class:`~mtlkit.methods.GramianWeighting` methods (MGDA, UPGrad, CAGrad,
PCGrad, Nash-MTL, IMTL-G, ...): weights ``w = method.weights(G)`` and then the update
``Σ_i w_i ∇L_i`` is one ordinary backward of ``Σ_i w_i L_i``. See :func:`mtlkit.backward`
(``capture=``) and ``benchmarks/bench_engine.py`` for the measured speed and memory.

Usage::

    capture = LayerCapture(model.encoder)        # registers forward hooks, before the forward
    losses = [loss_fn(out[t], y[t]) for t in tasks]
    mtlkit.backward(losses, shared=model.encoder.parameters(), method=UPGrad(), capture=capture)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.errors import MtlkitError


@dataclass
class _Record:
    """One call of a captured layer: its input rows and its output (in the graph)."""

    module: nn.Module
    inputs: Tensor  # detached
    output: Tensor
    version: int


def _capturable(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


class LayerCapture:
    """Records the inputs and outputs of the ``nn.Linear`` / ``nn.Conv2d`` layers of ``modules``
    during the forward pass, so that :meth:`gramian` can form ``J Jᵀ`` layer by layer.

    Only layers whose parameters are all shared are captured: pass the shared part of the model
    (e.g. ``model.encoder``), or the whole model and ``shared=`` its shared parameters. A
    captured layer's parameters must be used only through that layer's forward (no weight tying
    with code outside it): ``verify=True`` (the default) checks the first Gramian against the
    Jacobian route and raises on a mismatch.

    Only calls made with gradients enabled are recorded; records are consumed (and released) by
    :meth:`gramian`. Use as a context manager, or call :meth:`remove` to take the hooks off.

    Args:
        modules: the module(s) whose layers to capture.
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
        layers = {id(m): m for root in roots for m in root.modules() if _capturable(m)}
        if shared is not None:
            shared_ids = {id(p) for p in shared}
            layers = {
                key: m
                for key, m in layers.items()
                if all(id(p) in shared_ids for p in m.parameters())
            }
        self.layers = list(layers.values())
        if not self.layers:
            raise MtlkitError(
                "LayerCapture found no nn.Linear or nn.Conv2d (groups=1, numeric padding) layer "
                "to capture; the Gramian route needs them (use the Jacobian route instead)"
            )
        self.parameter_ids = {id(p) for layer in self.layers for p in layer.parameters()}
        self.records: list[_Record] = []
        self.verify = verify
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
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
        """``J Jᵀ`` ``[m, m]`` of the scalar ``losses`` w.r.t. ``shared``, layer by layer.

        Consumes the records of the forward pass that produced ``losses``; the graph is kept
        (for the weighted backward that follows).
        """
        records, self.records = self.records, []
        for record in records:
            if record.output._version != record.version:
                raise MtlkitError(
                    f"the output of {record.module} was modified in place after the forward "
                    "(e.g. ReLU(inplace=True)); the Gramian route needs it intact: use "
                    "inplace=False in the shared layers, or the Jacobian route"
                )
        others = [p for p in shared if id(p) not in self.parameter_ids]
        missing = {id(p) for layer in self.layers for p in layer.parameters()} - {
            id(p) for p in shared
        }
        if missing:
            raise MtlkitError(
                f"{len(missing)} parameter(s) of the captured layers are not in shared; capture "
                "only the shared part of the model (e.g. LayerCapture(model.encoder))"
            )
        outputs = [r.output for r in records]
        m = len(losses)
        deltas: list[list[Tensor | None]] = [[None] * m for _ in records]
        other_grads: list[list[Tensor | None]] = [[None] * m for _ in others]
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss, [*outputs, *others], retain_graph=True, allow_unused=True
            )
            for k in range(len(records)):
                deltas[k][i] = grads[k]
            for k in range(len(others)):
                other_grads[k][i] = grads[len(records) + k]
        dtype = losses[0].dtype if not shared else shared[0].dtype
        device = losses[0].device
        gram = torch.zeros(m, m, dtype=dtype, device=device)
        _add_layer_gramians(gram, records, deltas)
        for k, tensor in enumerate(others):
            block = _stack(other_grads[k], tensor).reshape(m, -1)
            gram.addmm_(block, block.T)
        if self.verify:
            self.verify = False
            _verify(gram, losses, shared)
        return gram


def _stack(grads: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """``[m, *like.shape]`` from per-task gradients, zeros where a task does not reach."""
    return torch.stack([torch.zeros_like(like) if g is None else g for g in grads])


def _add_layer_gramians(
    gram: Tensor, records: Sequence[_Record], deltas: Sequence[Sequence[Tensor | None]]
) -> None:
    """Add every captured layer's weight and bias contribution to ``gram``."""
    by_module: dict[int, list[int]] = {}
    for k, record in enumerate(records):
        if all(d is None for d in deltas[k]):
            continue  # a call that does not lead to these losses
        by_module.setdefault(id(record.module), []).append(k)
    m = gram.shape[0]
    for calls in by_module.values():
        module = records[calls[0]].module
        if isinstance(module, nn.Conv2d):
            weight_block, bias_block = _conv_blocks(module, records, deltas, calls)
            weight_rows = weight_block.reshape(m, -1)
            gram.addmm_(weight_rows, weight_rows.T)
        else:
            rows = torch.cat([records[k].inputs.reshape(-1, module.in_features) for k in calls])
            delta = torch.cat(
                [
                    _stack(deltas[k], records[k].output).reshape(m, -1, module.out_features)
                    for k in calls
                ],
                dim=1,
            )
            _add_linear_weight(gram, rows, delta)
            bias_block = delta.sum(dim=1)
        if module.bias is not None:
            gram.addmm_(bias_block, bias_block.T)


def _add_linear_weight(gram: Tensor, rows: Tensor, delta: Tensor) -> None:
    """Add ``⟨Δ_iᵀ X, Δ_jᵀ X⟩`` for ``X = rows [N, in]``, ``delta [m, N, out]``, by whichever of
    the kernel form ``⟨Δ_i, X Xᵀ Δ_j⟩`` and the block form ``Δᵀ X`` takes fewer operations."""
    m, n_rows, width_out = delta.shape
    width_in = rows.shape[1]
    kernel_cost = n_rows * n_rows * (width_in + m * width_out) + m * m * n_rows * width_out
    block_cost = m * n_rows * width_in * width_out + m * m * width_in * width_out
    if kernel_cost < block_cost:
        kernel = rows @ rows.T
        mixed = torch.matmul(kernel, delta)  # [m, N, out]
        gram.addmm_(delta.reshape(m, -1), mixed.reshape(m, -1).T)
    else:
        block = torch.matmul(delta.transpose(1, 2), rows).reshape(m, -1)  # [m, out * in]
        gram.addmm_(block, block.T)


def _conv_blocks(
    module: nn.Conv2d,
    records: Sequence[_Record],
    deltas: Sequence[Sequence[Tensor | None]],
    calls: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """Per-task weight gradients ``[m, out, in·k·k]`` and bias gradients ``[m, out]`` of a
    ``Conv2d``, summed over its calls, batched over the tasks."""
    weight_block = bias_block = None
    for k in calls:
        patches = F.unfold(
            records[k].inputs,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # [B, in·k·k, P]
        delta = _stack(deltas[k], records[k].output)  # [m, B, out, H, W]
        m, batch, width_out = delta.shape[:3]
        delta = delta.reshape(m, batch, width_out, -1)
        block = torch.einsum("mbop,bkp->mok", delta, patches)
        bias = delta.sum(dim=(1, 3))
        weight_block = block if weight_block is None else weight_block + block
        bias_block = bias if bias_block is None else bias_block + bias
    assert weight_block is not None and bias_block is not None
    return weight_block, bias_block


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
