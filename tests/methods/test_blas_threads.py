"""NumPy's BLAS runs on one thread inside the aggregators, and only there.

The assertions compare with the thread counts seen just before (not with a fixed count), so they
hold whatever BLAS libraries earlier tests loaded: a single-threaded build (some solvers bundle
one) reports 1 under any limit. A BLAS loaded after the first aggregator call is checked in a
fresh interpreter, where the order of loading is known.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from threadpoolctl import ThreadpoolController, threadpool_limits

from mtlkit.methods import Decision, GradientAggregator, GramianWeighting
from mtlkit.methods.blas_threads import one_blas_thread


def blas_threads() -> dict[str, int]:
    """The thread count of every loaded BLAS library, by file."""
    controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    return {lib.filepath: lib.num_threads for lib in controllers}


def all_one(counts: dict[str, int]) -> dict[str, int]:
    return dict.fromkeys(counts, 1)


class RecordsThreads(GramianWeighting):
    def weights(self, gramian, losses=None):
        self.seen = blas_threads()
        return torch.ones(gramian.shape[0], dtype=gramian.dtype)


class RecordsInAggregate(GradientAggregator):
    def aggregate(self, jacobian, losses=None, blocks=None):
        self.seen = blas_threads()
        return Decision(direction=jacobian.sum(dim=0))


@pytest.fixture
def two_blas_threads():
    """Two threads for every BLAS that can have them; the counts then (at least one is 2)."""
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        if 2 not in before.values():
            pytest.skip(f"no multi-threaded BLAS that threadpoolctl can control: {before}")
        yield before


@pytest.mark.parametrize("method", [RecordsThreads(), RecordsInAggregate()])
def test_methods_run_with_one_blas_thread_and_restore_the_count(method, two_blas_threads):
    method(torch.eye(3, 5, dtype=torch.float64))
    assert method.seen == all_one(two_blas_threads)
    assert blas_threads() == two_blas_threads


def test_nested_blocks_restore_only_at_the_outermost(two_blas_threads):
    with one_blas_thread():
        with one_blas_thread():
            assert blas_threads() == all_one(two_blas_threads)
        assert blas_threads() == all_one(two_blas_threads)
    assert blas_threads() == two_blas_threads


def test_the_count_is_restored_when_the_method_raises(two_blas_threads):
    class Fails(GramianWeighting):
        def weights(self, gramian, losses=None):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        Fails()(torch.eye(2, dtype=torch.float64))
    assert blas_threads() == two_blas_threads


LATE_BLAS = textwrap.dedent(
    """
    import json, sys
    import torch
    from threadpoolctl import ThreadpoolController, threadpool_limits
    from mtlkit.methods import GramianWeighting

    def counts():
        libs = ThreadpoolController().select(user_api="blas").lib_controllers
        return {lib.filepath: lib.num_threads for lib in libs}

    class Records(GramianWeighting):
        def weights(self, gramian, losses=None):
            self.seen = counts()
            return torch.ones(gramian.shape[0], dtype=gramian.dtype)

    method, eye = Records(), torch.eye(2, dtype=torch.float64)
    with threadpool_limits(limits=2, user_api="blas"):
        method(eye)
        first = method.seen
    import scipy.linalg  # SciPy's own OpenBLAS, loaded after the first call
    with threadpool_limits(limits=2, user_api="blas"):
        before = counts()
        method(eye)
        print(json.dumps({"first": first, "before": before, "seen": method.seen}))
    """
)


def test_a_blas_loaded_after_the_first_call_is_limited_too():
    done = subprocess.run(
        [sys.executable, "-c", LATE_BLAS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    late = set(result["before"]) - set(result["first"])
    if not any(result["before"][lib] == 2 for lib in late):
        pytest.skip(f"importing scipy.linalg loaded no new multi-threaded BLAS: {result}")
    assert result["seen"] == all_one(result["before"])
