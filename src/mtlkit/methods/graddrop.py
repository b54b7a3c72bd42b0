"""GradDrop: gradient sign dropout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.methods.base import Decision, GradientAggregator, Seeded, check_jacobian
from mtlkit.methods.registry import METHODS


@METHODS.register("graddrop")
class GradDrop(Seeded, GradientAggregator):
    """Gradient sign dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just
    Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020).

    For every element ``a`` (column of ``J``) the positive sign purity and the masks are::

        P = ½ (1 + Σ_i ∇_a L_i / Σ_i |∇_a L_i|)               ∈ [0, 1]
        M_i = 1[P > U] 1[∇_a L_i > 0] + 1[P < U] 1[∇_a L_i < 0],   U ~ Uniform(0, 1)

    with one ``U`` per element shared by all tasks, and the direction is
    ``Σ_i (ℓ_i + (1 - ℓ_i) M_i) ∇_a L_i``: at each element only the gradients of one sign
    survive, the positive ones with probability ``P`` (``f`` = identity, the paper's default).
    The leak ``ℓ_i`` lets task ``i`` through unmasked (``ℓ = 1`` for all tasks gives the plain
    sum). Elements where every gradient is zero give zero (``P`` is set to ½ there).

    The paper applies GradDrop to the gradients at an activation layer, so it is meant for the
    features route (``backward(..., features=z)``). There, row ``i`` of ``J`` is ``∇_z L_i``
    flattened: the columns are the per-sample feature gradients (sample ``b``, feature ``k``),
    and ``P`` and the mask are computed per element, i.e. per sample and feature, as the paper
    does for gradients that come from the same inputs (each activation value is one scalar
    ``a``). The paper's variant for *batch-separated* gradients (each task on different samples,
    e.g. transfer learning), which LibMTL applies always, first reduces
    ``Σ_batch sign(A) ∘ ∇_A L_i`` and shares the mask across the batch; it needs the activation
    values ``A`` and the batch layout, which an aggregator does not see, so it is not offered.
    (With one feature tensor per task, mtlkit's multi-input features route, the Jacobian is
    block-diagonal: each element has one task's gradient, ``P ∈ {0, 1}``, and GradDrop keeps
    everything.) On the parameter route the same rule is applied to each parameter's gradient
    element, a variant that the paper does not study.

    GradDrop is not a task weighting, so its decision has no ``weights`` and the non-shared
    parameters get ``Σ_i ∇L_i``.

    Args:
        leak: ``ℓ ∈ [0, 1]``, one for all tasks or one per task (default 0: full masking).
        generator: a seed or ``torch.Generator`` for ``U`` (drawn on the CPU); ``reset()``
            restores it to its state at construction. ``None``: fresh entropy, not restored.
    """

    def __init__(
        self,
        leak: float | Sequence[float] = 0.0,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        values = [float(leak)] if isinstance(leak, (int, float)) else [float(v) for v in leak]
        if not values or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"leak must be in [0, 1] (one value or one per task), got {leak}")
        self.leak = float(leak) if isinstance(leak, (int, float)) else values
        self.seed_with(generator)
        self.last_purity: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.last_purity = None

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        check_jacobian(jacobian, self)
        m, n = jacobian.shape
        leak = self._leak(m).to(dtype=jacobian.dtype, device=jacobian.device)
        jac = jacobian.detach()
        total = jac.abs().sum(dim=0)
        purity = torch.where(
            total > 0, 0.5 * (1 + jac.sum(dim=0) / torch.where(total > 0, total, 1.0)), 0.5
        )
        uniform = torch.rand(n, generator=self.rng.generator, dtype=torch.float64)
        uniform = uniform.to(device=jac.device, dtype=purity.dtype)
        keep = ((purity > uniform) & (jac > 0)) | ((purity < uniform) & (jac < 0))
        scale = leak[:, None] + (1 - leak[:, None]) * keep.to(jac.dtype)
        self.last_purity = purity
        return Decision(direction=(scale * jac).sum(dim=0))

    def _leak(self, m: int) -> Tensor:
        if isinstance(self.leak, float):
            return torch.full((m,), self.leak)
        if len(self.leak) != m:
            raise ValueError(f"GradDrop has {len(self.leak)} leak values for {m} tasks")
        return torch.tensor(self.leak)
