"""Where a run's tensors live: the device of a config, moving batches to it, its peak memory,
and the model's optional hooks."""

from __future__ import annotations

import resource
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.errors import MtlkitError

__all__ = ["model_hook", "peak_memory_mb", "resolve_device", "to_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """A ``torch.device``, checking that a CUDA device exists when one is asked for."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise MtlkitError(f"invalid device {device!r}; use cpu, cuda or cuda:N") from error
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MtlkitError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MtlkitError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise MtlkitError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a nested batch (tuples, lists, dicts) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def model_hook(model: nn.Module, name: str, *args: Any) -> Any:
    """Call the optional model hook ``name`` (``auxiliary_losses``, ``on_train_step``,
    ``on_epoch_end``) if the model defines it; ``None`` otherwise."""
    if _missing_module_attribute(model, name):
        return None
    hook = getattr(model, name, None)
    return hook(*args) if callable(hook) else None


def _missing_module_attribute(model: Any, name: str) -> bool:
    """Whether ``model`` is an ``nn.Module`` (with its own ``__getattr__``) that has no attribute
    ``name``: the lookups ``getattr`` makes, without the ``AttributeError`` that
    ``nn.Module.__getattr__`` raises (the hooks are looked up at every step)."""
    kind = type(model)
    if getattr(kind, "__getattr__", None) is not nn.Module.__getattr__ or hasattr(kind, name):
        return False
    return not (
        name in model.__dict__
        or name in model._parameters
        or name in model._buffers
        or name in model._modules
    )
