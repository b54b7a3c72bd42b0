"""NumPy's BLAS kept to one thread while a gradient aggregator runs.

The aggregators solve tiny ``m x m`` problems in NumPy (eigendecompositions, QPs, Wolfe steps).
On a multi-core CPU, OpenBLAS hands even a 40 x 40 ``eigh`` to its worker threads, which then
spin for a while and take the cores from PyTorch's own threads during the rest of the training
step: measured on 2 cores, an MLP step with 40 tasks on the features route took 94-111 ms with
IMTL-G or UPGrad against 36-40 ms with PCGrad (no NumPy BLAS), and 39-48 ms for all three with
OpenBLAS limited to one thread (``benchmarks/bench_step.py``). Every ``forward`` and ``weights``
of a :class:`~mtlkit.methods.base.GradientAggregator` subclass therefore runs inside
:func:`one_blas_thread` (``threadpoolctl``; about 10 µs per call, nested calls free); the user's
own NumPy keeps its thread count outside of them.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from threadpoolctl import ThreadpoolController

F = TypeVar("F", bound=Callable[..., Any])

_state = threading.local()
_blas: Any = None  # the BLAS libraries loaded when last looked for (NumPy's, SciPy's, ...)
_modules_seen = -1  # len(sys.modules) then: an import since may have loaded another BLAS


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit the loaded BLAS libraries to one thread inside the block (nesting is free).

    The libraries are looked for again after any new import (about 0.5 ms; a module count
    check otherwise), so that a BLAS loaded after the first call (SciPy's, a solver's) is
    limited too."""
    global _blas, _modules_seen
    depth = getattr(_state, "depth", 0)
    if depth:
        _state.depth = depth + 1
        try:
            yield
        finally:
            _state.depth = depth
        return
    if _blas is None or len(sys.modules) != _modules_seen:
        _modules_seen = len(sys.modules)
        _blas = ThreadpoolController().select(user_api="blas")
    with _blas.limit(limits=1):
        _state.depth = 1
        try:
            yield
        finally:
            _state.depth = 0


def single_blas_thread(function: F) -> F:
    """``function`` run inside :func:`one_blas_thread`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_blas_thread():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
