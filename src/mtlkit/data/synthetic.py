"""The synthetic regression tasks of MMoE, with the task correlation as a parameter.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts" (KDD 2018), Sec. 3.2: two regression tasks whose relatedness is set by the
cosine ``p`` between their weight vectors, so that a method's behaviour can be studied against a
known task correlation.

Generator (``d = input_dim``, ``c = scale``, ``m = num_sines``, ``T = num_tasks``):

1. *Structure* (fixed by ``structure_seed``, the same for every ``correlation`` and ``seed``):
   orthonormal ``u_1 .. u_T`` in ``R^d`` (QR of a Gaussian ``d x T`` matrix, signs fixed so that
   ``diag(R) > 0``), then ``alpha_i, beta_i ~ N(0, 1)``, ``i = 1..m`` (the paper calls them
   "given parameters"; public re-implementations draw them from N(0, 1)).
2. Weights: ``w_1 = c u_1`` and ``w_t = c (p u_1 + sqrt(1 - p^2) u_t)`` for ``t >= 2``; so
   ``cos(w_1, w_t) = p`` (the paper's two tasks for ``T = 2``; with more tasks, tasks ``t, s >= 2``
   have cosine ``p^2``).
3. Samples (fixed by ``seed``; split ``k`` = train 0, val 1, test 2 has its own generator):
   ``x ~ N(0, I_d)``, then ``eps_t ~ N(0, noise^2)``, and
   ``y_t = w_t . x + sum_i sin(alpha_i w_t . x + beta_i) + eps_t``.

With ``num_sines=0`` and ``noise=0`` the Pearson correlation of ``y_1`` and ``y_t`` is exactly
``p`` in the population; the sines make it smaller (the paper, Fig. 3, shows that it stays
monotone in ``p``). Defaults as in the paper: ``d = 100``, ``c = 1``, ``m = 10``, noise std 0.1
(variance 0.01), 10000 training samples.

Tasks ``y1 .. yT``: MSE on a ``[B, 1]`` output against ``[B, 1]`` targets, metrics ``mse`` and
``mae`` (lower is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.errors import ConfigError
from mtlkit.metrics import MeanAbsoluteError, MeanSquaredError
from mtlkit.tasks import Task

__all__ = ["MMoEStructure", "MMoESynthetic", "mmoe_synthetic", "mmoe_tasks", "task_names"]

SPLITS = ("train", "val", "test")


def task_names(num_tasks: int) -> list[str]:
    """``["y1", "y2", ...]``."""
    return [f"y{t + 1}" for t in range(num_tasks)]


def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence(list(key)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


@dataclass(frozen=True)
class MMoEStructure:
    """The fixed part of the generator (float64).

    Attributes:
        weights: ``[T, d]``, the task weight vectors ``w_t``.
        alpha, beta: ``[m]``, the parameters of the sines.
    """

    weights: Tensor
    alpha: Tensor
    beta: Tensor

    def targets(self, x: Tensor) -> Tensor:
        """The noiseless targets ``[N, T]`` of inputs ``x`` ``[N, d]``."""
        z = x.to(torch.float64) @ self.weights.T
        sines = torch.sin(z.unsqueeze(-1) * self.alpha + self.beta).sum(-1)
        return z + sines


class MMoESynthetic(Dataset):
    """One split: ``(x float32 [d], {task: float32 [1]})`` items.

    Attributes:
        inputs: float32 ``[N, d]``.
        labels: float32 ``[N, T]``.
        structure: the :class:`MMoEStructure` the labels come from.
    """

    def __init__(self, inputs: Tensor, labels: Tensor, structure: MMoEStructure, split: str = ""):
        self.inputs = inputs.to(torch.float32).contiguous()
        self.labels = labels.to(torch.float32).contiguous()
        self.names = task_names(self.labels.shape[1])
        self.structure = structure
        self.split = split

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        row = self.labels[i]
        return self.inputs[i], {name: row[t : t + 1] for t, name in enumerate(self.names)}

    def __repr__(self) -> str:
        return f"MMoESynthetic(split={self.split!r}, n={len(self)}, tasks={len(self.names)})"


def _structure(
    num_tasks: int, input_dim: int, num_sines: int, correlation: float, scale: float, seed: int
) -> MMoEStructure:
    gen = _generator(0, seed, input_dim, num_tasks)
    gaussian = torch.randn(input_dim, num_tasks, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    u = (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).T  # [T, d], orthonormal rows
    g = _generator(1, seed, num_sines)
    alpha = torch.randn(num_sines, generator=g, dtype=torch.float64)
    beta = torch.randn(num_sines, generator=g, dtype=torch.float64)
    p = float(correlation)
    rows = [u[0]] + [
        p * u[0] + math.sqrt(max(0.0, 1.0 - p * p)) * u[t] for t in range(1, num_tasks)
    ]
    return MMoEStructure(weights=scale * torch.stack(rows), alpha=alpha, beta=beta)


def mmoe_synthetic(
    seed: int = 0,
    correlation: float = 0.5,
    n_train: int = 10000,
    n_val: int = 1000,
    n_test: int = 1000,
    num_tasks: int = 2,
    input_dim: int = 100,
    scale: float = 1.0,
    num_sines: int = 10,
    noise: float = 0.1,
    structure_seed: int = 0,
) -> dict[str, MMoESynthetic]:
    """The splits ``{"train", "val", "test"}``; the same arguments give bit-identical tensors.

    Args:
        seed: seed of the samples.
        correlation: ``p`` in [-1, 1], the cosine between ``w_1`` and each other ``w_t``.
        n_train, n_val, n_test: the sizes of the splits.
        num_tasks: ``T >= 2`` (at most ``input_dim``).
        input_dim: ``d``.
        scale: ``c > 0``, the norm of the weight vectors.
        num_sines: ``m >= 0``.
        noise: the standard deviation of the label noise (>= 0).
        structure_seed: seed of the directions and the sine parameters.

    Raises:
        ConfigError: on a value out of range, naming it, or if ``scale`` and ``noise`` give
            targets beyond float32 (the dtype of the data set).
    """
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_val", n_val, 1),
        ("n_test", n_test, 1),
        ("num_tasks", num_tasks, 2),
        ("input_dim", input_dim, 2),
        ("num_sines", num_sines, 0),
        ("seed", seed, 0),
        ("structure_seed", structure_seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if num_tasks > input_dim:
        raise ConfigError(f"num_tasks ({num_tasks}) must be at most input_dim ({input_dim})")
    for name, value, ok in (
        ("correlation", correlation, lambda v: -1.0 <= v <= 1.0),
        ("scale", scale, lambda v: v > 0),
        ("noise", noise, lambda v: v >= 0),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not ok(value)
        ):
            valid = {"correlation": "in [-1, 1]", "scale": "> 0", "noise": ">= 0"}[name]
            raise ConfigError(f"{name} must be a number {valid}, got {value!r}")
    structure = _structure(
        num_tasks, input_dim, num_sines, correlation, float(scale), structure_seed
    )
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    result: dict[str, MMoESynthetic] = {}
    for k, split in enumerate(SPLITS):
        gen = _generator(2, seed, k)
        x = torch.randn(sizes[split], input_dim, generator=gen, dtype=torch.float64)
        eps = torch.randn(sizes[split], num_tasks, generator=gen, dtype=torch.float64)
        y = structure.targets(x) + float(noise) * eps
        bad = ~torch.isfinite(y.to(torch.float32))  # the data set holds float32 targets
        if bad.any():
            row, task = (int(i) for i in bad.nonzero()[0])
            raise ConfigError(
                f"mmoe_synthetic: scale={scale!r} and noise={noise!r} give a target beyond "
                f"float32 ({split} sample {row}, task {task + 1}: {float(y[row, task])}); "
                "use a smaller scale or noise"
            )
        result[split] = MMoESynthetic(x, y, structure, split=split)
    return result


def _regression_loss(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output, target.to(output.dtype))


def mmoe_tasks(num_tasks: int = 2) -> list[Task]:
    """``y1 .. yT``: MSE, metrics ``mse`` and ``mae``."""
    return [
        Task(name, _regression_loss, {"mse": MeanSquaredError, "mae": MeanAbsoluteError})
        for name in task_names(num_tasks)
    ]
