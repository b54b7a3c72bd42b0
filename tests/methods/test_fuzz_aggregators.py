"""Fuzz test of every registered method on hostile but finite input (issue 19).

Hypothesis draws Jacobians of ``m = 2..8`` tasks in ``n = 1..40`` dimensions from five families
(generic; rank-deficient; nearly opposite pairs ``g_j = -a g_i + ε``; near-stationary: ``0`` within
``ε`` of the convex hull of the rows; a zero row), rows scaled by log-spaced factors anywhere in
``1e-6..1e6``, in float32 and float64, and short trajectories (Adam steps through
:class:`mtlkit.Step`) on random multi-task quadratics and on the 2-D toy of CAGrad / Nash-MTL /
FAMO started near its Pareto front, so that stateful methods see sequences. Every registered
method must then

* not raise: finite input, positive finite losses and a valid task count are all it gets (a
  refusal at construction would be a :class:`~mtlkit.errors.ConfigError`; the builds here are
  valid), so a ``SolverError`` or ``NonFiniteError`` is a bug;
* return a finite direction of shape ``[n]`` in the Jacobian's dtype (finite weights of shape
  ``[m]``; a loss weighting: finite weights and extra term);
* for the exact solvers, satisfy the optimality conditions of its problem to a tolerance
  relative to the rows involved (not to the largest row, which hid issue 19's case 2):
  MGDA's min-norm KKT ``(G w)_j ≥ wᵀGw`` on the simplex; DualProj's and UPGrad's dual-cone
  projection KKT ``v ≥ u``, ``G v ≥ 0``, ``(v - u)_i (G v)_i = 0`` (UPGrad: each of its ``m``
  projections, and its direction their sum); CAGrad's ball constraint ``|d - g0| ≤ c|g0|`` and
  zero duality gap ``min_i g_i · d = g_ŵ · g0 + c|g0| |g_ŵ|``.

The default run draws few examples (derandomized: CI is reproducible); ``pytest -m slow`` draws
many more of each.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls
from torch import Tensor

import mtlkit
from mtlkit.app.toy import front_x2, loss_lower_bounds, toy_losses
from mtlkit.engine.contract import Decision, WeightedLoss
from mtlkit.methods import METHODS, Method
from mtlkit.methods.base import StepProbe

F32, F64 = torch.float32, torch.float64
NAMES = METHODS.available()
TASKS = {"ngdiff": (2, 2), "krum": (4, 8), "trimmed_mean": (3, 8)}  # the valid task counts
FAMILIES = ("generic", "rank_deficient", "nearly_opposite", "near_stationary", "zero_row")


def task_range(name: str) -> tuple[int, int]:
    return TASKS.get(name, (2, 8))


def build(name: str, m: int, dtype: torch.dtype, **kwargs) -> Method:
    """The registered method ``name`` with its defaults (a fixed seed, one weight per task for
    the fixed weightings), set up for ``m`` tasks, in ``dtype``."""
    arguments = {a.name for a in METHODS.arguments(name)}
    if "generator" in arguments:
        kwargs.setdefault("generator", 7)
    if name in ("constant", "ls"):
        kwargs.setdefault("weights", np.linspace(0.5, 2.0, m).tolist())
    method = METHODS.get(name, **kwargs).to(dtype)
    method.setup(m)
    return method


KIND = {name: build(name, task_range(name)[0], F64).kind for name in NAMES}
AGGREGATORS = [name for name in NAMES if KIND[name] == "gradient"]
WEIGHTINGS = [name for name in NAMES if KIND[name] == "loss"]


# ------------------------------------------------------------------------------- the Jacobians
@dataclass(frozen=True)
class Case:
    """A Jacobian drawn by :func:`cases`; its repr (what hypothesis prints) rebuilds it."""

    family: str
    m: int
    n: int
    seed: int
    lo: float  # rows are scaled by 10**linspace(lo, hi, m), shuffled
    hi: float
    eps: float  # size of the perturbation of the degenerate families
    rank: int
    dtype: torch.dtype

    def array(self) -> np.ndarray:
        """The ``[m, n]`` Jacobian in float64 (before the cast to ``dtype``)."""
        rng = np.random.default_rng(self.seed)
        m, n = self.m, self.n
        if self.family == "rank_deficient":
            rank = max(1, min(self.rank, min(m, n) - 1))
            jac = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        else:
            jac = rng.standard_normal((m, n))
        if self.family == "nearly_opposite":
            order = rng.permutation(m)
            for k in range(int(rng.integers(1, m // 2 + 1))):
                i, j = order[2 * k], order[2 * k + 1]
                noise = rng.standard_normal(n) * np.linalg.norm(jac[i]) / math.sqrt(n)
                jac[j] = -(10 ** rng.uniform(-1, 1)) * jac[i] + self.eps * noise
        elif self.family == "near_stationary":
            support = rng.permutation(m)[: int(rng.integers(2, m + 1))]
            w = np.zeros(m)
            w[support] = rng.dirichlet(np.ones(len(support)))
            jac -= np.outer(w, w @ jac) / (w @ w)  # wᵀJ = 0: 0 is in the hull
            jac += self.eps * rng.standard_normal((m, n)) * np.linalg.norm(jac) / math.sqrt(m * n)
        elif self.family == "zero_row":
            jac[int(rng.integers(m))] = 0.0
        scales = 10 ** np.linspace(self.lo, self.hi, m)
        rng.shuffle(scales)
        return jac * scales[:, None]

    def tensor(self, drift: int = 0) -> Tensor:
        """The Jacobian in ``dtype``; ``drift > 0``: the same with 5% relative noise (the next
        steps of a sequence)."""
        jac = self.array()
        if drift:
            rng = np.random.default_rng([self.seed, drift])
            jac = jac * (1 + 0.05 * rng.standard_normal(jac.shape))
        return torch.from_numpy(jac).to(self.dtype)


@st.composite
def cases(draw: st.DrawFn, tasks: tuple[int, int] = (2, 8), max_n: int = 40) -> Case:
    """A :class:`Case`: the row scales span 0 to 12 decades within ``1e-6..1e6``."""
    span = draw(st.sampled_from([0.0, 1.0, 3.0, 6.0, 9.0, 12.0]))
    lo = draw(st.floats(-6.0, 6.0 - span))
    return Case(
        family=draw(st.sampled_from(FAMILIES)),
        m=draw(st.integers(*tasks)),
        n=draw(st.integers(1, max_n)),
        seed=draw(st.integers(0, 2**32 - 1)),
        lo=lo,
        hi=lo + span,
        eps=draw(st.sampled_from([0.0, 1e-12, 1e-9, 1e-6, 1e-3, 1e-1])),
        rank=draw(st.integers(1, 8)),
        dtype=draw(st.sampled_from([F32, F64])),
    )


def positive_losses(m: int, seed: int, dtype: torch.dtype) -> Tensor:
    rng = np.random.default_rng([seed, 1])
    return torch.from_numpy(10 ** rng.uniform(-3, 3, m)).to(dtype)


def random_blocks(n: int, seed: int) -> list[int]:
    """``n`` columns split into 1-3 blocks (parameter tensors)."""
    rng = np.random.default_rng([seed, 2])
    cuts = sorted(set(rng.integers(1, n, size=int(rng.integers(0, 3))).tolist())) if n > 1 else []
    return np.diff([0, *cuts, n]).tolist()


def probe(m: int, seed: int, dtype: torch.dtype) -> StepProbe:
    """A probe on losses ``c_i exp(a_i · x) + 1`` of four parameters, one ``(a, c)`` per batch."""
    rng = np.random.default_rng([seed, 3])
    directions = torch.from_numpy(rng.standard_normal((2, m, 4))).to(dtype)
    scales = torch.from_numpy(10 ** rng.uniform(-3, 3, (2, m))).to(dtype)
    x = torch.zeros(4, dtype=dtype, requires_grad=True)
    return StepProbe(
        batch=0,
        extra=[1],
        parameters=[x],
        learning_rate=1e-2,
        compute=lambda b: list((scales[b] * torch.exp(directions[b] @ x) + 1).unbind()),
    )


# ------------------------------------------------------------------------ what must always hold
def assert_finite_decision(decision: Decision, m: int, n: int, dtype: torch.dtype) -> None:
    assert isinstance(decision, Decision)
    direction = decision.direction
    assert direction is not None and direction.shape == (n,) and direction.dtype == dtype
    assert bool(torch.isfinite(direction).all()), direction
    for weights in (decision.weights, decision.head_weights):
        if weights is not None:
            assert weights.shape == (m,) and bool(torch.isfinite(weights).all()), weights


def assert_finite_weighting(weighted: WeightedLoss, m: int) -> None:
    assert isinstance(weighted, WeightedLoss) and weighted.weights.shape == (m,)
    assert bool(torch.isfinite(weighted.weights.detach()).all()), weighted.weights
    if weighted.extra is not None:
        assert bool(torch.isfinite(weighted.extra.detach()).all()), weighted.extra


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Solver warnings (Pareto-stationary input, a solve stopped at rounding level) are expected
    on this input and tested elsewhere; everything else still surfaces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# -------------------------------------------------------------------- the optimality conditions
def _unit(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def mgda_residual(jac: Tensor, weights: Tensor) -> float:
    """``max_j (wᵀGw - (G w)_j) / tol_j`` (``≤ 1`` passes) with ``tol_j = |g_j| (1e-9 |d| +
    64 m eps Σ_k w_k |g_k|)``: the solver's own tolerance (1e-12 relative to ``|g_j| |d|``) with
    room, plus the rounding of the weights to the Jacobian's dtype (``|d| ≤ |g_j|`` for all j).
    Checks the simplex too."""
    unit, m = _unit(jac.dtype), jac.shape[0]
    jac, w = jac.double(), weights.double()
    assert bool((w >= 0).all()), w
    assert abs(float(w.sum()) - 1) <= 4 * m * unit, w
    norms = jac.norm(dim=1)
    d = w @ jac
    value, grad = float(d @ d), jac @ d
    tol = norms * (1e-9 * math.sqrt(value) + 64 * m * unit * float(w @ norms))
    excess = value - grad
    return float(torch.where(excess > 0, excess / tol, 0.0).max())


def dual_cone_residual(jac: Tensor, v: Tensor, u: Tensor, complementary: bool = True) -> float:
    """The KKT residual of ``v = argmin_{v ≥ u} vᵀGv`` (``≤ 1`` passes): ``v ≥ u``, ``G v ≥ 0``
    and (``complementary``) ``min(v_i - u_i, (G v)_i) = 0``, each relative to its scale
    (``|v_i| + u_i`` for the weights, ``|g_i| Σ_k |v_k| |g_k|`` for ``(G v)_i``), against
    ``1e-9 + 64 m eps``."""
    unit, m = _unit(jac.dtype), jac.shape[0]
    jac, v, u = jac.double(), v.double(), u.double()
    norms = jac.norm(dim=1)
    product = jac @ (v @ jac)
    size = v.abs() + u.abs()
    slack = torch.where(size > 0, (v - u) / torch.where(size > 0, size, 1.0), 0.0)
    scale = norms * float(v.abs() @ norms)
    active = torch.where(scale > 0, product / torch.where(scale > 0, scale, 1.0), 0.0)
    terms = [-slack, -active]
    if complementary:
        terms.append(torch.minimum(slack, active).abs())
    worst = torch.stack(terms).max()
    return float(worst.clamp_min(0)) / (1e-9 + 64 * m * unit)


def upgrad_residual(jac: Tensor, decision: Decision) -> float:
    """UPGrad is ``Σ_i π(e_i / m)``: each projection (DualProj with that preference) satisfies
    the dual-cone KKT, their directions add up to UPGrad's, and UPGrad's weights are
    feasible (``w ≥ 1/m``, ``G w ≥ 0``)."""
    m = jac.shape[0]
    eye = torch.eye(m, dtype=F64) / m
    worst, total, scale = 0.0, torch.zeros(jac.shape[1], dtype=F64), 0.0
    norms = jac.double().norm(dim=1)
    for i in range(m):
        part = build("dualproj", m, jac.dtype, pref_vector=eye[i].tolist()).aggregate(jac)
        worst = max(worst, dual_cone_residual(jac, part.weights, eye[i]))
        total += part.weights.double() @ jac.double()
        scale += float(part.weights.double().abs() @ norms)
    gap = float((decision.direction.double() - total).norm()) / max(scale, 1e-300)
    mean = torch.full((m,), 1.0 / m, dtype=F64)
    feasible = dual_cone_residual(jac, decision.weights, mean, complementary=False)
    return max(worst, gap / (1e-9 + 64 * m * _unit(jac.dtype)), feasible)


def cagrad_residual(jac: Tensor, decision: Decision, c: float, divisor: float) -> float:
    """CAGrad's certificate (``≤ 1`` passes): ``λ = w s - 1/m ≥ 0`` (``s`` the rescaling
    divisor), ``d = s · direction`` in the ball ``|d - g0| ≤ ρ = c |g0|``, and on its sphere
    zero duality gap: ``min_i g_i · d`` equals the dual ``g_ŵ · g0 + ρ |g_ŵ|`` at
    ``ŵ = λ / Σλ`` (weak duality makes every ``d`` in the ball do no better), relative to
    ``max_i |g_i| (|g0| + ρ)``. Strictly inside the ball the maximin value must be 0
    (Pareto-stationary rows whose dual cone meets the ball)."""
    unit, m = _unit(jac.dtype), jac.shape[0]
    jac = jac.double()
    extra = decision.weights.double() * divisor - 1.0 / m
    g0 = jac.mean(dim=0)
    radius = c * float(g0.norm())
    d = decision.direction.double() * divisor
    norms = jac.norm(dim=1)
    scale = float(norms.max()) * (float(g0.norm()) + radius)
    rtol = 1e-9 + 64 * m * unit
    if scale == 0:
        return 0.0
    assert float(extra.min()) >= -rtol * (1.0 / m + float(extra.abs().max())), extra
    offset = float((d - g0).norm())
    assert offset <= radius * (1 + rtol) + rtol * float(d.norm()), (offset, radius)
    primal = float((jac @ d).min())
    if offset < radius * (1 - 1e-4) or float(extra.sum()) <= 0:
        return abs(primal) / (rtol * scale)
    w = extra / extra.sum()
    gw = w @ jac
    dual = float(gw @ g0) + radius * float(gw.norm())
    return abs(dual - primal) / (rtol * scale)


EXACT: dict[str, tuple[str, dict, Callable[[Tensor, Decision], float]]] = {
    "mgda": ("mgda", {}, lambda jac, dec: mgda_residual(jac, dec.weights)),
    "upgrad": ("upgrad", {}, upgrad_residual),
    "dualproj": (
        "dualproj",
        {},
        lambda jac, dec: dual_cone_residual(
            jac, dec.weights, torch.full((jac.shape[0],), 1.0 / jac.shape[0], dtype=F64)
        ),
    ),
    "cagrad": ("cagrad", {}, lambda jac, dec: cagrad_residual(jac, dec, 0.4, 1.16)),
    "cagrad(c=0.5,rescale=0)": (
        "cagrad",
        {"c": 0.5, "rescale": 0},
        lambda jac, dec: cagrad_residual(jac, dec, 0.5, 1.0),
    ),
}
"""The exact solvers: registered name, arguments, residual of the decision (``≤ 1`` passes)."""
EXACT_DEFAULTS = {"mgda", "upgrad", "dualproj", "cagrad"}  # the exact ones among the defaults


def spread(jac: Tensor) -> float:
    """The ratio of the largest to the smallest non-zero row norm."""
    norms = jac.double().norm(dim=1)
    norms = norms[norms > 0]
    return float(norms.max() / norms.min()) if len(norms) else 1.0


def hull_gap(jac: Tensor) -> float:
    """``|d| / max_i |g_i|`` for MGDA's min-norm point ``d``: how far from Pareto-stationary."""
    jac = jac.double()
    top = float(jac.norm(dim=1).max())
    if top == 0:
        return 0.0
    with quiet():
        d = build("mgda", jac.shape[0], F64).aggregate(jac).direction
    return float(d.norm()) / top


def checked_exactly(key: str, jac: Tensor, decision: Decision) -> bool:
    """Whether :data:`EXACT`'s ``key`` solver is held to its optimality conditions on ``jac``
    here. Not in the regimes where they are known to be exact only approximately (issue 19;
    narrow these as they are fixed):

    * MGDA: a solve that reports ``converged=False`` ("stopped at rounding level") within
      ``1e-6`` of stationarity (the near-stationary case of
      :func:`test_mgda_near_stationary_kkt` converges now; the slow run still finds
      ``nearly_opposite`` ones, e.g. m=5, n=7, seed=1025, rows 1..1e6, eps=1e-12: the entering
      task, of norm 6e-7, is dropped again by the minor cycle);
    * CAGrad: within ``1e-4`` of stationarity: below ``stationary_distance`` (1.5e-7) it returns
      ``g0`` projected onto the dual cone, optimal to the hull distance only
      (:func:`test_cagrad_near_stationary`; it left the ball by 88%), and between that and
      ``1e-6`` the multipliers reach 1e2 and more, so that the ball checked on ``J`` (not on
      the Gramian, where the certificate holds) is off by more than the checker's tolerance.
      (Row norms spread beyond 1e3 were exempt too; the slow run, 3000 examples per case,
      holds them now, after the active-set polish of ``cagrad_solve``.)

    UPGrad and DualProj are held to them everywhere (they solve on the cosines since the
    badly scaled cases of :func:`test_dual_cone_badly_scaled_rows`).
    """
    if key == "mgda":
        status = decision.status
        return status is None or status.converged or hull_gap(jac) > 1e-6
    if key.startswith("cagrad"):
        return hull_gap(jac) >= 1e-4
    return True


def assert_exact(key: str, jac: Tensor, decision: Decision) -> None:
    if checked_exactly(key, jac, decision):
        with quiet():
            residual = EXACT[key][2](jac, decision)
        assert residual <= 1.0, (key, residual, decision.status)


# ---------------------------------------------------------------------------------- the tests
DEFAULT = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SLOW = settings(DEFAULT, max_examples=300)


def _aggregate_sequence(name: str, case: Case, steps: int) -> None:
    """``steps`` Jacobians of ``case`` (drifting) through a fresh ``name``, with its hooks."""
    method = build(name, case.m, case.dtype)
    losses = positive_losses(case.m, case.seed, case.dtype)
    blocks = random_blocks(case.n, case.seed)
    with quiet():
        for step in range(steps):
            jac = case.tensor(step)
            method.before_step(step)
            if method.extra_batches:
                extra = [case.tensor(steps + step + k + 1) for k in range(method.extra_batches)]
                method.observe_extra(extra)
            decision = method.aggregate(jac, losses * (1 + 0.1 * step), blocks)
            assert_finite_decision(decision, case.m, case.n, case.dtype)
            if name in EXACT_DEFAULTS:
                assert_exact(name, jac, decision)
            method.after_step(None)
            method.on_epoch_end(step)


def _aggregator_cases(name: str) -> st.SearchStrategy:
    return st.tuples(cases(task_range(name)), st.integers(1, 3))


@pytest.mark.parametrize("name", AGGREGATORS)
@DEFAULT
@given(data=st.data())
def test_aggregators_on_hostile_jacobians(name: str, data: st.DataObject) -> None:
    case, steps = data.draw(_aggregator_cases(name), label="case, steps")
    _aggregate_sequence(name, case, steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", AGGREGATORS)
@SLOW
@given(data=st.data())
def test_aggregators_on_hostile_jacobians_long(name: str, data: st.DataObject) -> None:
    case, steps = data.draw(_aggregator_cases(name), label="case, steps")
    _aggregate_sequence(name, case, steps)


def _exact(key: str, case: Case) -> None:
    name, kwargs, _ = EXACT[key]
    jac = case.tensor()
    with quiet():
        decision = build(name, case.m, case.dtype, **kwargs).aggregate(jac)
    assert_finite_decision(decision, case.m, case.n, case.dtype)
    assert_exact(key, jac, decision)


@pytest.mark.parametrize("key", list(EXACT))
@settings(DEFAULT, max_examples=30)
@given(case=cases())
def test_exact_solvers_meet_their_optimality_conditions(key: str, case: Case) -> None:
    _exact(key, case)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(EXACT))
@settings(DEFAULT, max_examples=3000)
@given(case=cases())
def test_exact_solvers_meet_their_optimality_conditions_long(key: str, case: Case) -> None:
    _exact(key, case)


# ------------------------------------------------------------------ loss weightings, random losses
@st.composite
def loss_sequences(draw: st.DrawFn, max_steps: int = 6) -> tuple[np.ndarray, int, torch.dtype]:
    """``[steps + 1, m]`` positive losses in ``1e-6..1e6``: a random start, then jumps of up to
    ``10**jump`` per step (the last row: the losses after the last step)."""
    m = draw(st.integers(2, 8))
    steps = draw(st.integers(1, max_steps))
    seed = draw(st.integers(0, 2**32 - 1))
    jump = draw(st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    rng = np.random.default_rng(seed)
    exponents = rng.uniform(-6, 6, m) + np.cumsum(rng.uniform(-jump, jump, (steps + 1, m)), axis=0)
    return 10 ** np.clip(exponents, -6, 6), seed, draw(st.sampled_from([F32, F64]))


def _weigh_sequence(name: str, sequence: tuple[np.ndarray, int, torch.dtype]) -> None:
    values, seed, dtype = sequence
    m = values.shape[1]
    method = build(name, m, dtype)
    with quiet():
        for step in range(values.shape[0] - 1):
            method.before_step(step)
            if method.needs_probe:
                method.prepare(probe(m, seed + step, dtype))
            weighted = method(torch.from_numpy(values[step]).to(dtype))
            assert_finite_weighting(weighted, m)
            after = torch.from_numpy(values[step + 1]).to(dtype)
            method.after_step(after if method.needs_losses_after else None)
            method.on_epoch_end(step)


@pytest.mark.parametrize("name", WEIGHTINGS)
@DEFAULT
@given(sequence=loss_sequences())
def test_loss_weightings_on_random_losses(name: str, sequence) -> None:
    _weigh_sequence(name, sequence)


@pytest.mark.slow
@pytest.mark.parametrize("name", WEIGHTINGS)
@SLOW
@given(sequence=loss_sequences(max_steps=30))
def test_loss_weightings_on_random_losses_long(name: str, sequence) -> None:
    _weigh_sequence(name, sequence)


# ------------------------------------------------------------------------------- trajectories
@dataclass(frozen=True)
class Trajectory:
    """A short run of Adam steps through :class:`mtlkit.Step`: ``"quadratic"``: ``m`` tasks
    ``L_i = s_i (½ |A (x - c_i - δ_b)|² + 1)`` in ``n`` dimensions (``A`` possibly singular,
    ``s_i`` log-spaced over ``lo..hi`` decades, ``δ_b`` a small shift per batch ``b``), started
    ``10**offset`` away from a point of the centres' hull (the Pareto set for invertible ``A``);
    ``"toy"``: the 2-D toy (losses shifted to be positive) started ``10**offset`` away from its
    Pareto front, where the two gradients are nearly opposite."""

    problem: str
    m: int
    n: int
    seed: int
    lo: float
    hi: float
    offset: float
    steps: int
    lr: float
    dtype: torch.dtype

    def setup(self) -> tuple[Tensor, Callable[[int], list[Tensor]]]:
        rng = np.random.default_rng(self.seed)
        direction = rng.standard_normal(self.n)
        direction *= 10**self.offset / np.linalg.norm(direction)
        if self.problem == "toy":
            scale = (0.1, 1.0)[int(rng.integers(2))]
            x1 = rng.uniform(-7, 7)
            x = torch.tensor([x1, float(front_x2(x1))], dtype=F64) + torch.from_numpy(direction)
            x = x.to(self.dtype).requires_grad_(True)
            lower = loss_lower_bounds(scale)

            def toy(batch: int) -> list[Tensor]:
                return [f - low for f, low in zip(toy_losses(x, scale), lower)]

            return x, toy
        rank = int(rng.integers(1, self.n + 1))
        a = rng.standard_normal((rank, self.n)).T @ rng.standard_normal((rank, self.n))
        centres = 3 * rng.standard_normal((self.m, self.n))
        shifts = 0.01 * rng.standard_normal((4, self.m, self.n))
        scales = 10 ** np.linspace(self.lo, self.hi, self.m)
        rng.shuffle(scales)
        start = rng.dirichlet(np.ones(self.m)) @ centres + direction
        a, centres, shifts, scales = (
            torch.from_numpy(v).to(self.dtype) for v in (a, centres, shifts, scales)
        )
        x = torch.from_numpy(start).to(self.dtype).requires_grad_(True)

        def quadratic(batch: int) -> list[Tensor]:
            residual = (x - centres - shifts[batch % 4]) @ a.T
            return list((scales * (0.5 * (residual**2).sum(dim=1) + 1)).unbind())

        return x, quadratic


@st.composite
def trajectories(
    draw: st.DrawFn, tasks: tuple[int, int] = (2, 8), max_steps: int = 4
) -> Trajectory:
    problem = "toy" if tasks[0] <= 2 and draw(st.booleans()) else "quadratic"
    span = draw(st.sampled_from([0.0, 3.0, 6.0, 12.0]))
    lo = draw(st.floats(-6.0, 6.0 - span))
    m = 2 if problem == "toy" else draw(st.integers(*tasks))
    return Trajectory(
        problem=problem,
        m=m,
        n=2 if problem == "toy" else draw(st.integers(1, 12)),
        seed=draw(st.integers(0, 2**32 - 1)),
        lo=lo,
        hi=lo + span,
        offset=draw(st.sampled_from([-8.0, -4.0, -2.0, 0.0, 1.0])),
        steps=draw(st.integers(1, max_steps)),
        lr=draw(st.sampled_from([1e-3, 1e-2, 1e-1])),
        dtype=draw(st.sampled_from([F32, F64])),
    )


def _run(name: str, run: Trajectory) -> None:
    """The run's steps through :class:`mtlkit.Step`; every step must succeed with finite
    weights, direction and parameters, and the exact solvers decide optimally for the Jacobian
    at the step's point."""
    method = build(name, run.m, run.dtype)
    x, losses = run.setup()
    optimizer = torch.optim.Adam([x], lr=run.lr)
    extra = itertools.cycle([1, 2, 3]) if method.extra_batches else None
    step = mtlkit.Step(method, optimizer, losses, shared=[x], tasks=run.m, extra_batches=extra)
    with quiet():
        for t in range(run.steps):
            jac = None
            if name in EXACT_DEFAULTS:
                jac = torch.stack(
                    [torch.autograd.grad(f, x, retain_graph=True)[0] for f in losses(t)]
                )
            result = step(t)
            assert result.stepped
            named = [result.weights.get(str(i), 0.0) for i in range(run.m)]
            weights = torch.tensor(named, dtype=F64)
            assert bool(torch.isfinite(weights).all()), result.weights  # empty: weightless
            assert bool(torch.isfinite(x.detach()).all()), x
            if method.kind == "gradient":
                assert x.grad is not None and bool(torch.isfinite(x.grad).all()), x.grad
            if jac is not None:
                decision = Decision(
                    weights=weights.to(run.dtype), direction=x.grad, status=result.status
                )
                assert_exact(name, jac.detach(), decision)
            step.end_epoch()


@pytest.mark.parametrize("name", NAMES)
@settings(DEFAULT, max_examples=3)
@given(data=st.data())
def test_trajectories(name: str, data: st.DataObject) -> None:
    _run(name, data.draw(trajectories(task_range(name)), label="run"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@settings(DEFAULT, max_examples=100)
@given(data=st.data())
def test_trajectories_long(name: str, data: st.DataObject) -> None:
    _run(name, data.draw(trajectories(task_range(name), max_steps=40), label="run"))


# ------------------------------------------------------ fixed cases: issue 19, and what this found
ISSUE_TOY = [  # issue 19 case 1: CAGrad(c=0.5) raised here, step 19979 of the toy from (0, 0)
    [-0.25443206859281553, -0.0006492140812572356],
    [0.25443211795347237, 0.0006493003714651939],
]


def _issue_scaled() -> np.ndarray:  # issue 19 case 2: rows scaled by logspace(-3, 3, 7)
    return np.random.default_rng(5).standard_normal((7, 30)) * np.logspace(-3, 3, 7)[:, None]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", AGGREGATORS)
def test_issue_19_cases_for_every_aggregator(name: str, dtype: torch.dtype) -> None:
    for jac in (np.array(ISSUE_TOY), _issue_scaled()):
        m = jac.shape[0]
        if not task_range(name)[0] <= m <= task_range(name)[1]:
            continue
        case_jac = torch.from_numpy(jac).to(dtype)
        method = build(name, m, dtype)
        if method.extra_batches:
            method.observe_extra([case_jac] * method.extra_batches)
        with quiet():
            decision = method.aggregate(case_jac, positive_losses(m, 0, dtype))
        assert_finite_decision(decision, m, jac.shape[1], dtype)
        if name in EXACT_DEFAULTS:
            assert_exact(name, case_jac, decision)


# Found by this fuzz test; each is outside what checked_exactly() holds the solvers to.
NEAR_STATIONARY_3X5 = [  # 0 is 1.5e-9 Σ w|g| from the hull; the exact w: mpmath, 60 digits
    [
        0.1257302210933933,
        -0.1321048632913019,
        0.6404226504432821,
        0.10490011715303971,
        -0.535669373161111,
    ],
    [
        -0.022284671491338334,
        0.023414525260951797,
        -0.11350976799760201,
        -0.018592702354085146,
        0.09494309153815814,
    ],
    [
        -0.6232744625373522,
        0.0413259793472436,
        -2.3250307746388343,
        -0.21879166393254573,
        -1.2459109472530652,
    ],
]


def test_mgda_near_stationary_kkt() -> None:
    """Issue 19: MGDA stopped 'at rounding level' (converged=False) on its first support {0, 1},
    |d|² = 1.537e-19 against the optimum 1.531e-19 (w_2 = 9.39e-12), a KKT violation 1947x the
    tolerance: the computed |d|² (-4.8e-19, then -9.0e-20 for the optimum) is below the
    Gramian's rounding, and a step that did not decrease it was taken for rounding."""
    jac = torch.tensor(NEAR_STATIONARY_3X5, dtype=F64)
    decision = build("mgda", 3, F64).decide(jac @ jac.T)
    assert decision.status.converged and decision.status.residual <= 1e-12
    assert mgda_residual(jac, decision.weights) <= 1e-2
    assert float(decision.weights[2]) == pytest.approx(NEAR_STATIONARY_OPTIMUM[2], rel=1e-4)


def test_the_regression_cases_are_solvable_to_the_tolerance() -> None:
    """The checks of the regression tests above hold for the exact answers: MGDA's 60-digit
    weights on NEAR_STATIONARY_3X5, the projections by scipy's NNLS (in the parameter space) on
    the badly scaled rows."""
    jac = torch.tensor(NEAR_STATIONARY_3X5, dtype=F64)
    assert mgda_residual(jac, torch.tensor(NEAR_STATIONARY_OPTIMUM, dtype=F64)) <= 1e-2
    for rows in (OPPOSITE_1E9, SPREAD_2E4):
        jac = torch.tensor(rows, dtype=F64)
        m = jac.shape[0]
        targets = [torch.full((m,), 1.0 / m, dtype=F64), *(torch.eye(m, dtype=F64) / m)]
        for u in targets:
            a = jac.T.numpy()
            z, _ = nnls(a, -a @ u.numpy(), maxiter=100 * m)
            assert dual_cone_residual(jac, u + torch.from_numpy(z), u) <= 1e-2


NEAR_STATIONARY_OPTIMUM = [0.15055695344169764, 0.849443046548914, 9.388366194594197e-12]
OPPOSITE_1E9 = [  # norms 8.9e-4 and 1.3e6, cosine -0.80: not stationary
    [0.000345584192064786, 0.0008216181435011584],
    [330437.07618338714, -1303157.231604361],
]
SPREAD_2E4 = [  # norms 1.2e-2, 1.2e-4, 2.4
    [0.009679537389957277, 0.006285052153426975, -0.0036304792473703437],
    [7.19918225449953e-05, 5.696235674828267e-06, 9.802549623726912e-05],
    [1.3320884441631233, 1.3820179110774642, -1.3850874148818155],
]


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("rows", [OPPOSITE_1E9, SPREAD_2E4], ids=["opposite_1e9", "spread_2e4"])
def test_dual_cone_badly_scaled_rows(name: str, rows: list[list[float]]) -> None:
    jac = torch.tensor(rows, dtype=F64)
    decision = build(name, jac.shape[0], F64).aggregate(jac)
    assert EXACT[name][2](jac, decision) <= 1


NEAR_OPPOSITE_3X4 = [  # hull 1.7e-8 max|g| from 0 (CAGrad's stationary threshold: 1.5e-7)
    [20.409191213851827, -25.556650313141816, 4.180988467257788, -5.677696061279298],
    [-0.45264929211044586, -0.2155971630897659, -2.019986129147251, -0.23193237764418947],
    [2.836977693552116, 1.3512519484488086, 12.660263855603556, 1.4536380121004289],
]
OPPOSITE_F32_3X3 = [  # rows 1 and 0 opposite up to float32 rounding
    [-1.5812935829162598, -0.8887435793876648, 4.3035712242126465],
    [0.3683551251888275, 0.20702877640724182, -1.0024973154067993],
    [1.1184097528457642, 24.621824264526367, -5.98698091506958],
]


@pytest.mark.parametrize(
    ("rows", "dtype", "c"),
    [(NEAR_OPPOSITE_3X4, F64, 0.5), (OPPOSITE_F32_3X3, F32, 0.4)],
    ids=["float64", "float32"],
)
def test_cagrad_near_stationary(rows: list[list[float]], dtype: torch.dtype, c: float) -> None:
    jac = torch.tensor(rows, dtype=dtype)
    decision = build("cagrad", 3, dtype, c=c, rescale=0).aggregate(jac)
    g0 = jac.double().mean(dim=0)
    offset = float((decision.direction.double() - g0).norm())
    assert offset <= c * float(g0.norm()) * (1 + 1e-6)
    # the exact maximin values (60-digit KKT solve on the rows): 3.5e-6 and 8.0e-8, i.e. 5.7e-9
    # and 2.8e-10 of max|g| (|g0| + ρ); the answer (g0 projected onto the dual cone) is within
    # the hull distance (1.7e-8; 4.6e-10) of them, and says so
    scale = float(jac.double().norm(dim=1).max()) * float(g0.norm()) * (1 + c)
    assert float((jac.double() @ decision.direction.double()).min()) >= -2e-8 * scale
    assert decision.status.converged and decision.status.residual <= 1.5e-7
