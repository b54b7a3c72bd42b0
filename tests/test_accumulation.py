"""Gradient accumulation: k micro-batches take the step of one batch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_hps
from torch.utils.data import DataLoader, Dataset

from mtlkit import Alternating, Budget, ConfigError, Joint, Task, Trainer, methods
from mtlkit.app.config import TrainConfig
from mtlkit.engine.precision import LossScaler, Precision
from mtlkit.training.accumulation import split_batch
from mtlkit.training.optim import optimizer

TASKS = ["t0", "t1", "t2"]


class Pairs(Dataset):
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        self.y = torch.randn(n, 3, generator=gen, dtype=torch.float64).abs() + 0.1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {t: self.y[i, k] for k, t in enumerate(TASKS)}


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.squeeze(-1) - target) ** 2).mean()


def train(strategy, accumulate: int, batch_size: int = 16, n: int = 32, epochs: int = 1, **kw):
    model = tiny_hps()
    trainer = Trainer(
        model,
        [Task(t, mse) for t in TASKS],
        strategy,
        optimizer("sgd", lr=0.1, momentum=0.9),
        budget=Budget(epochs=epochs),
        accumulate=accumulate,
        progress=False,
        track_exploration=False,
        **kw,
    )
    loader = DataLoader(
        Pairs(n), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    trainer.fit(loader)
    return trainer, model


def close(a, b, atol=1e-10):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)


METHODS = {
    "ew": methods.EW,
    "mgda": methods.MGDA,
    "upgrad": methods.UPGrad,
    "uw": methods.UW,  # learnable log-variances (the method's own parameters)
    "dwa": lambda: methods.get("dwa"),  # epoch statistics (buffers)
}


CASES = [(name, 2) for name in METHODS] + [(name, 3) for name in ("ew", "mgda", "upgrad", "uw")]
CASES.append(("dwa", 4))  # DWA averages its calls: exact for micro-batches of equal sizes


@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-k{k}" for n, k in CASES])
def test_k_micro_batches_take_the_step_of_the_whole_batch(name, k):
    """Batches of 16 in k micro-batches (8 + 8, 6 + 5 + 5 weighted by size, 4 x 4), three
    epochs (DWA's weights differ from 1 in the third), equal to one pass over each batch (UW's
    float32 log-variances round at 1e-9)."""
    make = METHODS[name]
    whole, model = train(Joint(make()), 1, epochs=3)
    split, model_k = train(Joint(make()), k, epochs=3)
    moved = zip(model.parameters(), tiny_hps().parameters())
    assert max(float((p - q).detach().abs().max()) for p, q in moved) > 1e-2
    close(model, model_k, atol=1e-8)
    (a,), (b,) = whole.strategy.methods(), split.strategy.methods()
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if key not in ("epoch_sum", "epoch_steps"):  # DWA counts micro-batches
            torch.testing.assert_close(x, y, rtol=0, atol=1e-8, msg=key)
    if name == "dwa":
        assert not torch.allclose(a.current_weights(), torch.ones(3, dtype=torch.float64))
    per_batch = whole.summary()["cost"]["backwards_per_batch"]
    gradient = a.kind == "gradient"
    assert split.summary()["cost"]["backwards_per_batch"] == (k * per_batch if gradient else k)


def test_accumulation_with_alternating_per_group_optimizers():
    def strategy():
        return Alternating(methods.MGDA(), groups=[["t0", "t1"], ["t2"]], optimizers="per_group")

    _, model = train(strategy(), 1)
    _, model_k = train(strategy(), 4)
    close(model, model_k)


def test_accumulated_jacobians_are_unscaled_once():
    """With a loss scale (2**10, float64: exact), accumulating the scaled per-task Jacobians
    and unscaling once gives the plain step."""
    _, model = train(Joint(methods.MGDA()), 1)
    amp = Precision("none", scaler=LossScaler(init_scale=2.0**10))
    _, model_k = train(Joint(methods.MGDA()), 2, amp=amp)
    close(model, model_k)


def test_split_batch_cuts_every_tensor_alike():
    batch = (torch.arange(5), {"a": torch.arange(5) * 10, "b": torch.zeros(5, 2)})
    parts = split_batch(batch, 2)
    assert [p[0].tolist() for p in parts] == [[0, 1, 2], [3, 4]]
    assert [p[1]["a"].tolist() for p in parts] == [[0, 10, 20], [30, 40]]
    assert len(split_batch(batch, 8)) == 5  # never an empty micro-batch


@pytest.mark.parametrize(
    ("method", "rep_grad", "match"),
    [
        (lambda: methods.get("famo"), False, "accumulate=1"),
        (methods.MGDA, True, "rep_grad"),
    ],
    ids=["famo-losses-after", "features-route"],
)
def test_combinations_that_cannot_be_exact_are_refused(method, rep_grad, match):
    with pytest.raises(ConfigError, match=match):
        train(Joint(method()), 2, rep_grad=rep_grad)


def test_accumulate_is_validated():
    with pytest.raises(ConfigError, match="accumulate must be >= 1"):
        TrainConfig(accumulate=0)
    with pytest.raises(Exception, match="accumulate must be an integer"):
        Trainer(tiny_hps(), [Task(t, mse) for t in TASKS], accumulate=0)
