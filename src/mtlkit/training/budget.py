"""When a run stops (:class:`Budget`) and how far it has come (:class:`Progress`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mtlkit.errors import MtlkitError


@dataclass(frozen=True)
class Budget:
    """When training stops: the first of these limits reached (``None`` = no limit).

    ``passes`` counts forward passes of the model (each ``compute_losses`` call); a strategy that
    steps several times per batch spends several passes per batch. ``forward_backward`` counts
    forward passes plus backward passes through the shared part (``StepReport.backwards``: a
    gradient aggregator on the parameter route spends one per task), the budget for comparing
    methods of different cost at equal compute.
    """

    epochs: int | None = 10
    steps: int | None = None
    passes: int | None = None
    seconds: float | None = None
    forward_backward: int | None = None

    def __post_init__(self) -> None:
        limits = asdict(self)
        if all(v is None for v in limits.values()):
            raise MtlkitError(
                "the training budget needs at least one of epochs, steps, passes, seconds, "
                "forward_backward"
            )
        for key, value in limits.items():
            if value is not None and not value > 0:
                raise MtlkitError(f"budget {key} must be > 0, got {value}")

    def spent(
        self, epochs: int, steps: int, passes: int, seconds: float, backwards: int = 0
    ) -> bool:
        return (
            (self.epochs is not None and epochs >= self.epochs)
            or (self.steps is not None and steps >= self.steps)
            or (self.passes is not None and passes >= self.passes)
            or (self.seconds is not None and seconds >= self.seconds)
            or (self.forward_backward is not None and passes + backwards >= self.forward_backward)
        )


@dataclass
class Progress:
    """Counters of a run."""

    epoch: int = 0
    steps: int = 0
    passes: int = 0
    seconds: float = 0.0
