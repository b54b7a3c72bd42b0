"""Loss weightings computed from the history of the task losses: DWA (epoch means) and SLAW
(running moments).

Both only see the per-step losses in ``forward``; they keep the statistics they need themselves
(in float64 buffers, saved by ``state_dict``, restored by ``reset``), so they work the same in
the Trainer and in a user's own loop (where DWA needs ``on_epoch_end`` to be called at the end of
each epoch).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from mtlkit.errors import ConfigError
from mtlkit.methods.base import WeightedLoss
from mtlkit.methods.registry import METHODS
from mtlkit.methods.weighting import TaskStateWeighting

F64 = torch.float64


@METHODS.register("dwa")
class DWA(TaskStateWeighting):
    """Dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, eq. 7).

    With ``L̄_k(e)`` the mean training loss of task ``k`` over epoch ``e`` (averaged by the method
    itself over the losses it sees in ``forward``)::

        r_k = L̄_k(e-1) / L̄_k(e-2),    w_k = m · exp(r_k / T) / Σ_i exp(r_i / T)

    during epoch ``e``; ``w_k = 1`` during the first two epochs (``e = 0, 1``), as in the paper
    and its code. A task whose loss falls more slowly gets more weight; the weights sum to ``m``.
    The epoch boundaries come from ``on_epoch_end`` (the strategies call it).

    Args:
        temperature: ``T > 0`` (2 in the paper): the larger, the closer the weights are to 1.
        num_tasks: number of tasks; if ``None``, set by ``setup`` or by the first call.

    Raises:
        ConfigError: (a ``ValueError``) at the end of an epoch whose mean loss is ``≤ 0`` for
            some task: the ratio of the last two means is then meaningless.
    """

    size_key = "epoch_sum"

    def __init__(self, temperature: float = 2.0, num_tasks: int | None = None) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
        self.temperature = float(temperature)
        if num_tasks is not None:
            self.setup(num_tasks)

    def init_state(self, num_tasks: int) -> None:
        self.register_buffer("epoch_sum", torch.zeros(num_tasks, dtype=F64))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("means", torch.ones(2, num_tasks, dtype=F64))  # L̄(e-2), L̄(e-1)
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    def reset_state(self) -> None:
        self.epoch_sum.zero_()
        self.epoch_steps.zero_()
        self.means.fill_(1.0)
        self.epochs.zero_()

    def current_weights(self) -> Tensor:
        """The ``[m]`` float64 weights of the current epoch."""
        if int(self.epochs) < 2:
            return torch.ones_like(self.epoch_sum)
        ratios = self.means[1] / self.means[0]
        return self.means.shape[1] * torch.softmax(ratios / self.temperature, dim=0)

    def forward(self, losses: Tensor) -> WeightedLoss:
        values = self.task_values(losses)
        weights = self.current_weights().to(losses.dtype)
        self.epoch_sum += values.to(F64)
        self.epoch_steps += 1
        return WeightedLoss(weights)

    def on_epoch_end(self, epoch: int) -> None:
        if self.num_tasks is None:
            return
        if int(self.epoch_steps) == 0:
            warnings.warn(
                "DWA saw no losses during this epoch: its loss history is unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        mean = self.epoch_sum / self.epoch_steps
        if bool((mean <= 0).any()):
            i = int((mean <= 0).nonzero()[0])
            raise ConfigError(
                f"DWA needs positive epoch-mean losses (it divides the last two); task {i} has "
                f"mean loss {float(mean[i]):g} this epoch"
            )
        self.means[0] = self.means[1]
        self.means[1] = mean
        self.epochs += 1
        self.epoch_sum.zero_()
        self.epoch_steps.zero_()


@METHODS.register("slaw")
class SLAW(TaskStateWeighting):
    """Scaled loss approximate weighting (Crawshaw & Košecká, "SLAW: Scaled Loss Approximate
    Weighting for Efficient Multi-Task Learning", arXiv:2109.08218, 2021).

    Balances the norms of the tasks' gradients, as GradNorm-style methods do, at the cost of EW:
    the norm of task ``i``'s gradient is estimated by the standard deviation of its loss across
    steps. Each step, with the current losses ``L_i``::

        a_i ← (1 - α_t) a_i + α_t L_i²,    b_i ← (1 - α_t) b_i + α_t L_i,
        s_i = sqrt(max(a_i - b_i², ε)),
        w_i = m · (1 / s_i) / Σ_j (1 / s_j),

    so the weights are inversely proportional to the estimated standard deviations of the losses
    and sum to ``m``. The moments are updated with the current losses before the weights are
    computed. ``α_t = 1 - β`` is the paper's moving average; as in the authors' code
    (``mtcrawshaw/meta``, ``RunningStats``), the first ``T = round(1 / (1 - β))`` steps use
    ``α_t = 1 / t`` (arithmetic means), which removes the bias of starting the averages from 0
    (with ``a = b = 0`` at the start, ``a - b²`` overestimates the variance by about
    ``β^t E[L]²`` for thousands of steps when a loss's mean is large compared with its spread).
    At the first step every variance is 0, so every ``s_i = sqrt(ε)`` and the weights are 1, as
    in that code. ``ε = 1e-10`` floors the standard deviation at ``1e-5``, that code's floor.

    Args:
        beta: ``β ∈ [0, 1)``, the decay of the moving averages (0.99 in the authors' code).
        eps: ``ε > 0``, the floor on the estimated variance.
        num_tasks: number of tasks; if ``None``, set by ``setup`` or by the first call.
    """

    size_key = "first_moment"

    def __init__(
        self, beta: float = 0.99, eps: float = 1e-10, num_tasks: int | None = None
    ) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be > 0 and finite, got {eps}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.mean_steps = round(1.0 / (1.0 - self.beta))
        if num_tasks is not None:
            self.setup(num_tasks)

    def init_state(self, num_tasks: int) -> None:
        self.register_buffer("first_moment", torch.zeros(num_tasks, dtype=F64))
        self.register_buffer("second_moment", torch.zeros(num_tasks, dtype=F64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def reset_state(self) -> None:
        self.first_moment.zero_()
        self.second_moment.zero_()
        self.steps.zero_()

    def std(self) -> Tensor:
        """The current estimates ``s_i`` (float64)."""
        variance = self.second_moment - self.first_moment.square()
        return variance.clamp_min(self.eps).sqrt()

    def forward(self, losses: Tensor) -> WeightedLoss:
        values = self.task_values(losses).to(F64)
        self.steps += 1
        steps = int(self.steps)
        rate = 1.0 / steps if steps <= self.mean_steps else 1.0 - self.beta
        self.second_moment.lerp_(values.square(), rate)
        self.first_moment.lerp_(values, rate)
        inverse = self.std().reciprocal()
        weights = values.numel() * inverse / inverse.sum()
        return WeightedLoss(weights.to(losses.dtype))
