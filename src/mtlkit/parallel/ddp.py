"""Data parallelism with the per-task signals reduced *before* the method runs, across processes
(DDP on ``torch.distributed``, launched by ``torchrun``); gradient accumulation over micro-batches
is its sibling in :mod:`mtlkit.training.accumulation`.

**Semantics.** ``N`` processes that each see one shard of a batch take the step that one process
would take on the whole batch (the union of the shards; losses are means over the batch, as with
DistributedDataParallel). What that takes depends on the method:

* *Loss weightings*: every process gives the method the task losses of the **global** batch (the
  mean over processes; :meth:`Reducer.losses` keeps the local graph for the backward), so every
  process computes the same weights and stateful weightings (DWA, FAMO, UW, ...) stay in sync;
  then the gradients of ``Σ w_i L_i`` are all-reduced (mean), as DDP does.
* *Gradient aggregators, parameter route*: the local Jacobians ``[m, n]`` w.r.t. the shared
  parameters are all-reduced (mean) **before** the method runs, so every process runs the method
  on the Jacobian of the global batch and gets the same direction; it is not all-reduced again.
  The other parameters (heads) get the gradient of ``Σ w_i L_i`` (all-reduced, mean).
* *Gradient aggregators, features route*: the samples of the processes are disjoint, so the
  Jacobian of the global losses w.r.t. the global features is the concatenation of the local ones
  (each divided by ``N``, the losses being means). A Gramian weighting only needs its Gramian, the
  sum of the local Gramians divided by ``N²`` (one ``[m, m]`` all-reduce); other aggregators get
  the gathered Jacobian and each process keeps its own slice of the direction. The encoder's and
  heads' gradients are then all-reduced (mean).
* The Gramian route of the engine (``route="gramian"``, ``capture=``) is refused under DDP and
  under a loss scaler: on the parameter route the global Gramian ``(1/N²) Σ_r Σ_s J_r J_sᵀ`` has
  cross terms between processes that local Gramians lack; the Jacobian routes (``auto``,
  ``loop``, ``batched``) and the features route (``rep_grad``) are the ones that work. bf16
  autocast in one process (nothing to reduce or unscale) does run on it.

Why not ``nn.parallel.DistributedDataParallel``: it all-reduces each process's *already
aggregated* direction; for a non-linear aggregator the mean of local directions is not the
global Jacobian's (MGDA of an average is not the average of MGDAs). Plain collectives move just
what the method needs; parameters holding the global direction skip the gradient all-reduce.

**Buffers** (BatchNorm running statistics): each process normalises with its own shard's
statistics, as under DDP without SyncBatchNorm, and the buffers are broadcast from rank 0 after
every optimizer step (DDP: before each forward), so all processes evaluate and checkpoint the
same model. Exact batch statistics across processes (equal to one process's up to rounding):
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (CUDA).

**Data**: :func:`shard_loader` gives each process a contiguous, equal part of every global
batch (the last batch is padded with its own first samples if its size is not a multiple of
``N``, as ``DistributedSampler`` pads), from the same shuffled order; ``batch_size`` is the
global batch size, so ``torchrun --nproc-per-node N`` takes the same steps as one process.

In your own loop::

    reducer = mtlkit.parallel.ddp.Reducer()            # the default process group
    losses = reducer.losses({t: crit[t](out[t], y[t]) for t in tasks})
    mtlkit.backward(list(losses.values()), shared=encoder.parameters(), method=UPGrad(),
                    reducer=reducer)
    reducer.sync_gradients(model.parameters())         # heads (the shared ones are global)
    optimizer.step()
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from mtlkit.data.multi_input import MultiInputLoader
from mtlkit.engine.contract import Decision
from mtlkit.engine.precision import LossScaler, Precision
from mtlkit.errors import MtlkitError
from mtlkit.methods.base import GradientAggregator, GramianWeighting, Method
from mtlkit.methods.float64_gramian import Float64GramianWeighting

__all__ = [
    "Parallel",
    "Reducer",
    "Traffic",
    "from_rank_zero",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "shard_batch",
    "shard_loader",
]


# --------------------------------------------------------------------------- process group
def is_distributed(group: Any = None) -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_main_process() -> bool:
    """Rank 0 of the default group, or a single process: the one that writes files."""
    return not is_distributed() or dist.get_rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group from ``torchrun``'s environment (``WORLD_SIZE > 1``)
    unless one exists: NCCL for a CUDA device, gloo otherwise. Returns whether this process is
    one of several. The group is destroyed at exit."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(_destroy)
    return dist.get_world_size() > 1


def from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every process of the default group (a picklable object), so that
    choices such as a new run folder's name agree; ``value`` itself for a single process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the reducer
@dataclass
class Traffic:
    """Payload bytes this process put through collectives, by what they carried (an all-reduce
    counts its tensor once, an all-gather its gathered result)."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
        self.calls += 1

    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls = 0


class _GlobalValue(torch.autograd.Function):
    """Forward: the given (global) value; backward: the gradient flows to the local loss."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, value: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _gramian_only(method: GradientAggregator) -> bool:
    """Whether the method's direction is ``decide(J Jᵀ).weights @ J`` (the base GramianWeighting
    ``aggregate`` or its float64 form, not overridden otherwise: GradNorm's and PCD's measure the
    gradients themselves)."""
    return isinstance(method, GramianWeighting) and (
        type(method).aggregate in (GramianWeighting.aggregate, Float64GramianWeighting.aggregate)
    )


class Reducer:
    """What happens to the per-task signals between each process's backward and the method: the
    loss scale is taken off (AMP), the Jacobian is cast to float32 (or wider) and reduced across
    processes (DDP). Give it to :func:`mtlkit.backward` (``reducer=``); see the module docstring.

    Args:
        group: the process group (``None``: the default one).
        scaler: the loss scaler whose factor the Jacobians carry (fp16), or ``None``.
        distributed: ``None`` = whether a group of more than one process is initialised;
            ``False`` = act as a single process (AMP only).

    Attributes:
        world, rank: the number of processes and this one's rank in ``group``.
        traffic: the bytes moved by this reducer's collectives.
    """

    def __init__(
        self,
        group: Any = None,
        scaler: LossScaler | None = None,
        distributed: bool | None = None,
    ) -> None:
        available = is_distributed(group)
        if distributed is None:
            distributed = available
        elif distributed and not available:
            raise MtlkitError(
                "distributed=True needs an initialised torch.distributed process group of more "
                "than one process (launch with torchrun --nproc-per-node N ...)"
            )
        self.group = group
        self.distributed = bool(distributed)
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.scaler = scaler
        self.traffic = Traffic()
        self._global_grads: set[int] = set()
        nccl = self.distributed and dist.get_backend(group) == "nccl"
        # where this reducer's own small tensors (flags, counts) live: NCCL only moves CUDA ones
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def __repr__(self) -> str:
        return f"Reducer(world={self.world}, rank={self.rank}, scaler={self.scaler!r})"

    @property
    def passthrough(self) -> bool:
        """Whether the reducer changes nothing a method sees (one process, no loss scale: bf16
        autocast alone), so that routes which never form the Jacobian (``capture=``) may run."""
        return not self.distributed and self.scaler is None

    # -------------------------------------------------------------- collectives
    def _all_reduce(self, tensor: Tensor, kind: str, op: Any = None) -> Tensor:
        if self.distributed:
            self.traffic.add(kind, tensor.numel() * tensor.element_size())
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return tensor

    def _all_gather(self, tensor: Tensor, kind: str) -> list[Tensor]:
        if not self.distributed:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        self.traffic.add(kind, tensor.numel() * tensor.element_size() * self.world)
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (every process gets the same answer)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        return bool(self._all_reduce(value, "control", dist.ReduceOp.MAX).item() > 0)

    def max(self, values: Sequence[float]) -> list[float]:
        """The element-wise maximum of ``values`` over the processes."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        return self._all_reduce(tensor, "control", dist.ReduceOp.MAX).tolist()

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable) on every process."""
        if not self.distributed:
            return value
        box = [value]
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def broadcast_(self, tensors: Iterable[Tensor], kind: str = "state") -> None:
        """Overwrite ``tensors`` (in place) with rank 0's values."""
        if not self.distributed:
            return
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for tensor in tensors:
            buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        with torch.no_grad():
            for group in buckets.values():
                flat = torch.cat([t.detach().reshape(-1) for t in group])
                self.traffic.add(kind, flat.numel() * flat.element_size())
                dist.broadcast(flat, src=src, group=self.group)
                offset = 0
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    # ------------------------------------------------------------------ losses
    def losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task loss with the value of its mean over the processes (the loss of the global
        batch) and the gradient of the local loss: what a method must see, with the graph the
        local backward needs."""
        if not self.distributed:
            return dict(losses)
        names = list(losses)
        local = [losses[n] for n in names]
        values = torch.stack([loss.detach().reshape(()) for loss in local])
        self._all_reduce(values, "losses")
        values /= self.world
        return {
            n: _GlobalValue.apply(loss, values[i].reshape(loss.shape).to(loss.dtype))
            for i, (n, loss) in enumerate(zip(names, local))
        }

    # ----------------------------------------------------------------- Jacobians
    def _unscale(self) -> float:
        return 1.0 if self.scaler is None else 1.0 / self.scaler.scale

    def reduce_jacobian(self, jac: Tensor) -> Tensor:
        """The Jacobian of the global batch w.r.t. shared parameters: the local ones averaged over
        the processes, unscaled, in float32 or wider (a new tensor)."""
        work = jac.to(torch.promote_types(jac.dtype, torch.float32), copy=True)
        work.mul_(self._unscale() / self.world)  # unscaled first: the sum must not overflow
        return self._all_reduce(work, "jacobian")

    def aggregate(
        self,
        method: GradientAggregator,
        jac: Tensor,
        losses: Tensor,
        inputs: Sequence[Tensor],
        features: bool,
    ) -> Decision:
        """The engine's hook (``mtlkit.backward(..., reducer=...)``): run ``method`` on the
        Jacobian of the global batch; the decision's direction is this process's part of the
        global direction, carrying the loss scale like the other gradients of the backward.

        Args:
            method: the aggregator.
            jac: this process's Jacobian ``[m, n]`` w.r.t. ``inputs`` (scaled by the loss scale).
            losses: the task losses the method may use (global values, detached).
            inputs: the shared parameters, or the feature tensors (``features=True``).
        """
        sizes = [t.numel() for t in inputs]
        if not features:
            decision = self._run(method, self.reduce_jacobian(jac), losses, sizes)
            self._global_grads.update(id(t) for t in inputs)
            return replace(decision, direction=(decision.direction / self._unscale()).to(jac.dtype))
        work = jac.to(torch.promote_types(jac.dtype, torch.float32))
        if _gramian_only(method):
            local = work * (self._unscale() / self.world)  # unscaled first: J Jᵀ squares S
            if isinstance(method, Float64GramianWeighting):  # UPGrad, MGDA: a float64 Gramian
                local = local.double()
            gram = self._all_reduce(local @ local.T, "gramian")
            if self._overflow(gram):
                return Decision(direction=torch.full_like(jac[0], float("nan")))
            decision = method.decide(gram, losses)
            weights = decision.weights.to(work.dtype)  # the direction in the work dtype
            # w @ (J_r / N) is this process's slice of the direction; the backward through the
            # local encoder is averaged over N processes and carries the loss scale: N S w @ J_r.
            return replace(decision, weights=weights, direction=(weights @ work).to(jac.dtype))
        self._check_equal_columns(jac.shape[1])  # all_gather needs equal shapes
        parts = self._all_gather(work, "features")
        columns, offset = [], 0
        for size in sizes:  # feature tensor by feature tensor, the processes' samples in order
            columns += [part[:, offset : offset + size] for part in parts]
            offset += size
        global_jac = torch.cat(columns, dim=1).mul_(self._unscale() / self.world)
        decision = self._run(method, global_jac, losses, [self.world * s for s in sizes])
        pieces, offset = [], 0
        for size in sizes:
            start = offset + self.rank * size
            pieces.append(decision.direction[start : start + size])
            offset += self.world * size
        direction = torch.cat(pieces).mul_(self.world / self._unscale()).to(jac.dtype)
        return replace(decision, direction=direction)

    def _overflow(self, tensor: Tensor) -> bool:
        return self.scaler is not None and not bool(torch.isfinite(tensor).all())

    def _run(
        self, method: GradientAggregator, jac: Tensor, losses: Tensor, blocks: list[int]
    ) -> Decision:
        """``method.aggregate(jac)``; with a loss scaler, a NaN direction instead for a
        non-finite Jacobian (an overflow of the scaled backward: the step is then skipped and the
        scale reduced)."""
        if self._overflow(jac):
            return Decision(direction=torch.full_like(jac[0], float("nan")))
        return method.aggregate(jac, losses, blocks=blocks)

    def _check_equal_columns(self, n: int) -> None:
        if not self.distributed:
            return
        count = torch.tensor([n], dtype=torch.int64, device=self.device)
        sizes = self._all_gather(count, "control")
        values = [int(s) for s in torch.cat(sizes)]
        if len(set(values)) > 1:
            raise MtlkitError(
                f"the features route needs the same number of feature entries on every process "
                f"(equal shard sizes); got {values} (use shard_loader, or equal batch sizes)"
            )

    # ---------------------------------------------------------------- gradients
    def sync_gradients(self, tensors: Iterable[Tensor]) -> None:
        """All-reduce (mean) the ``.grad`` of ``tensors``, skipping those the engine filled with
        the global direction since the last call. A gradient that exists on some processes only
        counts as zero on the others; one that exists on none stays ``None`` (the presence flags
        travel in the same all-reduce as the gradients: one collective per dtype and device)."""
        skip, self._global_grads = self._global_grads, set()
        if not self.distributed:
            return
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for tensor in tensors:
            if id(tensor) not in skip:
                buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for (dtype, device), group in buckets.items():
            pieces = [
                t.grad.reshape(-1) if t.grad is not None else t.new_zeros(t.numel()) for t in group
            ]
            present = [1.0 if t.grad is not None else 0.0 for t in group]
            pieces.append(torch.tensor(present, dtype=dtype, device=device))
            flat = self._all_reduce(torch.cat(pieces), "gradients")
            counts = flat[-len(group) :].tolist()
            flat /= self.world
            offset = 0
            for tensor, count in zip(group, counts):
                piece = flat[offset : offset + tensor.numel()].view_as(tensor)
                offset += tensor.numel()
                if count == 0:
                    continue
                if tensor.grad is None:
                    tensor.grad = piece.clone()
                else:
                    tensor.grad.copy_(piece)


# --------------------------------------------------------------------------- data
def _part(indices: list[Any], rank: int, world: int) -> list[Any]:
    """Part ``rank`` of ``world`` contiguous equal parts of ``indices``, padded cyclically."""
    size = -(-len(indices) // world)
    padded = [indices[i % len(indices)] for i in range(size * world)]
    return padded[rank * size : (rank + 1) * size]


class ShardBatchSampler(Sampler[list[int]]):
    """Each batch of ``batch_sampler`` (a global batch), cut into ``world`` contiguous equal
    parts; yields part ``rank``."""

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world: int) -> None:
        self.batch_sampler = batch_sampler
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            yield _part(list(batch), self.rank, self.world)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]


class ShardedBatches:
    """Any re-iterable of collated batches: every process reads each batch and keeps its part
    (:func:`shard_batch`)."""

    def __init__(self, loader: Iterable[Any], rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield shard_batch(batch, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def shard_loader(loader: Any, rank: int, world: int) -> Any:
    """This process's shard of a training loader: each global batch cut into ``world``
    contiguous equal parts (the last padded with its own first samples), part ``rank``. A
    ``DataLoader`` keeps its shuffling generator (so checkpoints resume exactly) and loads only
    its part; a ``MultiInputLoader`` is sharded task by task; any other iterable is read whole
    and sliced."""
    if world == 1:
        return loader
    if isinstance(loader, MultiInputLoader):
        return MultiInputLoader(
            {t: shard_loader(p, rank, world) for t, p in loader.loaders.items()}
        )
    if (
        isinstance(loader, DataLoader)
        and loader.batch_sampler is not None
        and not isinstance(loader.dataset, IterableDataset)
    ):
        return DataLoader(
            loader.dataset,
            batch_sampler=ShardBatchSampler(loader.batch_sampler, rank, world),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            persistent_workers=loader.persistent_workers,
        )
    return ShardedBatches(loader, rank, world)


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """Part ``rank`` of every tensor of a nested batch (dicts, lists, tuples), cut along the
    first dimension as :func:`shard_loader` does."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            return batch
        index = torch.tensor(_part(list(range(batch.shape[0])), rank, world), device=batch.device)
        return batch.index_select(0, index)
    if isinstance(batch, Mapping):
        return {k: shard_batch(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, rank, world) for v in batch)
    return batch


# --------------------------------------------------------------------------- the Trainer's part
class Parallel:
    """One training process's part in data parallelism and mixed precision, for the Trainer:
    which rank it is, its shard of the data, the losses the strategies see (loss-scaled, with
    global values), the optimizer step (gradients synchronised, unscaled, overflow-checked) and
    the buffers broadcast after it.

    Args:
        distributed: ``None`` = use the default process group when one of more than one process
            is initialised; ``True`` = require one; ``False`` = single process.
        precision: AMP mode and loss scaler (:class:`~mtlkit.engine.precision.Precision`).
        accumulate: micro-batches per optimizer step.
    """

    def __init__(
        self,
        distributed: bool | None = None,
        precision: Precision | None = None,
        accumulate: int = 1,
    ) -> None:
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise MtlkitError(f"accumulate must be an integer >= 1, got {accumulate!r}")
        self.precision = precision if precision is not None else Precision()
        self.accumulate = accumulate
        scaler = self.precision.scaler
        self.reducer: Reducer | None = None
        if distributed is not False and (distributed or is_distributed()):
            self.reducer = Reducer(scaler=scaler, distributed=True)
        elif self.precision.enabled:
            self.reducer = Reducer(scaler=scaler, distributed=False)
        self.distributed = self.reducer is not None and self.reducer.distributed
        self.world = self.reducer.world if self.reducer is not None else 1
        self.rank = self.reducer.rank if self.reducer is not None else 0
        self._model: nn.Module | None = None
        self._model_ids: set[int] | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, checkpoints and results (rank 0)."""
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """Under DDP, ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def shard(self, loader: Any) -> Any:
        return shard_loader(loader, self.rank, self.world)

    def shard_batch(self, batch: Any) -> Any:
        return shard_batch(batch, self.rank, self.world)

    def attach(self, model: nn.Module, methods: Sequence[Method]) -> None:
        """Remember the model and make every process start from rank 0's weights and buffers
        (as DDP's constructor does) and method states (random generators included, so that
        stochastic methods draw the same numbers on every process)."""
        self._model = model
        self._model_ids = {id(p) for p in model.parameters()}
        if self.reducer is not None and self.distributed:
            tensors = [*model.parameters(), *model.buffers()]
            self.reducer.broadcast_([t for t in tensors if t.numel() > 0])
            for method in methods:
                method.load_state_dict(self.reducer.broadcast_object(method.state_dict()))

    def prepare(self, result: Any) -> Any:
        """The losses of a forward pass as the strategies must see them: float32, their gradient
        loss-scaled, their values the global batch's."""
        if self.reducer is None:
            return result
        losses = {t: self.precision.scale_loss(loss) for t, loss in result.losses.items()}
        result.losses = self.reducer.losses(losses)
        return result

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Synchronise the gradients (DDP), unscale and check them (loss scaler), then step, or
        skip the step on every process on inf/NaN; broadcast the buffers. Returns whether the
        optimizer stepped."""
        scaler = self.precision.scaler
        if self.reducer is None and scaler is None:  # one process in float32/bf16: the step
            optimizer.step()
            return True
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.reducer is not None:
            self.reducer.sync_gradients(params)
        stepped = True
        if scaler is not None:
            model_ids = self._model_ids
            if model_ids is None:
                raise MtlkitError("Parallel.attach(model, methods) must come before a step")
            found = scaler.unscale_([p for p in params if id(p) in model_ids])
            own = [p.grad for p in params if id(p) not in model_ids and p.grad is not None]
            found = found or any(not bool(torch.isfinite(g).all()) for g in own)
            if self.reducer is not None:
                found = self.reducer.any(found)
            scaler.update(found)
            stepped = not found
        if stepped:
            optimizer.step()
        if self.distributed and self._model is not None:
            buffers = [b for b in self._model.buffers() if b.numel() > 0]
            if buffers:
                self.reducer.broadcast_(buffers, "buffers")  # type: ignore[union-attr]
        return stepped

    def agree(self, progress: Any, stop: Any) -> None:
        """Make every process see the same elapsed time (the largest) and stop request (any), so
        that all of them end the epoch or the run at the same batch."""
        if not self.distributed:
            return
        seconds, requested = self.reducer.max([progress.seconds, float(stop.requested)])  # type: ignore[union-attr]
        progress.seconds, stop.requested = seconds, int(requested)

    def state_dict(self) -> dict[str, Any]:
        return self.precision.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.precision.load_state_dict(state)
