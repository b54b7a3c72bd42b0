"""mtlkit.integrations.lightning against the real ``lightning`` package, on the CPU: a few steps of
Lightning training give the parameters that mtlkit's own driver gives on the same batches (a
stateful loss weighting whose hooks run, gradient aggregators on both routes, Alternating, DDP
over two processes), and what the mixin cannot run is refused by name."""

from __future__ import annotations

import sys
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mtlkit
from mtlkit import methods
from mtlkit.errors import ConfigError
from mtlkit.integrations import MissingExtraError
from mtlkit.integrations.lightning import MultiTaskModule, check_trainer, require_lightning
from mtlkit.parallel.ddp import shard_loader
from mtlkit.training.strategies import StrategyContext

TASKS = ["reg", "cls"]
_g = torch.Generator().manual_seed(1)
X, Y_REG = torch.randn(24, 5, generator=_g), torch.randn(24, generator=_g)
Y_CLS = torch.randint(0, 3, (24,), generator=_g)
DATA = TensorDataset(X, Y_REG, Y_CLS)

warnings.filterwarnings("ignore", module="lightning")  # its tips about workers and loggers


class Module(MultiTaskModule, L.LightningModule):
    def __init__(self, method, features=False, batch_size=8, lr_decay=False):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"reg": nn.Linear(8, 1), "cls": nn.Linear(8, 3)})
        self.features, self.batch_size, self.lr_decay = features, batch_size, lr_decay
        self.configure_mtl(method, tasks=TASKS, features=features)

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_parameters(self, task):
        return self.heads[task].parameters()

    def task_losses(self, batch):
        x, y_reg, y_cls = batch
        z = self.encoder(x)
        losses = {
            "reg": ((self.heads["reg"](z).squeeze(-1) - y_reg) ** 2).mean(),
            "cls": nn.functional.cross_entropy(self.heads["cls"](z), y_cls),
        }
        return mtlkit.ForwardResult(losses, features=z) if self.features else losses

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if not self.lr_decay:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)]

    def train_dataloader(self):  # contiguous shards of the same global batches under DDP
        loader = DataLoader(DATA, batch_size=self.batch_size)
        return shard_loader(loader, self.global_rank, self.trainer.world_size)

    def on_train_end(self):
        path = getattr(self, "save_to", None)
        if path is not None:
            torch.save([p.detach().clone() for p in self.parameters()], f"{path}{self.global_rank}")


def fit(module, epochs=2, **trainer):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    options.update(enable_progress_bar=False, enable_model_summary=False, max_epochs=epochs)
    ckpt_path = trainer.pop("ckpt_path", None)
    options.update(trainer)
    L.Trainer(**options).fit(module, ckpt_path=ckpt_path)
    return module


def reference(method, features=False, epochs=2, lr_decay=False):
    """The same model trained by mtlkit.Step on the same (global) batches."""
    ref = Module(method, features, lr_decay=lr_decay)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5) if lr_decay else None
    step = mtlkit.Step(
        method,
        optimizer,
        ref.task_losses,
        shared=ref.encoder.parameters(),
        features=features,
        tasks=TASKS,
    )
    for _ in range(epochs):
        for batch in DataLoader(DATA, batch_size=8):
            step(batch)
        step.end_epoch()
        if scheduler is not None:
            scheduler.step()
    return ref


def distance(a, b) -> float:
    pairs = zip(a, b, strict=True)
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)


def test_a_stateful_loss_weighting_trains_as_with_step_and_its_hooks_run(monkeypatch):
    calls = {"after_step": 0, "on_epoch_end": 0}
    for hook in calls:
        original = getattr(methods.FAMO, hook)

        def spy(self, *args, _hook=hook, _original=original):
            calls[_hook] += 1
            return _original(self, *args)

        monkeypatch.setattr(methods.FAMO, hook, spy)
    trained = fit(Module(methods.FAMO(), lr_decay=True))
    assert calls == {"after_step": 6, "on_epoch_end": 2}  # 3 batches x 2 epochs
    ref = reference(methods.FAMO(), lr_decay=True)
    assert calls == {"after_step": 12, "on_epoch_end": 4}  # the reference's own calls
    assert distance(trained.parameters(), ref.parameters()) < 1e-6
    assert distance(trained.parameters(), Module(methods.EW()).parameters()) > 1e-2  # it moved
    assert trained.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)


def test_dwa_epoch_hook_changes_the_weights_as_with_step():
    trained = fit(Module(methods.DWA()), epochs=3)
    ref = reference(methods.DWA(), epochs=3)
    assert distance(trained.parameters(), ref.parameters()) < 1e-6
    # without its epoch hooks DWA would stay at equal weights: the run differs from EW's
    assert distance(trained.parameters(), fit(Module(methods.EW()), epochs=3).parameters()) > 1e-4


@pytest.mark.parametrize(("name", "features"), [("upgrad", False), ("mgda", True)])
def test_gradient_aggregators_on_both_routes_train_as_with_step(name, features):
    trained = fit(Module(methods.get(name), features))
    ref = reference(methods.get(name), features)
    assert distance(trained.parameters(), ref.parameters()) < 1e-6
    assert distance(trained.parameters(), Module(methods.EW()).parameters()) > 1e-2


def test_alternating_takes_one_step_per_task_as_the_strategy_does():
    trained = fit(Module(mtlkit.Alternating(methods.EW())), epochs=1)
    ref = Module(methods.EW())
    strategy = mtlkit.Alternating(methods.EW())
    strategy.setup(
        StrategyContext(
            model=ref,
            tasks=TASKS,
            optimizer_factory=lambda p: (torch.optim.SGD(p, lr=0.1, momentum=0.9), None),
        )
    )
    for index, batch in enumerate(DataLoader(DATA, batch_size=8)):
        strategy.step(batch, lambda b: mtlkit.ForwardResult(ref.task_losses(b)), 2 * index)
    assert distance(trained.parameters(), ref.parameters()) < 1e-6
    assert trained.trainer.global_step == 6  # Lightning counts the 2 optimizer steps per batch


@pytest.mark.parametrize(("name", "features"), [("upgrad", False), ("mgda", True)])
def test_ddp_over_two_processes_takes_the_global_batch_step(tmp_path, name, features):
    """Two processes of Lightning's DDP (forked, gloo), 4 samples each, take the steps one
    process takes on the 8-sample batches: the method sees the global Jacobian or losses."""
    module = Module(methods.get(name), features, batch_size=8)
    module.save_to = str(tmp_path / "rank")
    fit(module, devices=2, strategy="ddp_fork", use_distributed_sampler=False)
    ref = reference(methods.get(name), features)
    for rank in (0, 1):
        assert distance(torch.load(tmp_path / f"rank{rank}"), ref.parameters()) < 1e-6


def test_the_method_state_is_saved_and_restored_with_lightnings_checkpoint(tmp_path):
    trained = fit(
        Module(methods.DWA()), epochs=2, enable_checkpointing=True, default_root_dir=tmp_path
    )
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(checkpoint, weights_only=False)["mtlkit"]
    assert saved["steps"] == 6
    resumed = Module(methods.DWA())
    fit(resumed, epochs=3, ckpt_path=str(checkpoint))
    ref = reference(methods.DWA(), epochs=3)
    assert trained is not resumed
    assert distance(resumed.parameters(), ref.parameters()) < 1e-6


class _Strategy:  # stand-ins named as Lightning's classes: check_trainer reads the class names
    pass


def _named(name, *bases):
    return type(name, bases or (_Strategy,), {})()


def test_unsupported_strategies_and_precisions_are_refused_by_name():
    assert check_trainer(_named("SingleDeviceStrategy"), "32-true") is False
    ddp = type("DDPStrategy", (_Strategy,), {})
    assert check_trainer(ddp(), "bf16-mixed") is True
    for strategy in ("FSDPStrategy", "ModelParallelStrategy"):
        with pytest.raises(ConfigError, match=strategy):
            check_trainer(_named(strategy), "32-true")
    with pytest.raises(ConfigError, match="DeepSpeedStrategy"):
        check_trainer(type("DeepSpeedStrategy", (ddp,), {})(), "32-true")
    with pytest.raises(ConfigError, match=r"'16-mixed'.*supported: 32-true, 64-true, bf16-mixed"):
        check_trainer(ddp(), "16-mixed")


def test_a_real_trainer_with_fp16_is_refused_before_any_step():
    module = Module(methods.UPGrad())
    with pytest.raises(ConfigError, match="16-true"):
        fit(module, precision="16-true")
    assert module.trainer.global_step == 0


def test_a_module_without_configure_mtl_and_a_bad_method_are_refused():
    class Bare(MultiTaskModule, L.LightningModule):
        pass

    with pytest.raises(ConfigError, match="configure_mtl"):
        Bare().training_step(None, 0)
    with pytest.raises(ConfigError, match="got int"):
        Bare().configure_mtl(3, tasks=TASKS)
    with pytest.raises(ConfigError, match="distinct"):
        Bare().configure_mtl(methods.EW(), tasks=["a", "a"])


def test_the_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(MissingExtraError, match=r'pip install "mtlkit\[lightning\]"'):
        require_lightning()


def test_the_example_trains(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "lightning_mtl.py"
    spec = importlib.util.spec_from_file_location("lightning_mtl", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    accuracy = example.main("famo", epochs=1, train_size=128)
    assert set(accuracy) == {"left", "right"}
    assert all(0 <= a <= 1 for a in accuracy.values())
