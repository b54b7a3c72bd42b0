"""Method registry and the loss weightings EW and UW."""

from __future__ import annotations

import pytest
import torch

from mtlkit import methods
from mtlkit.errors import ConfigError, UnknownNameError
from mtlkit.methods import EW, UW
from mtlkit.registry import Registry


def test_a_registry_sorts_normalises_and_refuses_bad_names():
    registry: Registry[object] = Registry("thing")
    for name in ("zeta", "alpha_beta", "mid"):
        registry.register(name)(object)
    assert registry.available() == ["alpha_beta", "mid", "zeta"]  # registered out of order
    assert list(registry) == ["alpha_beta", "mid", "zeta"]
    assert "Alpha-Beta" in registry and "alpha" not in registry
    assert registry.factory(" Alpha-Beta ") is object
    with pytest.raises(ValueError, match="snake_case, got 'Alpha-Beta'"):
        registry.register("Alpha-Beta")
    with pytest.raises(ValueError, match="thing 'mid' is already registered"):
        registry.register("mid")(object)
    with pytest.raises(UnknownNameError, match="alpha"):
        registry.factory("alpha")


def test_every_method_family_is_registered_on_import():
    names = set(methods.available())
    assert len(names) >= 44, sorted(names)
    # one name from each module of mtlkit.methods (a module not imported loses its methods)
    assert {
        "ew", "uw", "mgda", "pcgrad", "upgrad", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl",
        "config", "gradvac", "graddrop", "db_mtl", "excess_mtl", "gradnorm", "ngdiff", "modo",
        "pcd", "cr_mogm", "rlw", "trimmed_mean", "dwa", "famo", "stch", "mean",
        "auto_lambda", "moml", "forum",
    } <= names  # fmt: skip


def test_get_accepts_hyphens_and_checks_arguments():
    assert isinstance(methods.get("EW", reduction="mean"), EW)
    with pytest.raises(UnknownNameError) as info:
        methods.get("nash-mgda")
    assert "nash-mgda" in str(info.value) and "pcgrad" in str(info.value)
    with pytest.raises(ConfigError, match=r"reductio.*valid arguments: reduction"):
        methods.get("ew", reductio="mean")
    with pytest.raises(ConfigError, match="reduction must be"):
        methods.get("ew", reduction="max")


def test_ew_weights():
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert EW()(losses).weights.tolist() == [1.0, 1.0, 1.0]
    assert EW("mean")(losses).total(losses).item() == pytest.approx(7 / 3)


def test_uw_minimiser_is_the_loss_for_regression():
    """For fixed L, min_s e^{-s} L / 2 + s / 2 is at s = log L (σ² = L)."""
    losses = torch.tensor([0.5, 2.0])
    uw = UW(num_tasks=2)
    opt = torch.optim.Adam(uw.parameters(), lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        uw(losses).total(losses).backward()
        opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), losses.log(), atol=1e-3, rtol=0)


def test_uw_state_round_trip_and_reset():
    uw = UW(num_tasks=3, forms="classification", init=0.2)
    with torch.no_grad():
        uw.log_vars.add_(1.0)
    other = UW(num_tasks=3, forms="classification", init=0.2)
    other.load_state_dict(uw.state_dict())
    torch.testing.assert_close(other.log_vars, uw.log_vars)
    uw.reset()
    assert uw.log_vars.tolist() == pytest.approx([0.2] * 3)
    with pytest.raises(ValueError, match="set up for 3 tasks"):
        uw.setup(4)
    with pytest.raises(RuntimeError, match="num_tasks"):
        UW()(torch.ones(2))
    with pytest.raises(ValueError, match="forms"):
        UW(num_tasks=2, forms=["regression"])


def test_repr_echoes_arguments():
    assert repr(EW("mean")) == "EW(reduction='mean')"
    assert "forms='classification'" in repr(UW(forms="classification"))
