"""mtlkit.integrations.transformers against the real ``transformers`` package, on the CPU: a tiny
randomly initialised BERT (built offline from a config) with a classification and a regression
head trains under MultiTaskTrainer to the parameters mtlkit.Step gives on the same batches
(features route on the pooled representation, and the parameter route), the method's hooks run,
its state is checkpointed, and what it cannot run is refused."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, TrainingArguments

import mtlkit
from mtlkit import methods
from mtlkit.errors import ConfigError
from mtlkit.integrations import MissingExtraError
from mtlkit.integrations.transformers import METHOD_FILE, MultiHeadModel, MultiTaskTrainer

TASKS = ["cls", "reg"]


def tiny_model(seed: int = 0) -> MultiHeadModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return MultiHeadModel(
        BertModel(config),
        heads={"cls": nn.Linear(16, 3), "reg": nn.Linear(16, 1)},
        losses={"cls": nn.functional.cross_entropy, "reg": nn.functional.mse_loss},
    )


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 40, (n, 8), generator=g)
        self.cls = torch.randint(0, 3, (n,), generator=g)
        self.reg = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        mask = torch.ones(8, dtype=torch.long)
        return {
            "input_ids": self.ids[i],
            "attention_mask": mask,
            "cls": self.cls[i],
            "reg": self.reg[i],
        }


def arguments(tmp_path, **changes):
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    options.update(changes)
    return TrainingArguments(**options)


class Recording(MultiTaskTrainer):
    """Keeps the batches it trained on, to replay them through mtlkit.Step."""

    def training_step(self, model, inputs, *args, **kwargs):
        self.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args, **kwargs)


def train(tmp_path, method, features=True, seed=0, **changes):
    model = tiny_model(seed)
    start = copy.deepcopy(model)
    trainer = Recording(
        model=model,
        args=arguments(tmp_path, **changes),
        train_dataset=Rows(),
        method=method,
        tasks=TASKS,
        features=features,
        shared=None if features else model.encoder.parameters(),
    )
    trainer.batches = []
    trainer.train()
    return trainer, start


def replay(trainer, start, method, features=True):
    """mtlkit.Step on the trainer's batches, with the optimizer the Trainer built (fused AdamW)."""
    optimizer = torch.optim.AdamW(start.parameters(), lr=1e-2, weight_decay=0.0, fused=True)

    def losses(batch):
        out = start(**batch)
        return mtlkit.ForwardResult(out["losses"], out["features"])

    step = mtlkit.Step(
        method,
        optimizer,
        losses,
        features=features,
        tasks=TASKS,
        shared=None if features else start.encoder.parameters(),
    )
    per_epoch = 2  # 16 rows in batches of 8
    for index, batch in enumerate(trainer.batches):
        step(batch)
        if (index + 1) % per_epoch == 0:
            step.end_epoch()
    return start


def distance(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)


@pytest.mark.parametrize(("name", "features"), [("upgrad", True), ("mgda", False)])
def test_an_aggregator_trains_as_with_step(tmp_path, name, features):
    trainer, start = train(tmp_path, methods.get(name), features)
    assert len(trainer.batches) == 4 and trainer.state.global_step == 4
    untouched = copy.deepcopy(start)
    ref = replay(trainer, start, methods.get(name), features)
    assert distance(trainer.model, ref) < 1e-6
    assert distance(trainer.model, untouched) > 1e-3


def test_a_stateful_weighting_runs_its_hooks_and_is_checkpointed(tmp_path, monkeypatch):
    calls = {"after_step": 0, "on_epoch_end": 0}
    for hook in calls:
        original = getattr(methods.FAMO, hook)

        def spy(self, *args, _hook=hook, _original=original):
            calls[_hook] += 1
            return _original(self, *args)

        monkeypatch.setattr(methods.FAMO, hook, spy)
    trainer, start = train(tmp_path, methods.FAMO(), save_strategy="epoch")
    assert calls == {"after_step": 4, "on_epoch_end": 2}
    ref = replay(trainer, start, methods.FAMO())
    assert distance(trainer.model, ref) < 1e-6
    saved = torch.load(tmp_path / "checkpoint-4" / METHOD_FILE, weights_only=False)
    assert saved["epoch"] == 2
    torch.testing.assert_close(saved["method"], trainer.mtl_method.state_dict(), rtol=0, atol=0)
    logged = [row for row in trainer.state.log_history if "loss/cls" in row]
    assert len(logged) == 4 and {"weight/cls", "weight/reg"} <= set(logged[-1])


def test_clipping_uses_max_grad_norm_and_logs_the_norm_before_it(tmp_path):
    trainer, _ = train(tmp_path, methods.EW(), max_grad_norm=1e-3, num_train_epochs=1)
    norms = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    assert len(norms) == 2 and min(norms) > 1e-3  # clipped: the norm before is larger


def test_what_it_cannot_run_is_refused(tmp_path):
    model = tiny_model()
    for changes, match in [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
        ({"remove_unused_columns": True}, "remove_unused_columns=False"),
    ]:
        with pytest.raises(ConfigError, match=match):
            MultiTaskTrainer(
                model=model, args=arguments(tmp_path, **changes), method=methods.EW(), tasks=TASKS
            )
    with pytest.raises(ConfigError, match="shared="):
        MultiTaskTrainer(
            model=model,
            args=arguments(tmp_path),
            method=methods.UPGrad(),
            tasks=TASKS,
            features=False,
        )
    with pytest.raises(ConfigError, match="heads and losses"):
        MultiHeadModel(model.encoder, {"a": nn.Linear(16, 1)}, {"b": nn.functional.mse_loss})


def test_the_missing_extra_is_named(monkeypatch):
    import mtlkit.integrations.transformers as module

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(module, "_BUILT", {})
    with pytest.raises(MissingExtraError, match=r'pip install "mtlkit\[transformers\]"'):
        module.MultiTaskTrainer  # noqa: B018


def test_the_example_trains(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "transformers_mtl.py"
    spec = importlib.util.spec_from_file_location("transformers_mtl", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    result = example.main("upgrad", epochs=1, train_size=64, hidden=16, layers=1)
    assert 0 <= result["marker accuracy"] <= 1
    assert 0 <= result["high mse"] < 1


def test_resuming_from_a_checkpoint_restores_the_method_state(tmp_path):
    first, start = train(tmp_path, methods.FAMO(), save_strategy="epoch")
    model = tiny_model()
    resumed = Recording(
        model=model,
        args=arguments(tmp_path, num_train_epochs=3, save_strategy="no"),
        train_dataset=Rows(),
        method=methods.FAMO(),
        tasks=TASKS,
    )
    resumed.batches = []
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert len(resumed.batches) == 2 and resumed.mtl_epoch == 3
    first.batches += resumed.batches
    ref = replay(first, start, methods.FAMO())
    assert distance(resumed.model, ref) < 1e-6
