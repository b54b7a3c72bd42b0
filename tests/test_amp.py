"""Mixed precision on the CPU (bf16 autocast) and the loss scaler for per-task gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_hps
from torch.utils.data import DataLoader, Dataset

from mtlkit import Budget, ConfigError, Joint, Task, Trainer, methods
from mtlkit.app.config import TrainConfig
from mtlkit.engine.precision import LossScaler, Precision
from mtlkit.methods.base import Decision, GradientAggregator
from mtlkit.training.checkpoint import load_checkpoint
from mtlkit.training.optim import optimizer

TASKS = ["t0", "t1", "t2"]


class Regression(Dataset):
    """64 samples: three smooth targets of x [5] (learnable by the tiny HPS), times ``scale``."""

    def __init__(self, scale: float = 1.0) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 5, generator=gen)
        w = torch.randn(5, 3, generator=gen)
        self.y = torch.tanh(self.x @ w) * scale

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return self.x[i], {t: self.y[i, k] for k, t in enumerate(TASKS)}


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.squeeze(-1) - target) ** 2).mean()


class Spy(GradientAggregator):
    """The mean of the rows; records every Jacobian it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def aggregate(self, jacobian, losses=None, blocks=None):
        self.seen.append(jacobian.detach().clone())
        return Decision(direction=jacobian.mean(dim=0))


def fit(method, amp="none", budget=None, rep_grad=False, scale=1.0, **kwargs):
    model = tiny_hps(dtype=torch.float32)
    trainer = Trainer(
        model,
        [Task(t, mse) for t in TASKS],
        Joint(method),
        kwargs.pop("optimizer", None),
        budget=budget or Budget(epochs=None, steps=2),
        rep_grad=rep_grad,
        amp=amp,
        progress=False,
        track_exploration=False,
        **kwargs,
    )
    loader = DataLoader(
        Regression(scale), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    trainer.fit(loader)
    return trainer, model


@pytest.mark.parametrize(
    ("method", "rep_grad"),
    [(methods.EW, False), (methods.UPGrad, False), (methods.MGDA, True)],
    ids=["ew", "upgrad", "mgda-features"],
)
def test_bf16_training_decreases_the_loss_and_stays_finite(method, rep_grad):
    trainer, model = fit(
        method(),
        amp="bf16",
        budget=Budget(epochs=8),
        rep_grad=rep_grad,
        optimizer=optimizer("adam", lr=0.01),
    )
    first, last = trainer.history[0], trainer.history[-1]
    total = [sum(row[f"train/{t}/loss"] for t in TASKS) for row in (first, last)]
    assert total[1] < 0.8 * total[0]
    assert all(
        bool(torch.isfinite(p).all()) and p.dtype == torch.float32 for p in model.parameters()
    )


@pytest.mark.parametrize("rep_grad", [False, True], ids=["parameters", "features"])
def test_the_method_sees_unscaled_jacobians(rep_grad):
    """Scaling by a power of two commutes with rounding: under bf16 autocast the Jacobians the
    method sees with a scale of 2**10 are exactly those without a scaler; and they are the fp32
    ones up to bf16 precision (not 1024 times them)."""
    seen = {}
    for name, amp in {
        "scaled": Precision("bf16", scaler=LossScaler(init_scale=2.0**10)),
        "bf16": "bf16",
        "fp32": "none",
    }.items():
        spy = Spy()
        _, model = fit(spy, amp=amp, rep_grad=rep_grad)
        seen[name] = (spy.seen, [p.detach().clone() for p in model.parameters()])
    (scaled, w_scaled), (plain, w_plain), (fp32, _) = seen["scaled"], seen["bf16"], seen["fp32"]
    assert len(scaled) == 2
    for a, b, c in zip(scaled, plain, fp32):
        assert a.dtype == torch.float32  # bf16 feature Jacobians are cast for the method
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0.05, atol=0.02 * float(c.abs().max()))
    for p, q in zip(w_scaled, w_plain):  # and the update is the unscaled one
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "rep_grad"),
    [(methods.UW, False), (methods.MGDA, False), (methods.MGDA, True)],
    ids=["uw", "mgda", "mgda-features"],
)
def test_a_loss_scale_leaves_the_float32_steps_unchanged(method, rep_grad):
    """fp32 with a scaler of 2**12: the model's gradients are unscaled exactly, the method's own
    parameters (UW's log-variances) are never scaled, the heads get the unscaled weights."""
    runs = []
    for amp in ["none", Precision("none", scaler=LossScaler(init_scale=2.0**12))]:
        trainer, model = fit(method(), amp=amp, rep_grad=rep_grad, budget=Budget(steps=3))
        own = list(trainer.strategy.methods()[0].parameters())
        runs.append([*model.parameters(), *own])
    assert len(runs[0]) > sum(1 for _ in tiny_hps().parameters()) or method is not methods.UW
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "rep_grad"),
    [(methods.EW, False), (methods.UPGrad, False), (methods.MGDA, True)],
    ids=["ew", "upgrad", "mgda-features"],
)
def test_overflow_skips_the_step_and_backs_off(method, rep_grad):
    """A scale of 2**127 overflows float32/bf16 gradients: the first step is skipped (weights
    unchanged, no NaN), the scale is cut (backoff 2**-20), and the next step is taken."""
    scaler = LossScaler(init_scale=2.0**127, backoff_factor=2.0**-20)
    model0 = tiny_hps(dtype=torch.float32)
    initial = [p.detach().clone() for p in model0.parameters()]
    trainer, model = fit(
        method(),
        amp=Precision("bf16", scaler=scaler),
        rep_grad=rep_grad,
        budget=Budget(epochs=None, steps=1),
        scale=100.0,
    )
    assert scaler.skipped == 1 and scaler.scale == 2.0**107
    for p, q in zip(model.parameters(), initial):
        assert torch.equal(p, q)
    trainer.budget = Budget(epochs=None, steps=2)
    trainer.fit(DataLoader(Regression(100.0), batch_size=16))
    assert scaler.skipped == 1 and scaler.scale == 2.0**107
    changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial))
    assert changed and all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_scaler_rules_follow_grad_scaler():
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    for found, scale in [(False, 8.0), (False, 16.0), (True, 8.0), (False, 8.0), (False, 16.0)]:
        scaler.update(found)
        assert scaler.scale == scale
    loss = torch.tensor(3.0, requires_grad=True)
    scaled = scaler.scale_loss(loss * 2)
    assert float(scaled.detach()) == 6.0
    scaled.backward()
    assert float(loss.grad) == 2.0 * 16.0
    state = scaler.state_dict()
    other = LossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state == {"scale": 16.0, "growth_tracker": 0, "skipped": 1}
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=1.5)


def test_the_scaler_state_is_checkpointed(tmp_path):
    scaler = LossScaler(init_scale=2.0**127, backoff_factor=0.5)
    fit(
        methods.EW(),
        amp=Precision("bf16", scaler=scaler),
        out_dir=tmp_path,
        checkpoint_every=1,
        scale=100.0,
    )
    saved = load_checkpoint(tmp_path)["precision"]["scaler"]
    assert saved == scaler.state_dict() and saved["skipped"] == 2
    resumed = LossScaler()
    trainer = Trainer(
        tiny_hps(dtype=torch.float32),
        [Task(t, mse) for t in TASKS],
        Joint(methods.EW()),
        budget=Budget(epochs=None, steps=2),
        amp=Precision("bf16", scaler=resumed),
        progress=False,
        track_exploration=False,
        out_dir=tmp_path,
    )
    trainer.fit(DataLoader(Regression(100.0), batch_size=16), resume=True)
    assert resumed.scale == 2.0**125 and resumed.skipped == 2


def test_amp_modes_are_checked():
    assert Precision("bf16").scaler is None and not Precision("none").enabled
    assert Precision("bf16", scaler=True).scaler is not None
    with pytest.raises(ConfigError, match="CUDA"):
        Precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="amp must be one of"):
        Precision("fp32")
    with pytest.raises(ConfigError, match="amp must be one of none, bf16, fp16"):
        TrainConfig(amp="fp32")
    assert TrainConfig(amp="bf16").amp == "bf16"


def test_the_gramian_route_runs_under_bf16_and_refuses_a_loss_scale():
    """bf16 alone changes nothing the method sees (no reduction, no scale): the Gramian route
    takes the Jacobian route's step; with a loss scaler its Gramian would carry S², refused."""
    weights = []
    for route in ["auto", "gramian"]:
        _, model = fit(methods.UPGrad(), amp="bf16", route=route)
        weights.append([p.detach().clone() for p in model.parameters()])
    start = [p.detach() for p in tiny_hps(dtype=torch.float32).parameters()]
    assert max(float((p - q).abs().max()) for p, q in zip(weights[0], start)) > 1e-3
    for p, q in zip(*weights, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    scaled = Precision("bf16", scaler=LossScaler(init_scale=2.0**4))
    with pytest.raises(ConfigError, match="route=gramian cannot run under a loss scaler"):
        fit(methods.UPGrad(), amp=scaled, route="gramian")
