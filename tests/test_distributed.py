"""DDP (torch.distributed, gloo, 2 CPU processes): the step on two half-batches equals the step of
one process on the whole batch; only rank 0 writes; the CLI under torchrun.

One spawn of two processes runs every scenario (each process pays a few seconds of start-up);
the single-process references run in the test process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_hps
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtlkit import Alternating, Budget, ConfigError, Joint, Task, Trainer, methods
from mtlkit.architectures import HPS
from mtlkit.engine.precision import LossScaler, Precision
from mtlkit.methods.base import Decision, GradientAggregator
from mtlkit.parallel.ddp import Reducer, shard_batch, shard_loader
from mtlkit.training.optim import optimizer

TASKS = ["t0", "t1", "t2"]
WORLD = 2


class Pairs(Dataset):
    """16 samples ``(x [5], {task: y})``, float64; ``huge`` scales the second half's targets."""

    def __init__(self, huge: float = 1.0) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        self.y = torch.randn(16, 3, generator=gen, dtype=torch.float64)
        self.y[8:] *= huge

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        return self.x[i], {t: self.y[i, k] for k, t in enumerate(TASKS)}


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.squeeze(-1) - target) ** 2).mean()


def bn_hps() -> HPS:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh())
    return HPS(encoder, {t: nn.Linear(4, 1) for t in TASKS}).double()


# name -> (strategy factory, rep_grad, model factory, compare with one process)
SCENARIOS = {
    "ew": (lambda: Joint(methods.EW()), False, tiny_hps, True),
    "mgda": (lambda: Joint(methods.MGDA()), False, tiny_hps, True),
    "upgrad": (lambda: Joint(methods.UPGrad()), False, tiny_hps, True),
    "upgrad_features": (lambda: Joint(methods.UPGrad()), True, tiny_hps, True),  # Gramian sum
    "gradvac_features": (
        lambda: Joint(methods.get("gradvac", generator=0)),
        True,
        tiny_hps,
        True,
    ),  # gather
    "famo": (lambda: Joint(methods.get("famo")), False, tiny_hps, True),
    "uw": (lambda: Joint(methods.UW()), False, tiny_hps, True),
    "alternating": (
        lambda: Alternating(
            methods.UPGrad(), groups=[["t0", "t1"], ["t2"]], optimizers="per_group"
        ),
        False,
        tiny_hps,
        True,
    ),
    "modo": (lambda: Joint(methods.get("modo", gamma=0.5)), False, tiny_hps, True),  # extra J's
    "batchnorm": (lambda: Joint(methods.MGDA()), False, bn_hps, False),  # ranks agree
    # DDP with 2 micro-batches per process against one process without accumulation
    "mgda_accumulate": (lambda: Joint(methods.MGDA()), False, tiny_hps, True),
    "uw_accumulate": (lambda: Joint(methods.UW()), False, tiny_hps, True),
}
DDP_ONLY = {"mgda_accumulate": {"accumulate": 2}, "uw_accumulate": {"accumulate": 2}}


def train(name: str, out_dir: Path | None = None, **kwargs) -> tuple[Trainer, dict]:
    """Two batches of 8 (one epoch) with SGD; returns the trainer and its final state."""
    make_strategy, rep_grad, make_model, _ = SCENARIOS[name]
    strategy = make_strategy()
    trainer = Trainer(
        make_model(),
        [Task(t, mse) for t in TASKS],
        strategy,
        optimizer("sgd", lr=0.1, momentum=0.9),
        budget=Budget(epochs=1),
        rep_grad=rep_grad,
        progress=False,
        track_exploration=False,
        out_dir=out_dir,
        **kwargs,
    )
    data = DataLoader(
        Pairs(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    trainer.fit(data)
    state = {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "methods": [m.state_dict() for m in strategy.methods()],
    }
    return trainer, state


def overflow_step() -> dict:
    """One EW step whose scaled gradients overflow on rank 1's half only (huge targets: float64
    gradients of order 1e6 times a scale of 2**1016 exceed 1.8e308; rank 0's stay finite)."""
    model = tiny_hps()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = LossScaler(init_scale=2.0**1016)
    trainer = Trainer(
        model,
        [Task(t, mse) for t in TASKS],
        Joint(methods.EW()),
        optimizer("sgd", lr=0.1),
        budget=Budget(steps=1),
        progress=False,
        track_exploration=False,
        amp=Precision("none", scaler=scaler),
    )
    trainer.fit(DataLoader(Pairs(huge=1e6), batch_size=16))
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return {"scale": scaler.scale, "skipped": scaler.skipped, "unchanged": unchanged}


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD
    )
    try:
        for name in SCENARIOS:
            out = Path(folder) / f"run-{name}-rank{rank}" if name == "ew" else None
            trainer, state = train(name, out, **DDP_ONLY.get(name, {}))
            reducer = trainer.parallel.reducer
            state["traffic"] = dict(reducer.traffic.bytes)
            torch.save(state, Path(folder) / f"{name}-{rank}.pt")
        torch.save(overflow_step(), Path(folder) / f"overflow-{rank}.pt")
        try:  # refused before the first collective, on every rank alike
            train("upgrad", route="gramian")
            refused = ""
        except ConfigError as error:
            refused = str(error)
        torch.save(refused, Path(folder) / f"gramian-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(folder),), nprocs=WORLD, join=True)
    return folder


def _load(folder: Path, name: str, rank: int):
    return torch.load(folder / f"{name}-{rank}.pt", weights_only=False)


def _assert_state_close(a, b, atol: float) -> None:
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
        else:
            assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_state_close(a[k], b[k], atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_close(x, y, atol)
    else:
        assert a == b


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_step_on_two_halves_equals_one_process_on_the_batch(ddp_results, name):
    rank0, rank1 = _load(ddp_results, name, 0), _load(ddp_results, name, 1)
    # every process ends with the same weights and method state (buffers broadcast from rank 0)
    _assert_state_close(rank0["model"], rank1["model"], atol=0)
    _assert_state_close(rank0["methods"], rank1["methods"], atol=0)
    if not SCENARIOS[name][3]:
        return
    _, single = train(name)
    moved = max(
        float((single["model"][k] - v).abs().max()) for k, v in tiny_hps().state_dict().items()
    )
    assert moved > 1e-3  # the step did something
    # float64 models: equal to rounding (UW's float32 log-variances round at 1e-9)
    _assert_state_close(rank0["model"], single["model"], atol=1e-8)
    _assert_state_close(rank0["methods"], single["methods"], atol=1e-8)


def test_what_each_route_communicates(ddp_results):
    """The parameter route all-reduces the Jacobian and not the shared gradients again; a
    Gramian weighting on the features route moves m x m Gramians, no Jacobian."""
    m, n_shared = 3, 5 * 7 + 7 + 7 * 4 + 4
    traffic = {name: _load(ddp_results, name, 0)["traffic"] for name in SCENARIOS}
    assert traffic["ew"].get("jacobian", 0) == 0 and traffic["ew"]["gradients"] > 0
    assert traffic["upgrad"]["jacobian"] == 2 * m * n_shared * 8  # 2 steps, float64
    heads = list(tiny_hps().heads.parameters())
    flags = len(heads)  # one presence flag per tensor rides along
    assert traffic["upgrad"]["gradients"] == 2 * (sum(p.numel() for p in heads) + flags) * 8
    assert traffic["upgrad_features"]["gramian"] == 2 * m * m * 8
    assert "jacobian" not in traffic["upgrad_features"]
    assert "features" in traffic["gradvac_features"]


def test_overflow_on_one_rank_skips_the_step_on_every_rank(ddp_results):
    for rank in range(WORLD):
        result = torch.load(ddp_results / f"overflow-{rank}.pt", weights_only=False)
        assert result == {"scale": 2.0**1015, "skipped": 1, "unchanged": True}


def test_the_gramian_route_is_refused_under_ddp_naming_the_routes_that_work(ddp_results):
    for rank in range(WORLD):
        message = torch.load(ddp_results / f"gramian-{rank}.pt", weights_only=False)
        assert "route=gramian cannot run under DDP" in message
        assert "cross terms" in message and "route=auto" in message and "rep_grad" in message


def test_only_rank_zero_writes(ddp_results):
    written = ddp_results / "run-ew-rank0"
    assert {"summary.json", "model.pt", "steps.csv", "metrics.csv"} <= {
        p.name for p in written.iterdir()
    }
    assert not (ddp_results / "run-ew-rank1").exists()


def test_shards_are_contiguous_equal_parts_of_the_global_batch():
    data = DataLoader(Pairs(), batch_size=6, shuffle=True, generator=torch.Generator())
    data.generator.manual_seed(1)
    whole = [x for x, _ in data]
    parts = []
    for rank in range(2):
        data.generator.manual_seed(1)  # the same shuffled order on every process
        parts.append([x for x, _ in shard_loader(data, rank, 2)])
    assert [len(p) for p in parts] == [3, 3]
    for b in range(2):  # 6 = 3 + 3
        torch.testing.assert_close(torch.cat([parts[0][b], parts[1][b]]), whole[b])
    # the last batch of 4 splits 2 + 2; a batch of 3 would be padded with its first sample
    assert [len(parts[r][2]) for r in range(2)] == [2, 2]
    odd = torch.arange(3)
    assert [shard_batch(odd, r, 2).tolist() for r in range(2)] == [[0, 1], [2, 0]]


def test_a_single_process_reducer_only_unscales():
    reducer = Reducer(scaler=LossScaler(init_scale=8.0), distributed=False)
    jac = torch.tensor([[8.0, 0.0], [0.0, 16.0]])
    seen = []

    class Spy(GradientAggregator):
        def aggregate(self, jacobian, losses=None, blocks=None):
            seen.append(jacobian.clone())
            return Decision(direction=jacobian.sum(dim=0))

    decision = reducer.aggregate(Spy(), jac, torch.ones(2), [torch.zeros(2)], features=False)
    torch.testing.assert_close(seen[0], jac / 8)
    torch.testing.assert_close(decision.direction, jac.sum(dim=0))  # back in the scaled units
    assert decision.weights is None


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_cli_trains_with_two_processes_and_rank_zero_writes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mtlkit",
        "train",
        "steps=4",
        "epochs=null",
        "method=upgrad",
        "batch_size=32",
        "plots=false",
        "progress=false",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1  # rank 1 did not make a folder of its own
    names = {p.name for p in runs[0].iterdir()}
    assert {"config.yaml", "summary.json", "model.pt", "metrics.csv", "steps.csv"} <= names
    assert done.stdout.count("results written to") == 1  # rank 0 reports
    steps = (runs[0] / "steps.csv").read_text().strip().splitlines()
    assert len(steps) == 1 + 4  # header + one row per step, written once


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGTERM to torchrun (it forwards it to both workers): every rank stops at the same batch,
    rank 0 writes the checkpoint; ``--resume`` under torchrun ends bit-identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    train = [*launch, "2", "-m", "mtlkit", "train", "--no-progress"]
    config = ["method=mgda", "epochs=2", "plots=false"]
    subprocess.run([*train, *config, "out=ref"], cwd=tmp_path, env=env, check=True, timeout=300)
    run = tmp_path / "run"
    process = subprocess.Popen(
        [*train, *config, "out=run"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    steps = run / "steps.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if steps.exists() and len(steps.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert (run / "checkpoint.pt").exists() and not (run / "model.pt").exists()
    assert stderr.count("checkpoint saved to") == 1  # rank 0 reports
    resume = [*train, "--resume", "run"]
    subprocess.run(resume, cwd=tmp_path, env=env, check=True, timeout=300)
    ref = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["model"]
    resumed = torch.load(run / "model.pt", weights_only=True)["model"]
    assert ref.keys() == resumed.keys()
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert (tmp_path / "ref" / "steps.csv").read_text().count("\n") == steps.read_text().count("\n")
