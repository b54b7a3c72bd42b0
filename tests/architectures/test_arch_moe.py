"""MMoE and DSelect-k: gates read features, the mixture, the DSelect-k gate's math, and its
entropy regulariser reaching the gates through ``auxiliary_losses`` and the Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from arch_checks import F64, TASKS, batch, losses, make
from torch.utils.data import DataLoader, TensorDataset

from mtlkit import Budget, Joint, Task, Trainer
from mtlkit.architectures import build
from mtlkit.architectures.moe import DSelectKGate, mix, smooth_step
from mtlkit.methods import EW
from mtlkit.metrics import MeanSquaredError
from mtlkit.training.optim import optimizer

DIGITS = (1, 8, 12)


def test_mix_is_the_weighted_sum_of_expert_outputs():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(4, 3, generator=gen)
    outs = [torch.randn(4, 2, 5, 5, generator=gen) for _ in range(3)]
    expected = sum(w[:, e].view(4, 1, 1, 1) * outs[e] for e in range(3))
    torch.testing.assert_close(mix(w, outs), expected)


def test_gates_read_the_flattened_mlp_input_or_the_pooled_stem_feature():
    mlp = build("mmoe", DIGITS, TASKS)
    assert mlp.stem_stages == 0 and mlp.gates["a"].linear.in_features == 96
    cnn = build("mmoe", DIGITS, TASKS, backbone="cnn", widths=[6, 8])
    assert cnn.stem_stages == 1 and cnn.gates["a"].linear.in_features == 6  # pooled channels
    resnet = build("dselect_k", DIGITS, TASKS, backbone="resnet", widths=[4, 6, 8], stem=2)
    assert resnet.gates["a"].z.in_features == 6
    assert len(resnet.experts[0]) == 1  # one stage left per expert


def test_mmoe_output_is_the_gated_mixture_of_experts():
    model = make("mmoe-cnn")
    x, _ = batch("mmoe-cnn", n=5)
    h = model.stem(x)
    feature = h.mean(dim=(2, 3))  # the gate reads the pooled stem output
    experts = [e(h) for e in model.experts]
    out = model(x)
    for t in TASKS:
        gate = torch.softmax(feature @ model.gates[t].linear.weight.T, dim=1)
        expected = model.heads[t](sum(gate[:, e : e + 1] * experts[e] for e in range(2)))
        torch.testing.assert_close(out[t], expected)


# ------------------------------------------------------------------------------- DSelect-k
@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_smooth_step_is_a_c1_step(gamma):
    t = torch.tensor([-gamma, -gamma / 2, 0.0, gamma / 2, gamma], dtype=F64)
    assert smooth_step(t, gamma).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    inside = torch.tensor([-gamma / 2 + 1e-7, gamma / 2 - 1e-7], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_step(inside, gamma).sum(), inside)
    assert grad.abs().max() < 1e-5  # flat where it meets 0 and 1
    mid = torch.zeros(1, dtype=F64, requires_grad=True)
    (slope,) = torch.autograd.grad(smooth_step(mid, gamma).sum(), mid)
    assert slope.item() == pytest.approx(1.5 / gamma)


def reference_selector(z: list[float], bits: int, num_experts: int, gamma: float) -> list[float]:
    """``r(z)_e = Π_j S(z_j) if bit j of e (most significant first) else 1 - S(z_j)``."""
    s = [smooth_step(torch.tensor(v, dtype=F64), gamma).item() for v in z]
    out = []
    for e in range(num_experts):
        code = format(e, f"0{bits}b")
        out.append(math.prod(s[j] if code[j] == "1" else 1 - s[j] for j in range(bits)))
    return out


@pytest.mark.parametrize("num_experts, k", [(4, 2), (3, 1), (8, 3), (2, 2)])
def test_dselect_k_gate_matches_the_definition(num_experts, k):
    torch.manual_seed(0)
    gate = DSelectKGate(5, num_experts, k, gamma=1.0).to(F64)
    with torch.no_grad():  # spread z over the smooth region
        gate.z.weight.normal_(std=0.5)
    f = torch.randn(6, 5, dtype=F64)
    weights, selectors = gate(f)
    assert selectors.shape == (6, k, num_experts) and weights.shape == (6, num_experts)
    z = gate.z(f).view(6, k, gate.bits)
    alpha = torch.softmax(gate.w(f), dim=1)
    for b in range(6):
        expected = torch.zeros(num_experts, dtype=F64)
        for i in range(k):
            r = reference_selector(z[b, i].tolist(), gate.bits, num_experts, 1.0)
            torch.testing.assert_close(selectors[b, i], torch.tensor(r, dtype=F64))
            expected += alpha[b, i] * selectors[b, i]
        torch.testing.assert_close(weights[b], expected)
    if num_experts == 2**gate.bits:  # a power of 2: every selector is a distribution
        torch.testing.assert_close(selectors.sum(-1), torch.ones(6, k, dtype=F64))
        torch.testing.assert_close(weights.sum(-1), torch.ones(6, dtype=F64))


def test_binary_selectors_pick_at_most_k_experts():
    gate = DSelectKGate(3, 8, 2, gamma=1.0).to(F64)
    with torch.no_grad():  # z = ±2 (beyond γ/2): selector 0 codes 101 = 5, selector 1 010 = 2
        gate.z.weight.zero_()
        gate.z.bias.copy_(torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0, -2.0], dtype=F64))
    weights, selectors = gate(torch.randn(4, 3, dtype=F64))
    assert selectors[:, 0].argmax(-1).tolist() == [5] * 4 and selectors[:, 1, 2].tolist() == [1] * 4
    assert ((weights > 0).sum(-1) == 2).all() and torch.allclose(
        weights.sum(-1), torch.ones(4, dtype=F64)
    )
    assert gate.regularizer(selectors, 1.0).item() == pytest.approx(0.0, abs=1e-5)  # entropy 0


def test_regularizer_is_entropy_plus_the_reachability_term():
    gen = torch.Generator().manual_seed(0)
    selectors = torch.rand(5, 2, 3, generator=gen, dtype=F64) / 2  # rows sum below 1
    gate = DSelectKGate(2, 3, 2, gamma=1.0)
    entropy = -(selectors * torch.log(selectors + 1e-6)).sum(-1).sum(-1).mean()
    reach = (1 / selectors.sum(-1) - 1).sum(-1).mean()
    torch.testing.assert_close(gate.regularizer(selectors, 0.3), 0.3 * entropy + reach)
    assert reach > 0
    full = torch.tensor([[[0.2, 0.5, 0.3]]], dtype=F64)  # reachable experts carry everything
    torch.testing.assert_close(
        gate.regularizer(full, 0.0), torch.zeros((), dtype=F64), rtol=0, atol=1e-15
    )


def reference_entropy(model, feature) -> dict[str, torch.Tensor]:
    """λ Σ_i H(r_t(z^(i))) averaged over the batch, written out separately from the model."""
    terms = {}
    for t, gate in model.gates.items():
        _, selectors = gate(feature)
        per_example = [
            -sum(float(0) + s * torch.log(s + 1e-6) for s in selectors[b, i])
            for b in range(selectors.shape[0])
            for i in range(selectors.shape[1])
        ]
        terms[t] = model.entropy_reg * torch.stack(per_example).sum() / selectors.shape[0]
    return terms


def test_auxiliary_losses_are_the_entropy_of_the_training_forward():
    model = make("dselect_k", entropy_reg=0.25)
    x, _ = batch("dselect_k")
    model(x)
    aux = model.auxiliary_losses()
    assert list(aux) == list(TASKS)
    expected = reference_entropy(model, model.gate_input(model.stem(x)))
    for t in TASKS:
        torch.testing.assert_close(aux[t], expected[t])
    assert model.auxiliary_losses() == {}  # handed over once
    model.eval()
    model(x)
    assert model.auxiliary_losses() == {}  # nothing at evaluation
    model.train()
    assert (
        make("dselect_k", entropy_reg=0.0)(x)
        and make("dselect_k", entropy_reg=0.0).auxiliary_losses() == {}
    )
    multi = make("dselect_k", multi_input=True)
    multi(x, task="a"), multi(x, task="c")
    assert set(multi.auxiliary_losses()) == {"a", "c"}  # one forward per task, then collected


def test_regulariser_changes_the_gate_gradient_by_its_own_gradient():
    x, targets = batch("dselect_k")
    grads = {}
    for reg in (0.0, 0.5):
        model = make("dselect_k", entropy_reg=reg)
        task_losses = losses(model, x, targets)
        aux = model.auxiliary_losses()
        total = sum(task_losses[t] + aux.get(t, 0.0) for t in TASKS)
        total.backward()
        grads[reg] = [p.grad.clone() for p in model.gates["a"].parameters()]
        if reg:
            model.zero_grad()
            feature = model.gate_input(model.stem(x))
            reference_entropy(model, feature)["a"].backward()
            gate = model.gates["a"]
            expected = [
                torch.zeros_like(p) if p.grad is None else p.grad for p in gate.parameters()
            ]
    for g0, g1, e in zip(grads[0.0], grads[0.5], expected, strict=True):
        torch.testing.assert_close(g1 - g0, e, rtol=1e-8, atol=1e-12)
    z_weight, z_bias, w_weight, w_bias = (g1 - g0 for g0, g1 in zip(grads[0.0], grads[0.5]))
    assert z_weight.abs().min() > 0 and z_bias.abs().min() > 0  # the selectors' logits move
    assert w_weight.abs().max() == 0 and w_bias.abs().max() == 0  # the entropy ignores α


class Targets(TensorDataset):
    def __getitem__(self, index):
        x, *ys = super().__getitem__(index)
        return x, dict(zip(TASKS, ys))


def test_the_trainer_adds_the_regulariser_to_the_task_losses():
    x, targets = batch("dselect_k", n=8)
    loader = DataLoader(Targets(x, *targets.values()), batch_size=8)
    tasks = [Task(t, lambda o, y: ((o - y) ** 2).mean(), {"mse": MeanSquaredError}) for t in TASKS]
    model = make("dselect_k", entropy_reg=0.5)
    reference = make("dselect_k", entropy_reg=0.5)
    task_losses = losses(reference, x, targets)
    aux = reference.auxiliary_losses()
    sum(task_losses[t] + aux[t] for t in TASKS).backward()
    trainer = Trainer(
        model, tasks, Joint(EW()), optimizer("sgd", lr=1.0), budget=Budget(steps=1), progress=False
    )
    trainer.fit(loader)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q - q.grad, rtol=1e-10, atol=1e-12)  # SGD, lr 1
