"""The input conditioning of COSMOS: the ray appended as features or as upsampled channels."""

from __future__ import annotations

import pytest
import torch

from mtlkit.architectures import build
from mtlkit.architectures.conditioned import PreferenceConditioned, conditioned_input_shape
from mtlkit.errors import ConfigError
from mtlkit.methods import PreferenceChannel


def test_vector_inputs_get_the_ray_as_features():
    channel = PreferenceChannel(2)
    inner = build("hps", conditioned_input_shape((5,), 2), {"a": 1, "b": 3})
    model = PreferenceConditioned(inner, channel, (5,))
    x = torch.randn(4, 5)
    with channel.fixed([3.0, 1.0]):
        extended = model.condition(x)
        assert extended.shape == (4, 7)
        assert torch.equal(extended[:, :5], x)
        assert extended[:, 5:].tolist() == [[0.75, 0.25]] * 4
        at_first = model(x)
    with channel.fixed([1.0, 3.0]):
        at_second = model(x)
    assert set(at_first) == {"a", "b"} and at_first["b"].shape == (4, 3)
    assert not torch.allclose(at_first["a"], at_second["a"])  # the ray changes the output
    _, features = model(x, return_features=True)
    assert features.shape[0] == 4 and model.has_shared_representation
    assert list(model.task_parameters("a")) == list(inner.task_parameters("a"))
    assert list(model.shared_parameters()) == list(inner.shared_parameters())


def test_images_get_the_ray_as_channels_from_a_trained_upsampler():
    channel = PreferenceChannel(3)
    inner = build(
        "hps", conditioned_input_shape((1, 12, 14), 3), {"a": 2, "b": 1, "c": 1}, backbone="cnn"
    )
    model = PreferenceConditioned(inner, channel, (1, 12, 14))
    x = torch.randn(2, 1, 12, 14)
    extended = model.condition(x)
    assert extended.shape == (2, 4, 12, 14) and torch.equal(extended[:, :1], x)
    upsampler = list(model.upsampler.parameters())
    assert [tuple(p.shape) for p in upsampler] == [(3, 3, 4, 4), (3, 3, 6, 6)]  # no biases
    assert all(any(p is q for q in model.shared_parameters()) for p in upsampler)
    sum(o.sum() for o in model(x).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in upsampler)


def test_bad_inputs_are_refused_with_the_shape():
    with pytest.raises(ConfigError, match=r"shape \[3, 4\]"):
        conditioned_input_shape((3, 4), 2)
    channel = PreferenceChannel(2)
    model = PreferenceConditioned(build("hps", (7,), {"a": 1, "b": 1}), channel, (5,))
    with pytest.raises(ValueError, match=r"\[B, 5\], got \[4, 6\]"):
        model(torch.randn(4, 6))
    multi = build("hps", (7,), {"a": 1, "b": 1}, multi_input=True)
    with pytest.raises(ConfigError, match="single-input"):
        PreferenceConditioned(multi, channel, (5,))


def test_the_trainers_model_hooks_reach_the_wrapped_model():
    """DSelect-k's gate regularisers and Maximum Roaming's schedule are hooks the Trainer calls
    on its model; behind the conditioning they must still be called (not silently skipped)."""
    from mtlkit.training.devices import model_hook

    channel = PreferenceChannel(2)
    outputs = {"a": 1, "b": 1}
    dselect = build("dselect_k", conditioned_input_shape((6,), 2), outputs)
    model = PreferenceConditioned(dselect, channel, (6,))
    model.train()
    model(torch.randn(4, 6))
    terms = model_hook(model, "auxiliary_losses")
    assert set(terms) == {"a", "b"} and all(t.requires_grad for t in terms.values())
    assert model_hook(model, "auxiliary_losses") == {}  # forgotten once read, as unwrapped

    calls = []
    roaming = build("max_roaming", conditioned_input_shape((6,), 2), outputs)
    roaming.on_train_step = lambda step: calls.append(("step", step))
    roaming.on_epoch_end = lambda epoch: calls.append(("epoch", epoch))
    wrapped = PreferenceConditioned(roaming, channel, (6,))
    model_hook(wrapped, "on_train_step", 7)
    model_hook(wrapped, "on_epoch_end", 2)
    assert calls == [("step", 7), ("epoch", 2)]
    plain = PreferenceConditioned(build("hps", (8,), outputs), channel, (6,))
    assert model_hook(plain, "auxiliary_losses") is None
    assert model_hook(plain, "on_train_step", 1) is None
