"""The QM9 network of Nash-MTL (``mpnn``): its layers and parameter counts, the graph and
features built from padded molecules, and the batched forward pass against a per-molecule
reference written here from PyTorch Geometric's definitions (NNConv with mean aggregation over
the complete graph, GRU, Set2Set)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.architectures import build
from mtlkit.architectures.mpnn import MPNNEncoder, molecule_graph
from mtlkit.data.qm9 import TARGETS
from mtlkit.errors import MtlkitError

WATER = [(8, (0.0, 0.0, 0.0)), (1, (0.96, 0.0, 0.0)), (1, (-0.24, 0.93, 0.0))]
METHANOL = [
    (6, (0.0, 0.0, 0.0)),
    (8, (1.43, 0.0, 0.0)),
    (1, (1.75, 0.9, 0.0)),
    (1, (-0.36, 1.03, 0.0)),
    (1, (-0.36, -0.51, 0.89)),
    (1, (-0.36, -0.51, -0.89)),
]
LONE = [(9, (0.3, -0.2, 0.1))]  # one atom: no edges, only the root term


def padded(*molecules, atoms: int = 8) -> torch.Tensor:
    x = torch.zeros(len(molecules), atoms, 4)
    for b, molecule in enumerate(molecules):
        for i, (z, position) in enumerate(molecule):
            x[b, i] = torch.tensor([z, *position])
    return x


def test_parameter_counts_are_those_of_nash_mtls_net():
    dim = 64
    theirs = [  # Net(n_tasks=11, num_features=11, dim=64), layer by layer
        nn.Linear(11, dim),  # lin0
        nn.Linear(5, 128),  # NNConv's nn
        nn.Linear(128, dim * dim),
        nn.Linear(dim, dim, bias=False),  # NNConv's root weight (+ its bias below)
        nn.GRU(dim, dim),
        nn.LSTM(2 * dim, dim),  # Set2Set(dim, processing_steps=3)
        nn.Linear(2 * dim, dim),  # lin1
    ]
    shared = sum(p.numel() for layer in theirs for p in layer.parameters()) + dim
    model = build("mpnn", (29, 4), {t: 1 for t in TARGETS})
    assert shared == 616_960
    assert sum(p.numel() for p in model.encoder.parameters()) == shared
    assert sum(p.numel() for p in model.parameters()) == shared + 11 * 65 == 617_675
    layers = model.encoder.named_children()
    assert {n: sum(p.numel() for p in m.parameters()) for n, m in layers} == {
        "lin0": 768,
        "conv": 529_152 + 4_160,
        "gru": 24_960,
        "set2set": 49_664,
        "lin1": 8_256,
    }


def test_the_graph_is_complete_and_the_features_follow_pytorch_geometric():
    nodes, batch, edges, edge_features = molecule_graph(padded(WATER, METHANOL, LONE))
    assert nodes.shape == (3 + 6 + 1, 11) and batch.tolist() == [0] * 3 + [1] * 6 + [2]
    assert edges.shape == (2, 3 * 2 + 6 * 5)  # every ordered pair of distinct atoms
    assert bool((batch[edges[0]] == batch[edges[1]]).all()) and bool((edges[0] != edges[1]).all())
    # node features: one-hot H C N O F, atomic number, 4 flags (zeros), bonded hydrogens
    assert nodes[0].tolist() == [0, 0, 0, 1, 0, 8, 0, 0, 0, 0, 2]  # water's oxygen
    assert nodes[1].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert nodes[3, 10] == 3 and nodes[4, 10] == 1  # methanol: CH3 and OH
    assert nodes[9].tolist() == [0, 0, 0, 0, 1, 9, 0, 0, 0, 0, 0]
    # edge features: 4 bond-type slots (zeros), the distance
    assert torch.equal(edge_features[:, :4], torch.zeros(len(edge_features), 4))
    c_to_o = (edges[0] == 4) & (edges[1] == 3)
    torch.testing.assert_close(edge_features[c_to_o, 4], torch.tensor([1.43]))


def reference_encoder(encoder: MPNNEncoder, molecule) -> torch.Tensor:
    """One molecule, atom by atom, in PyTorch Geometric's terms."""
    radius = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}
    z = [a for a, _ in molecule]
    pos = torch.tensor([p for _, p in molecule])
    n = len(z)
    rows = []
    for i in range(n):
        hs = sum(
            1
            for j in range(n)
            if j != i and z[j] == 1 and (pos[i] - pos[j]).norm() < 1.2 * (radius[z[i]] + 0.31)
        )
        rows.append([float(z[i] == e) for e in (1, 6, 7, 8, 9)] + [z[i], 0, 0, 0, 0, hs])
    out = torch.relu(encoder.lin0(torch.tensor(rows)))
    h = out.unsqueeze(0)
    conv = encoder.conv
    for _ in range(3):
        m = torch.zeros(n, encoder.dim)
        for i in range(n):
            messages = []
            for j in range(n):
                if j != i:
                    e = torch.tensor([0.0, 0.0, 0.0, 0.0, float((pos[i] - pos[j]).norm())])
                    weight = conv.nn(e).view(encoder.dim, encoder.dim)
                    messages.append(out[j] @ weight)
            if messages:
                m[i] = torch.stack(messages).mean(0)
        m = torch.relu(m + out @ conv.root.weight.T + conv.bias)
        out, h = encoder.gru(m.unsqueeze(0), h)
        out = out.squeeze(0)
    q_star = torch.zeros(1, 2 * encoder.dim)
    state = None
    for _ in range(3):
        q, state = encoder.set2set.lstm(q_star.unsqueeze(0), state)
        q = q.view(1, encoder.dim)
        attention = torch.softmax(out @ q[0], dim=0)
        q_star = torch.cat([q, (attention.unsqueeze(1) * out).sum(0, keepdim=True)], dim=1)
    return torch.relu(encoder.lin1(q_star))[0]


def test_the_batched_forward_is_the_per_molecule_reference():
    torch.manual_seed(0)
    encoder = MPNNEncoder(dim=8, edge_hidden=16)
    with torch.no_grad():
        encoder.conv.bias.normal_()  # a bias that is not zero is checked too
        got = encoder(padded(WATER, METHANOL, LONE))
        expected = torch.stack([reference_encoder(encoder, m) for m in (WATER, METHANOL, LONE)])
    assert got.shape == (3, 8) and expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    encoder = MPNNEncoder(dim=4, edge_hidden=4)
    with pytest.raises(MtlkitError, match=r"atomic numbers must be QM9's \[1, 6, 7, 8, 9\].*\[3\]"):
        encoder(padded([(3, (0.0, 0.0, 0.0))]))
    with pytest.raises(MtlkitError, match=r"expected molecules \[B, N, 4\]"):
        encoder(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="edge_hidden must be an integer >= 1"):
        MPNNEncoder(edge_hidden=0)
