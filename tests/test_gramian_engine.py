"""The layer-wise Gramian route: equal to J Jᵀ and to the Jacobian route's update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlkit
from mtlkit import methods
from mtlkit.engine.layer_capture import LayerCapture
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.methods.base import Decision, GramianWeighting


def _mlp() -> nn.Module:
    # a 3-D input exercises the flattening of leading dims; LayerNorm is a non-captured tensor
    # wide layers and few rows: the kernel form (see test_gramian_equals_jacobian_gramian)
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 20), nn.LayerNorm(20))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(4, 5, (3, 2), padding=(1, 0), dilation=(1, 2), bias=False),
        nn.BatchNorm2d(5),
        nn.Conv2d(5, 2, 1, groups=1),
        nn.Flatten(),
    )


def _problem(kind: str, m: int, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mlp":
        encoder, x = _mlp().double(), torch.randn(2, 2, 40, dtype=torch.float64)
    else:
        encoder, x = _cnn().double(), torch.randn(3, 3, 8, 8, dtype=torch.float64)
    width = encoder(x).reshape(x.shape[0], -1).shape[1]
    heads = nn.ModuleList(nn.Linear(width, 2).double() for _ in range(m))
    return encoder, heads, x


def _losses(encoder, heads, x, calls: int = 1):
    z = sum(encoder(x * (c + 1)) for c in range(calls)).reshape(x.shape[0], -1)
    return [(h(z) ** 2).mean() * (i + 1) for i, h in enumerate(heads)]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("m", [1, 3, 7])
@pytest.mark.parametrize("calls", [1, 2])
def test_gramian_equals_jacobian_gramian(kind: str, m: int, calls: int) -> None:
    encoder, heads, x = _problem(kind, m)
    shared = list(encoder.parameters())
    capture = LayerCapture(encoder, verify=False)
    losses = _losses(encoder, heads, x, calls)
    gradients = capture.task_gradients(losses, shared)
    if kind == "mlp" and m > 1:
        assert len(gradients.kernel_layers) == 2  # both linear layers, in the kernel form
    jac = mtlkit.jacobian(losses, shared)
    torch.testing.assert_close(gradients.gramian, jac @ jac.T, rtol=1e-10, atol=1e-12)
    assert capture.records == []  # consumed
    weights = torch.linspace(-1.0, 2.0, m, dtype=torch.float64)
    gradients.accumulate(weights)
    direction = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(direction, weights @ jac, rtol=1e-10, atol=1e-12)


def test_both_linear_forms_agree() -> None:
    """Few rows choose the kernel form, many rows the block form: both give J Jᵀ and w @ J."""
    for batch in (2, 300):
        torch.manual_seed(batch)
        layer = nn.Linear(7, 3).double()
        head = [nn.Linear(3, 1).double() for _ in range(3)]
        capture = LayerCapture(layer, verify=False)
        x = torch.randn(batch, 7, dtype=torch.float64)
        y = layer(x)
        losses = [h(torch.sin(y * (i + 1))).mean() for i, h in enumerate(head)]
        jac = mtlkit.jacobian(losses, list(layer.parameters()))
        gradients = capture.task_gradients(losses, list(layer.parameters()))
        assert len(gradients.kernel_layers) == (1 if batch == 2 else 0)
        torch.testing.assert_close(gradients.gramian, jac @ jac.T, rtol=1e-10, atol=1e-12)
        weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        gradients.accumulate(weights)
        direction = torch.cat([layer.weight.grad.reshape(-1), layer.bias.grad])
        torch.testing.assert_close(direction, weights @ jac, rtol=1e-10, atol=1e-12)


def test_shared_filter_and_task_that_does_not_reach_a_layer() -> None:
    torch.manual_seed(0)
    trunk, branch = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
    model = nn.ModuleDict({"trunk": trunk, "branch": branch})
    shared = list(trunk.parameters()) + list(branch.parameters())
    capture = LayerCapture(model, shared=list(trunk.parameters()), verify=False)
    assert capture.layers == [trunk]
    x = torch.randn(5, 4, dtype=torch.float64)
    h = trunk(x)
    losses = [h.pow(2).sum(), branch(h).sum(), branch(x).sum()]  # task 3 skips the trunk
    gram = capture.gramian(losses, shared)  # branch's tensors: Jacobian columns
    jac = mtlkit.jacobian(losses, shared)
    torch.testing.assert_close(gram, jac @ jac.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "name", ["mgda", "upgrad", "dualproj", "cagrad", "pcgrad", "imtl_g", "nash_mtl", "aligned_mtl"]
)
def test_backward_with_capture_equals_jacobian_route(name: str) -> None:
    grads = []
    for use_capture in (False, True):
        encoder, heads, x = _problem("mlp", 3, seed=1)
        method = methods.get(name, **({"generator": 0} if name == "pcgrad" else {}))
        method.setup(3)
        assert isinstance(method, GramianWeighting)
        capture = LayerCapture(encoder) if use_capture else None
        losses = _losses(encoder, heads, x)
        weights = mtlkit.backward(
            losses, shared=list(encoder.parameters()), method=method, capture=capture
        ).weights
        params = [*encoder.parameters(), *heads.parameters()]
        grads.append(([p.grad.clone() for p in params], weights))
    (reference, w_ref), (fast, w_fast) = grads
    for a, b in zip(reference, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_fast, w_ref, rtol=1e-5, atol=1e-7)


class HalfHeads(GramianWeighting):
    """Equal weights for the direction; the heads get weights 0.5, 2, -1 (``head_weights``)."""

    def weights(self, gramian, losses=None):
        return torch.ones(gramian.shape[0], dtype=gramian.dtype)

    def decide(self, gramian, losses=None):
        heads = torch.tensor([0.5, 2.0, -1.0], dtype=gramian.dtype)
        return Decision(weights=self.weights(gramian, losses), head_weights=heads)


def test_head_weights_are_used_on_the_gramian_route_as_on_the_jacobian_route() -> None:
    grads = []
    for use_capture in (False, True):
        encoder, heads, x = _problem("mlp", 3, seed=2)
        capture = LayerCapture(encoder) if use_capture else None
        losses = _losses(encoder, heads, x)
        decision = mtlkit.backward(
            losses, shared=list(encoder.parameters()), method=HalfHeads(), capture=capture
        )
        assert decision.weights.tolist() == [1.0] * 3
        assert decision.head_weights.tolist() == [0.5, 2.0, -1.0]
        grads.append([p.grad.clone() for p in [*encoder.parameters(), *heads.parameters()]])
    encoder, heads, x = _problem("mlp", 3, seed=2)
    weighted = sum(w * loss for w, loss in zip([0.5, 2.0, -1.0], _losses(encoder, heads, x)))
    expected_heads = torch.autograd.grad(weighted, list(heads.parameters()))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads[1][-len(expected_heads) :], expected_heads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_in_place_change_of_a_captured_output_is_refused() -> None:
    encoder = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))
    capture = LayerCapture(encoder, verify=False)
    out = encoder(torch.randn(4, 3))
    with pytest.raises(MtlkitError, match="in place"):
        capture.gramian([out.sum(), out.pow(2).sum()], list(encoder.parameters()))


def test_verify_catches_weight_tying() -> None:
    layer = nn.Linear(64, 64)  # wide, few rows, 4 tasks: the kernel form
    capture = LayerCapture(layer)  # verify=True by default
    x = torch.randn(8, 64)
    y = layer(x) + x @ layer.weight  # the weight is also used outside the layer
    losses = [(y * (i + 1)).pow(2).mean() for i in range(4)]
    with pytest.raises(MtlkitError, match="weight tying"):
        capture.gramian(losses, list(layer.parameters()))


def test_captured_parameters_must_be_shared() -> None:
    layer = nn.Linear(3, 3)
    capture = LayerCapture(layer, verify=False)
    y = layer(torch.randn(2, 3))
    with pytest.raises(MtlkitError, match="not all in shared"):
        capture.gramian([y.sum()], [layer.weight])


def test_no_records_under_no_grad_and_remove() -> None:
    layer = nn.Linear(3, 3)
    with LayerCapture(layer) as capture:
        with torch.no_grad():
            layer(torch.randn(2, 3))
        assert capture.records == []
        layer(torch.randn(2, 3))
        assert len(capture.records) == 1
    layer(torch.randn(2, 3))
    assert capture.records == []  # hooks removed


def test_backward_rejects_capture_with_a_non_gramian_method() -> None:
    layer = nn.Linear(3, 2)
    capture = LayerCapture(layer)
    y = layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match="GramianWeighting"):
        mtlkit.backward(
            [y[:, 0].sum(), y[:, 1].sum()],
            shared=list(layer.parameters()),
            method=methods.get("graddrop"),
            capture=capture,
        )


def test_trainer_route_gramian_matches_loop(tiny_problem_runs) -> None:
    loop, gram = tiny_problem_runs("upgrad", "loop"), tiny_problem_runs("upgrad", "gramian")
    for a, b in zip(loop, gram):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_route_gramian_rejects_jacobian_methods(tiny_problem_runs) -> None:
    with pytest.raises(ConfigError, match="route=gramian needs a Gramian weighting"):
        tiny_problem_runs("graddrop", "gramian")


@pytest.fixture
def tiny_problem_runs():
    from mtlkit.training.forward import ForwardResult
    from mtlkit.training.strategies import Joint, StrategyContext

    def run(method_name: str, route: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = _TwoTask()
        method = methods.get(method_name)
        strategy = Joint(method)
        strategy.setup(
            StrategyContext(
                model=model,
                tasks=["a", "b"],
                optimizer_factory=lambda p: (torch.optim.SGD(p, lr=0.1), None),
                route=route,
            )
        )
        x = torch.randn(8, 5)

        def compute(batch):
            out = model(batch)
            return ForwardResult({t: out[t].pow(2).mean() for t in ("a", "b")})

        for step in range(3):
            strategy.step(x, compute, step)
        return [p.detach().clone() for p in model.parameters()]

    return run


class _TwoTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)})

    def forward(self, x):
        z = self.encoder(x)
        return {t: h(z) for t, h in self.heads.items()}

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_parameters(self, task):
        return self.heads[task].parameters()
