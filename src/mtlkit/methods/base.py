"""The two kinds of multi-task methods and the hooks they share.

* A :class:`LossWeighting` sees the task losses and returns a :class:`WeightedLoss`: task
  weights ``w`` (which may carry gradient to the method's own parameters, e.g. UW's
  log-variances) and an optional extra term. The update is the gradient of
  ``Σ_i w_i L_i + extra`` for every parameter.
* A :class:`GradientAggregator` sees the Jacobian ``J`` (``[m, n]``) of the task losses w.r.t. the
  shared parameters (or the shared features); ``aggregate(J)`` returns a
  :class:`~mtlkit.engine.contract.Decision` (the direction ``[n]``, the task weights when
  ``direction = w @ J``, head weights, solver status) and ``method(J)`` the direction alone. A
  :class:`GramianWeighting` is an aggregator whose direction is ``w @ J`` with ``w`` a function of
  the Gramian ``G = J Jᵀ`` only; it offers ``weights(G)`` (and ``decide(G)``, the decision) so
  that the engine may skip the Jacobian.

All methods are ``nn.Module`` s: learnable state is returned by ``parameters()``, and all state
(learnable or not) is saved by ``state_dict()`` (non-tensor state through
``get_extra_state``/``set_extra_state``). The engine and the step driver (:class:`mtlkit.Step`)
call a method through its call (``forward``/``aggregate``/``decide``) and the hooks below, and
read what it decided from the returned value; there are no method-specific branches anywhere
else. ``protocol()`` says which hooks a method depends on, so that :func:`mtlkit.backward`
(one call, no hooks) can refuse it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mtlkit.engine.contract import Decision, SolverStatus, WeightedLoss
from mtlkit.errors import NonFiniteError
from mtlkit.methods.blas_threads import single_blas_thread

__all__ = [
    "HOOKS",
    "Decision",
    "GradientAggregator",
    "GramianWeighting",
    "LossWeighting",
    "Method",
    "Seeded",
    "SolverStatus",
    "StepProbe",
    "WeightedLoss",
]

HOOKS = ("before_step", "prepare", "after_step", "on_epoch_end")
"""The per-step and per-epoch hooks of the step protocol (:class:`mtlkit.Step` runs them)."""


@dataclass
class StepProbe:
    """What a bilevel method may use before a step, from the strategy.

    The method may evaluate the task losses at other parameter values by changing
    ``parameters`` in place under ``torch.no_grad()``, provided it restores them exactly (copy
    the saved values back) before returning: ``prepare`` runs before the step's own forward pass.

    Attributes:
        batch: the current training batch.
        extra: ``method.extra_batches`` batches independent of ``batch`` (from a separately
            shuffled stream over the training data), e.g. the auxiliary batch of the upper level.
        parameters: the parameters this step updates (shared ones, then the tasks' own), not the
            method's.
        learning_rate: the learning rate of the optimizer that takes this step (first group).
        compute: ``batch ->`` the method's m task losses at the current parameters (one forward
            pass, with its graph): a list of scalars (what the strategies give), or a ``[m]``
            tensor.
    """

    batch: Any
    extra: list[Any]
    parameters: list[nn.Parameter]
    learning_rate: float
    compute: Callable[[Any], Tensor | Sequence[Tensor]]

    def losses(self, batch: Any) -> Tensor:
        """The ``[m]`` task losses on ``batch`` at the current parameters."""
        values = self.compute(batch)
        return values if isinstance(values, Tensor) else torch.stack(list(values))

    def loss_list(self, batch: Any) -> list[Tensor]:
        """The task losses on ``batch`` as separate scalars: what :func:`mtlkit.jacobian` should
        get (rows from a stacked tensor would each backpropagate through every task's head)."""
        values = self.compute(batch)
        return list(values.unbind()) if isinstance(values, Tensor) else list(values)


class Method(nn.Module):
    """Base class of every method.

    Class attributes:
        name: the registered snake_case name.
        kind: ``"loss"`` for loss weightings, ``"gradient"`` for gradient aggregators.
        needs_losses: whether the method's decision depends on the task losses passed with the
            Jacobian or Gramian (MGDA's loss normalisation, GradNorm's training rates); the
            others must decide the same whatever losses they get (the contract test checks it).
        needs_losses_after: whether ``after_step`` needs the losses recomputed after the step
            (FAMO); a strategy then does one more forward pass on the same batch.
        needs_probe: whether ``prepare(probe)`` must be called before each step with a
            :class:`StepProbe` (bilevel methods: Auto-Lambda, MOML, FORUM).

    Hooks (all optional to override):
        ``before_step(step)``, ``after_step(losses_after)``, ``on_epoch_end(epoch)``, ``reset()``,
        ``extra_batches`` (how many additional independent batches the method needs per step).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["loss", "gradient"]]
    needs_losses: ClassVar[bool] = False
    needs_losses_after: ClassVar[bool] = False
    needs_probe: ClassVar[bool] = False
    extra_batches: int = 0

    def setup(self, num_tasks: int) -> None:
        """Called once the number of tasks is known, before optimizers are built.

        Methods with per-task state (UW's log-variances) create it here; calling it again with
        the same ``num_tasks`` changes nothing."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks

    def before_step(self, step: int) -> None:
        """Called before each optimizer step of this method, with the global step index."""

    def prepare(self, probe: StepProbe) -> None:
        """Called before the forward pass of each step when ``needs_probe`` is true (bilevel
        methods: a virtual step on the training batch, evaluated on an auxiliary batch)."""

    def after_step(self, losses_after: Tensor | None) -> None:
        """Called after the optimizer step, with the task losses recomputed on the same batch
        when ``needs_losses_after`` is true (``None`` otherwise)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called at the end of each training epoch."""

    def reset(self) -> None:
        """Return to the state right after construction (between runs)."""
        for module in self.modules():
            if module is not self and isinstance(module, Method):
                module.reset()

    def protocol(self) -> tuple[str, ...]:
        """The parts of the step protocol this method depends on beyond one call, in the order
        of :data:`HOOKS`: the hooks its class overrides, ``prepare`` exactly when
        ``needs_probe`` (only then is it called: NGDiff's takes part with ``adaptive_lr``
        alone), ``after_step`` also with ``needs_losses_after``; then ``"extra_batches"`` when
        it needs independent batches. Empty for a method that one call of
        :func:`mtlkit.backward` runs completely."""
        overridden = {h for h in HOOKS if getattr(type(self), h) is not getattr(Method, h)}
        needed = {"prepare": self.needs_probe, "after_step": self.needs_losses_after}
        needs = [h for h in HOOKS if needed.get(h, False) or (h in overridden and h != "prepare")]
        if self.extra_batches:
            needs.append("extra_batches")
        return tuple(needs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, object]:
        """The constructor arguments (but ``num_tasks``, which ``setup`` fixes), for ``repr``,
        logging and rebuilding: ``type(m)(**m.hparams())`` makes the same method. Read from the
        constructor's signature, each value by :meth:`hparam`."""
        return {name: self.hparam(name) for name in constructor_arguments(type(self))}

    def hparam(self, name: str) -> object:
        """The value of the constructor argument ``name``: the attribute of the same name.
        Override for an argument kept under another name.

        Raises:
            TypeError: if the method keeps no attribute ``name``.
        """
        try:
            return getattr(self, name)
        except AttributeError:
            raise TypeError(
                f"{type(self).__name__}: the constructor argument {name!r} is not kept as "
                f"self.{name}; keep it so, or override hparam() for it"
            ) from None


class LossWeighting(Method):
    """A method that maps the task losses ``[m]`` to a :class:`WeightedLoss`."""

    kind = "loss"

    def forward(self, losses: Tensor) -> WeightedLoss:  # pragma: no cover - abstract
        raise NotImplementedError


class GradientAggregator(Method):
    """A method that maps a Jacobian ``[m, n]`` to a direction ``[n]``.

    Subclasses implement ``aggregate(J, losses=None, blocks=None) -> Decision``; calling the
    method returns the direction alone:

    * ``losses`` (``[m]``, detached) are the task losses, given by the engine for the methods
      that use them (MGDA's loss normalisation) and ignored by the others;
    * ``blocks`` are the column counts of the tensors that ``J`` was taken w.r.t., in order
      (``sum(blocks) == n``): one block per shared parameter tensor on the parameter route, one
      per feature tensor on the features route. Methods that work layer by layer (GradVac) use
      them; ``None`` means one block.

    The :class:`~mtlkit.engine.contract.Decision` holds the task ``weights`` ``w`` such that the
    direction is ``w @ J``, when the method has such weights (``None`` otherwise); the engine
    uses them for the non-shared parameters (the heads get ``Σ_i w_i ∇L_i``, or ``Σ_i ∇L_i``
    without weights). A method whose paper gives the heads other weights than the direction's
    returns ``head_weights`` (DB-MTL: ``1 / L_i``, the gradient of ``log L_i``).

    Methods that need the Jacobians of *independent* mini-batches (MoDo, SDMGrad) set
    ``extra_batches`` to how many they need per step; before each call the step driver computes
    the Jacobians of the same tasks w.r.t. the same shared parameters on that many other batches
    and passes them to :meth:`observe_extra`.
    """

    kind = "gradient"
    gramian_weighting: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every ``aggregate``/``weights``/``decide`` runs with NumPy's BLAS on one thread
        (:mod:`mtlkit.methods.blas_threads`: its spinning workers slowed the step 2.5x)."""
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and "aggregate" not in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides forward(); a GradientAggregator implements "
                "aggregate(jacobian, losses, blocks) -> Decision(direction=..., weights=...) "
                "and forward returns its direction"
            )
        for name in ("aggregate", "weights", "decide"):
            if name in cls.__dict__:
                setattr(cls, name, single_blas_thread(cls.__dict__[name]))

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Tensor:
        """The direction ``[n]`` (``aggregate(...).direction``)."""
        return self.aggregate(jacobian, losses, blocks).direction

    def observe_extra(self, jacobians: Sequence[Tensor]) -> None:
        """Receive the Jacobians (each ``[m, n]``) of ``extra_batches`` independent batches,
        before the next ``aggregate``. Only methods with ``extra_batches > 0`` override it."""
        raise TypeError(
            f"{type(self).__name__} does not use extra batches (extra_batches = 0), "
            f"got {len(jacobians)} extra Jacobian(s)"
        )


class GramianWeighting(GradientAggregator):
    """An aggregator whose direction is ``weights(J Jᵀ, losses) @ J``: subclasses implement
    ``weights`` (and may override ``decide`` to report a solver status). The engine may then
    skip storing ``J`` and combine by one weighted backward."""

    gramian_weighting = True

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def decide(self, gramian: Tensor, losses: Tensor | None = None) -> Decision:
        """The decision from the Gramian alone (no direction: the engine forms ``w @ J``)."""
        return Decision(weights=self.weights(gramian, losses))

    def aggregate(
        self, jacobian: Tensor, losses: Tensor | None = None, blocks: Sequence[int] | None = None
    ) -> Decision:
        decision = self.decide(jacobian @ jacobian.T, losses)
        direction = decision.weights.to(jacobian.dtype) @ jacobian
        return replace(decision, direction=direction)


def check_blocks(blocks: Sequence[int] | None, n: int) -> list[int]:
    """``blocks`` as a list of positive column counts summing to ``n`` (``[n]`` for ``None``)."""
    if blocks is None:
        return [n]
    sizes = [int(b) for b in blocks]
    if any(b <= 0 for b in sizes) or sum(sizes) != n:
        raise ValueError(f"blocks {sizes} must be positive column counts summing to n={n}")
    return sizes


def check_jacobian(jacobian: Tensor, method: object) -> None:
    """Raise ``ValueError`` unless ``jacobian`` is a ``[m, n]`` matrix with m ≥ 1, and
    :class:`~mtlkit.errors.NonFiniteError` (naming ``method``'s class) if it has NaN or inf."""
    if jacobian.dim() != 2 or jacobian.shape[0] == 0:
        raise ValueError(f"expected a Jacobian [m, n], got shape {tuple(jacobian.shape)}")
    if not bool(torch.isfinite(jacobian).all()):
        raise NonFiniteError(f"{type(method).__name__} got a Jacobian with NaN or infinite entries")


def check_losses(losses: Tensor) -> None:
    """Raise ``ValueError`` unless ``losses`` is a 1-D tensor of at least one task loss."""
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"expected a 1-D tensor of task losses, got shape {tuple(losses.shape)}")


def check_gramian(gramian: Tensor) -> None:
    """Raise ``ValueError`` unless ``gramian`` is a square ``[m, m]`` matrix with m ≥ 1."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(f"expected a square Gramian [m, m], got shape {tuple(gramian.shape)}")


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A ``torch.Generator`` from a seed, an existing generator, or fresh entropy (``None``)."""
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    if generator is None:
        g.seed()
    else:
        g.manual_seed(int(generator))
    return g


def constructor_arguments(cls: type) -> list[str]:
    """The names of ``cls``'s constructor arguments a method's hyperparameters are made of:
    every named one but ``num_tasks`` (fixed by ``setup``)."""
    signature = inspect.signature(cls.__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        p.name
        for p in list(signature.parameters.values())[1:]
        if p.kind in kinds and p.name != "num_tasks"
    ]


class GeneratorState:
    """A method's random-number generator with the state needed to restore it.

    Args:
        generator: a seed, a ``torch.Generator`` (its current state is the one restored), or
            ``None`` for fresh entropy (then ``reset`` does not restore anything).
    """

    def __init__(self, generator: torch.Generator | int | None) -> None:
        self.generator = as_generator(generator)
        self.seed = None if generator is None else self.generator.initial_seed()
        self._initial = None if generator is None else self.generator.get_state()

    def reset(self) -> None:
        """Back to the state at construction (when it was seeded)."""
        if self._initial is not None:
            self.generator.set_state(self._initial)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


class Seeded:
    """Mixin of a method that draws from its own random-number generator ``self.rng``
    (a :class:`GeneratorState` made by :meth:`seed_with` from the constructor's ``generator``):
    ``reset`` restores it, the ``state_dict`` carries its state (a resumed run draws what the
    uninterrupted one would), and ``hparams`` shows its seed. List it before the method's base:
    ``class GradDrop(Seeded, GradientAggregator)``."""

    rng: GeneratorState

    def seed_with(self, generator: torch.Generator | int | None) -> None:
        self.rng = GeneratorState(generator)

    def hparam(self, name: str) -> object:
        return self.rng.seed if name == "generator" else super().hparam(name)  # type: ignore[misc]

    def reset(self) -> None:
        self.rng.reset()  # first: a reset that draws (RLW's normal parameters) draws afresh
        super().reset()  # type: ignore[misc]

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.rng.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["generator"])
