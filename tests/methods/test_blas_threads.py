"""NumPy's BLAS runs on one thread inside the aggregators, and only there."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import ThreadpoolController, threadpool_limits

from mtlkit.methods import GradientAggregator, GramianWeighting
from mtlkit.methods.blas_threads import one_blas_thread


def blas_threads() -> list[int]:
    return [
        lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers
    ]


class RecordsThreads(GramianWeighting):
    def weights(self, gramian, losses=None):
        self.seen = blas_threads()
        return torch.ones(gramian.shape[0], dtype=gramian.dtype)


class RecordsInForward(GradientAggregator):
    def forward(self, jacobian, losses=None, blocks=None):
        self.seen = blas_threads()
        return jacobian.sum(dim=0)


@pytest.fixture
def two_blas_threads():
    if not blas_threads():
        pytest.skip("no BLAS library that threadpoolctl can control")
    with threadpool_limits(limits=2, user_api="blas"):
        yield


@pytest.mark.usefixtures("two_blas_threads")
@pytest.mark.parametrize("method", [RecordsThreads(), RecordsInForward()])
def test_methods_run_with_one_blas_thread_and_restore_the_count(method):
    assert set(blas_threads()) == {2}
    method(torch.eye(3, 5, dtype=torch.float64))
    assert set(method.seen) == {1}
    assert set(blas_threads()) == {2}


@pytest.mark.usefixtures("two_blas_threads")
def test_nested_blocks_restore_only_at_the_outermost():
    with one_blas_thread():
        with one_blas_thread():
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}
    assert set(blas_threads()) == {2}


@pytest.mark.usefixtures("two_blas_threads")
def test_the_count_is_restored_when_the_method_raises():
    class Fails(GramianWeighting):
        def weights(self, gramian, losses=None):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        Fails()(torch.eye(2, dtype=torch.float64))
    assert set(blas_threads()) == {2}
