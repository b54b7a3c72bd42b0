"""The per-task gradient engine: Jacobian, Gramian and the multi-task backward."""

from __future__ import annotations

import pytest
import torch
from conftest import task_losses, tiny_hps
from torch import Tensor, nn

import mtlkit
from mtlkit.engine.contract import Decision
from mtlkit.engine.jacobian import graph_leaves
from mtlkit.errors import NonFiniteError
from mtlkit.methods import EW, MGDA, UW, GradientAggregator, GramianWeighting


def reference_jacobian(losses: list[Tensor], inputs: list[Tensor]) -> Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, inputs)
                ]
            )
        )
    return torch.stack(rows)


def grads_of(params) -> list[Tensor]:
    return [p.grad.clone() if p.grad is not None else None for p in params]


class FixedWeights(GramianWeighting):
    """Test aggregator: constant weights, whatever the Gramian."""

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.w = torch.tensor(weights, dtype=torch.float64)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.w.to(gramian)


class FirstRowTwice(GradientAggregator):
    """Test aggregator without weights: the direction is 2 * J[0] + J[-1] squared (non-linear)."""

    def aggregate(self, jacobian: Tensor, losses: Tensor | None = None, blocks=None) -> Decision:
        return Decision(direction=2 * jacobian[0] + jacobian[-1] ** 2)


class OwnHeadWeights(GradientAggregator):
    """Test aggregator with head weights of its own: direction 2 * J[0] + J[-1] squared, heads
    descend 3 L_0 - L_1 + 0.5 L_2 (a method whose weights are set, e.g. FixedWeights, too)."""

    def __init__(self, with_weights: bool) -> None:
        super().__init__()
        self.with_weights = with_weights

    def aggregate(self, jacobian: Tensor, losses: Tensor | None = None, blocks=None) -> Decision:
        heads = torch.tensor([3.0, -1.0, 0.5], dtype=jacobian.dtype)
        if self.with_weights:
            weights = torch.tensor([1.0, 2.0, 0.0], dtype=jacobian.dtype)
            return Decision(weights=weights, direction=weights @ jacobian, head_weights=heads)
        return Decision(direction=2 * jacobian[0] + jacobian[-1] ** 2, head_weights=heads)


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
def test_head_weights_weight_the_heads_and_leave_the_direction_alone(
    problem, features, with_weights
):
    model, x, y = problem
    losses, z = task_losses(model, x, y, features=True)
    inputs = [z] if features else list(model.shared_parameters())
    method = OwnHeadWeights(with_weights)
    direction = method(reference_jacobian(losses, inputs))
    encoder, heads = list(model.shared_parameters()), list(model.heads.parameters())
    if features:
        expected = torch.autograd.grad(z, encoder, direction.view_as(z), retain_graph=True)
    else:
        expected = [direction]
    h = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    expected_heads = torch.autograd.grad((h * torch.stack(losses)).sum(), heads, retain_graph=True)
    returned = mtlkit.backward(
        losses,
        shared=None if features else encoder,
        method=method,
        features=z if features else None,
    )
    assert (returned.weights is None) != with_weights  # the direction's weights are still reported
    torch.testing.assert_close(returned.head_weights, h, rtol=0, atol=0)
    assert returned.direction is None  # it is in the shared tensors' .grad
    got = [p.grad for p in encoder]
    if not features:
        got = [torch.cat([g.reshape(-1) for g in got])]
    for g, e in zip(got + [p.grad for p in heads], list(expected) + list(expected_heads)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("route", ["loop", "batched", "auto"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_equals_loop_of_autograd_grad(route, seed):
    model = tiny_hps(num_tasks=4, seed=seed)
    # A parameter that no loss reaches must get zero columns, not an error.
    unused = nn.Parameter(torch.randn(3, dtype=torch.float64))
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randn(9, 4, dtype=torch.float64)
    losses = task_losses(model, x, y)
    inputs = [*model.shared_parameters(), unused, *model.task_parameters("t1")]
    expected = reference_jacobian(losses, inputs)
    got = mtlkit.jacobian(losses, inputs, route=route)
    assert got.shape == (4, sum(p.numel() for p in inputs))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    n_shared = sum(p.numel() for p in model.shared_parameters())
    assert torch.all(got[:, n_shared : n_shared + 3] == 0)
    # Only task t1's row reaches t1's head.
    head = got[:, n_shared + 3 :]
    assert head[1].abs().sum() > 0 and torch.all(head[[0, 2, 3]] == 0)


def test_jacobian_memory_cap_splits_into_chunks_with_the_same_result(problem):
    model, x, y = problem
    losses = task_losses(model, x, y)
    params = list(model.shared_parameters())
    n = sum(p.numel() for p in params)
    full = mtlkit.jacobian(losses, params, route="batched")
    one_row = mtlkit.jacobian(losses, params, route="batched", max_memory=n * 8)
    torch.testing.assert_close(one_row, full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="max_memory"):
        mtlkit.jacobian(losses, params, route="batched", max_memory=0)


def test_gramian_is_jacobian_times_its_transpose(problem):
    model, x, y = problem
    losses = task_losses(model, x, y)
    params = list(model.shared_parameters())
    jac = reference_jacobian(losses, params)
    torch.testing.assert_close(mtlkit.gramian(losses, params), jac @ jac.T, rtol=0, atol=1e-12)


def test_jacobian_errors_name_the_problem(problem):
    model, x, y = problem
    losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="scalar"):
        mtlkit.jacobian([losses[0], torch.ones(2, requires_grad=True)], list(model.parameters()))
    with pytest.raises(ValueError, match="does not require grad"):
        mtlkit.jacobian(losses, [torch.ones(3)])
    with pytest.raises(ValueError, match="unknown route"):
        mtlkit.jacobian(losses, list(model.parameters()), route="fast")
    with pytest.raises(ValueError, match="empty"):
        mtlkit.jacobian([], list(model.parameters()))


def test_ew_backward_equals_sum_backward(problem):
    model, x, y = problem
    mtlkit.backward(task_losses(model, x, y), method=EW())
    got = grads_of(model.parameters())
    model.zero_grad()
    sum(task_losses(model, x, y)).backward()
    for g, e in zip(got, grads_of(model.parameters())):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-14)


@pytest.mark.parametrize("weights", [None, [2.0, 0.5, 1.0]])
def test_loss_weighting_backward_is_the_seeded_backward_bit_for_bit(problem, weights):
    """EW's ones are the default seeds of ``backward`` (no seed checks), other weights seed each
    loss: both give exactly the gradients of seeding every loss with its weight."""
    model, x, y = problem
    method = EW() if weights is None else mtlkit.methods.LS(weights)
    mtlkit.backward(task_losses(model, x, y), method=method)
    got = grads_of(model.parameters())
    model.zero_grad()
    seeds = torch.tensor([1.0] * 3 if weights is None else weights, dtype=torch.float64)
    torch.autograd.backward(task_losses(model, x, y), grad_tensors=list(seeds.unbind()))
    for g, e in zip(got, grads_of(model.parameters())):
        assert torch.equal(g, e)


def test_backward_accumulates_like_tensor_backward(problem):
    model, x, y = problem
    for _ in range(2):
        mtlkit.backward(
            task_losses(model, x, y), model.shared_parameters(), FixedWeights([1, 2, 3])
        )
    twice = grads_of(model.parameters())
    model.zero_grad()
    mtlkit.backward(task_losses(model, x, y), model.shared_parameters(), FixedWeights([1, 2, 3]))
    for g2, g1 in zip(twice, grads_of(model.parameters())):
        torch.testing.assert_close(g2, 2 * g1, rtol=0, atol=1e-13)


def test_uw_log_variances_get_their_gradient(problem):
    model, x, y = problem
    uw = UW(num_tasks=3, forms=["regression", "classification", "regression"]).double()
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    losses = task_losses(model, x, y)
    values = torch.stack(losses).detach()
    returned = mtlkit.backward(losses, method=uw).weights
    s = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    c = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    # d/ds (c e^{-s} L + s/2) = -c e^{-s} L + 1/2
    torch.testing.assert_close(uw.log_vars.grad, -c * torch.exp(-s) * values + 0.5)
    torch.testing.assert_close(returned, c * torch.exp(-s))
    # The heads see their task's weighted loss.
    model2 = tiny_hps()
    weighted = (c * torch.exp(-s) * torch.stack(task_losses(model2, x, y))).sum()
    weighted.backward()
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-14)


def test_weighted_aggregator_parameter_route(problem):
    model, x, y = problem
    losses = task_losses(model, x, y)
    shared = list(model.shared_parameters())
    jac = reference_jacobian(losses, shared)
    w = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    returned = mtlkit.backward(losses, shared, FixedWeights(w.tolist())).weights
    torch.testing.assert_close(returned, w)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), w @ jac)
    for i, name in enumerate(["t0", "t1", "t2"]):
        params = list(model.task_parameters(name))
        expected = torch.autograd.grad(w[i] * task_losses(model, x, y)[i], params)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-14)


def test_weightless_aggregator_gives_heads_their_unweighted_loss(problem):
    model, x, y = problem
    losses = task_losses(model, x, y)
    shared = list(model.shared_parameters())
    jac = reference_jacobian(losses, shared)
    assert mtlkit.backward(losses, shared, FirstRowTwice()).weights is None
    torch.testing.assert_close(
        torch.cat([p.grad.reshape(-1) for p in shared]), 2 * jac[0] + jac[-1] ** 2
    )
    params = list(model.heads.parameters())
    expected = torch.autograd.grad(sum(task_losses(model, x, y)), params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", [FixedWeights([0.5, 2.0, -1.0]), FirstRowTwice()])
def test_features_route_backpropagates_the_direction_through_the_encoder(problem, method):
    model, x, y = problem
    losses, z = task_losses(model, x, y, features=True)
    jac_z = reference_jacobian(losses, [z])
    decision = method.aggregate(jac_z)
    direction, weights = decision.direction, decision.weights
    encoder = list(model.shared_parameters())
    expected_encoder = torch.autograd.grad(z, encoder, direction.view_as(z), retain_graph=True)
    w = torch.ones(3, dtype=torch.float64) if weights is None else weights
    heads = list(model.heads.parameters())
    expected_heads = torch.autograd.grad((w * torch.stack(losses)).sum(), heads, retain_graph=True)
    mtlkit.backward(losses, method=method, features=z)
    for p, e in zip(encoder + heads, list(expected_encoder) + list(expected_heads)):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-13)


def test_features_route_trains_the_encoder_with_loss_weightings_too(problem):
    """LibMTL's rep_grad leaves the encoder without gradient for loss weightings."""
    model, x, y = problem
    losses, z = task_losses(model, x, y, features=True)
    mtlkit.backward(losses, method=EW(), features=z)
    for p in model.shared_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    got = grads_of(model.parameters())
    model.zero_grad()
    sum(task_losses(model, x, y)).backward()
    for g, e in zip(got, grads_of(model.parameters())):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-14)


def test_features_route_with_one_representation_per_task():
    """Multi-input: each task's loss depends on its own features only (block Jacobian)."""
    model = tiny_hps(num_tasks=2)
    xs = [torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)]
    losses, feats = [], []
    for i, (name, x) in enumerate(zip(["t0", "t1"], xs)):
        out, z = model(x, task=name, return_features=True)
        losses.append((out[name] ** 2).mean() * (i + 1))
        feats.append(z)
    jac = mtlkit.jacobian(losses, feats)
    assert jac.shape == (2, 24 + 16)
    assert torch.all(jac[0, 24:] == 0) and torch.all(jac[1, :24] == 0)
    mtlkit.backward(losses, method=FixedWeights([1.0, 3.0]), features=feats)
    got = grads_of(model.shared_parameters())
    model.zero_grad()
    total = 0
    for i, (name, x) in enumerate(zip(["t0", "t1"], xs)):
        total = total + [1.0, 3.0][i] * (model(x, task=name)[name] ** 2).mean() * (i + 1)
    total.backward()
    for g, e in zip(got, grads_of(model.shared_parameters())):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)


def test_backward_rejects_non_finite_losses_and_missing_shared(problem):
    model, x, y = problem
    losses = task_losses(model, x, y)
    losses[1] = losses[1] * float("nan")
    with pytest.raises(NonFiniteError, match="task 1"):
        mtlkit.backward(losses, method=EW())
    with pytest.raises(ValueError, match="shared="):
        mtlkit.backward(task_losses(model, x, y), method=FixedWeights([1, 1, 1]))


def test_graph_leaves_finds_every_leaf_once(problem):
    model, x, y = problem
    leaves = graph_leaves(torch.stack(task_losses(model, x, y)))
    assert {id(p) for p in leaves} == {id(p) for p in model.parameters()}
    assert len(leaves) == len(list(model.parameters()))


def test_backward_passes_the_losses_to_aggregators_that_use_them(problem):
    """MGDA's loss normalisation divides gradient i by L_i before the min-norm solve."""
    model, x, y = problem
    losses = task_losses(model, x, y)
    shared = list(model.shared_parameters())
    jac = reference_jacobian(losses, shared)
    values = torch.stack(losses).detach()
    expected = MGDA().weights((jac / values[:, None]) @ (jac / values[:, None]).T) / values
    returned = mtlkit.backward(losses, shared, MGDA(normalization="loss")).weights
    torch.testing.assert_close(returned, expected)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected @ jac)


class RecordBlocks(FirstRowTwice):
    """Records the blocks the engine passes."""

    def aggregate(self, jacobian: Tensor, losses: Tensor | None = None, blocks=None) -> Decision:
        self.seen_blocks = blocks
        return Decision(direction=jacobian.sum(dim=0))


def test_engine_passes_blocks_of_each_input(problem):
    model, x, y = problem
    method = RecordBlocks()
    shared = list(model.shared_parameters())
    mtlkit.backward(task_losses(model, x, y), shared=shared, method=method)
    assert method.seen_blocks == [p.numel() for p in shared]
    losses, z = task_losses(model, x, y, features=True)
    mtlkit.backward(losses, method=method, features=z)
    assert method.seen_blocks == [z.numel()]
