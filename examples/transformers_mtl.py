"""mtlkit with Hugging Face Transformers: multi-loss fine-tuning under ``transformers.Trainer``.

A small BERT, randomly initialised from a config (offline: nothing is downloaded), learns two
tasks on synthetic token sequences from its pooled representation: a classification (which of
three marker tokens is most frequent) and a regression (the fraction of "high" tokens). The
tasks are balanced by MGDA on the features route (the Jacobian w.r.t. the pooled
representation), or by any other registered method::

    python examples/transformers_mtl.py [METHOD]

Needs ``pip install "mtlkit[transformers]"``; runs on the CPU in well under a minute.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn
from transformers import BertConfig, BertModel, TrainingArguments

import mtlkit
from mtlkit.integrations.transformers import MultiHeadModel, MultiTaskTrainer

VOCAB, LENGTH = 32, 12


class Sequences(torch.utils.data.Dataset):
    """Random token sequences; ``marker``: the most frequent of tokens 1-3, ``high``: the
    fraction of tokens >= VOCAB/2."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (size, LENGTH), generator=g)
        counts = torch.stack([(self.ids == t).sum(1) for t in (1, 2, 3)], 1)
        self.marker = counts.argmax(1)
        self.high = (self.ids >= VOCAB // 2).float().mean(1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "marker": self.marker[i],
            "high": self.high[i],
        }


def build_model(hidden: int = 32, layers: int = 2) -> MultiHeadModel:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=LENGTH,
    )
    return MultiHeadModel(
        BertModel(config),  # random weights from the config: no download
        heads={"marker": nn.Linear(hidden, 3), "high": nn.Linear(hidden, 1)},
        losses={"marker": nn.functional.cross_entropy, "high": nn.functional.mse_loss},
    )


def main(
    method: str = "mgda",
    epochs: int = 3,
    train_size: int = 512,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model(hidden, layers)
    with tempfile.TemporaryDirectory() as out:
        trainer = MultiTaskTrainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                num_train_epochs=epochs,
                per_device_train_batch_size=32,
                learning_rate=1e-3,
                remove_unused_columns=False,  # the targets are named by task
                report_to=[],
                save_strategy="no",
                logging_strategy="no",
                disable_tqdm=True,
                use_cpu=True,
                seed=seed,
            ),
            train_dataset=Sequences(train_size, seed),
            method=mtlkit.methods.get(method),
            tasks=["marker", "high"],
        )
        trainer.train()
    test = Sequences(512, seed + 1)
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([test[i][k] for i in range(len(test))]) for k in test[0]}
        out = model(**batch)
    accuracy = (out["logits"]["marker"].argmax(1) == test.marker).float().mean().item()
    return {"marker accuracy": accuracy, "high mse": float(out["losses"]["high"])}


if __name__ == "__main__":
    for name, value in main(sys.argv[1] if len(sys.argv) > 1 else "mgda").items():
        print(f"{name}: {value:.4f}")
