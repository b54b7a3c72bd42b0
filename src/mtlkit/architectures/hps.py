"""Hard parameter sharing (HPS): one shared encoder, one head per task.

Caruana (1997); the architecture of Fig. 1 of the LibMTL documentation. Single-input:
``forward(x) -> {task: head_task(encoder(x))}``. Multi-input (one input per task, e.g.
Office-31): ``forward(x, task=t) -> {t: head_t(encoder(x))}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor, nn

from mtlkit.errors import MtlkitError


class HPS(nn.Module):
    """Hard parameter sharing.

    Args:
        encoder: the shared encoder; its output is the shared representation ``z``.
        heads: one module per task, applied to ``z``.
        multi_input: each task has its own input; ``forward`` then needs ``task=``.

    The model offers the shared representation for the features route:
    ``forward(x, return_features=True) -> (outputs, z)``.
    """

    has_shared_representation = True

    def __init__(
        self, encoder: nn.Module, heads: Mapping[str, nn.Module], multi_input: bool = False
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("HPS needs at least one task head")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.multi_input = multi_input

    @property
    def task_names(self) -> list[str]:
        return list(self.heads)

    def forward(
        self, x: Tensor, task: str | None = None, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
        z = self.encoder(x)
        if task is None:
            if self.multi_input:
                raise MtlkitError(f"this multi-input model needs task=, one of {self.task_names}")
            outputs = {name: head(z) for name, head in self.heads.items()}
        else:
            if task not in self.heads:
                raise MtlkitError(f"unknown task {task!r}; tasks: {self.task_names}")
            outputs = {task: self.heads[task](z)}
        return (outputs, z) if return_features else outputs

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.heads:
            raise MtlkitError(f"unknown task {task!r}; tasks: {self.task_names}")
        return self.heads[task].parameters()
