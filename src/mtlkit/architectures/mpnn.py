"""The QM9 network of Nash-MTL, in plain PyTorch (no graph library).

Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022), code
``experiments/quantum_chemistry/models.py`` (``Net``), after Gilmer et al., "Neural Message
Passing for Quantum Chemistry" (ICML 2017) and PyTorch Geometric's QM9 example; LibMTL's QM9
example trains the same network. Layer by layer, with ``dim = 64``::

    lin0     Linear(11 -> dim), ReLU                      node features -> atom states
    conv     NNConv(dim -> dim, aggr="mean"):             one layer, applied 3 times
               m_i = mean_{j != i} h_j @ W(e_ij) + h_i @ root + bias,
               W(e) = Linear(5 -> 128), ReLU, Linear(128 -> dim * dim)   (a dim x dim matrix)
    gru      GRU(dim, dim): h = GRU(relu(m), h), 3 rounds, weights tied
    set2set  Set2Set(dim, processing_steps=3): LSTM(2 dim -> dim) query, attention over atoms
    lin1     Linear(2 dim -> dim), ReLU                   the shared representation
    heads    one Linear(dim -> 1) per target

Parameters (``dim = 64``): lin0 768, the edge network 529,152, root and bias 4,160, GRU 24,960,
Set2Set 49,664, lin1 8,256: 616,960 shared, and 65 per head (617,675 with the 11 targets). The
module names are theirs (``lin0``, ``conv.nn``, ``gru``, ``set2set.lstm``, ``lin1``; the root
weight, a ``[in, out]`` parameter ``conv.root`` or ``conv.lin`` in PyTorch Geometric's versions,
is the linear map ``conv.root`` here). Initialisation: PyTorch's defaults, a zero ``conv.bias``.

The graph is theirs: every pair of distinct atoms of a molecule is an edge (their ``Complete``
transform), and the message function sees the distance. Input: the padded molecules of
:mod:`mtlkit.data.qm9`, float32 ``[B, N, 4]``, row ``i`` = (atomic number, x, y, z) of atom ``i``,
rows of zeros for padding; the features are built here from them, in PyTorch Geometric's layout:

* node (11): one-hot H, C, N, O, F; the atomic number; aromatic; sp, sp2, sp3; the number of
  bonded hydrogens;
* edge (5): one-hot single, double, triple, aromatic bond; the distance in Angstrom.

What differs, because the ``.xyz`` files have no bonds (PyTorch Geometric reads them from the
SDF file with RDKit): the bond types and the aromatic and hybridisation flags are zeros (their
weights are kept, so the layers and counts are theirs), and the number of bonded hydrogens is
counted from the geometry (hydrogens closer than 1.2 times the sum of the covalent radii of
Cordero et al., 2008). Messages are computed on the edge list of the real atoms only, as PyTorch
Geometric does (``O(E dim^2)`` memory for the ``E`` edges of a batch).

``forward(x, return_features=True)`` of the model also returns the shared representation
``[B, dim]`` (their ``return_representation``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.architectures.base import ARCHITECTURES
from mtlkit.architectures.hps import HPS
from mtlkit.errors import MtlkitError

__all__ = ["ELEMENTS", "MPNNEncoder", "NNConv", "Set2Set", "build_mpnn", "molecule_graph"]

ELEMENTS = (1, 6, 7, 8, 9)
"""The atomic numbers of QM9 (H, C, N, O, F), in the order of the one-hot node feature."""

COVALENT_RADIUS = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}
"""Angstrom (Cordero et al., "Covalent radii revisited", Dalton Trans. 2008; sp3 carbon)."""

BOND_TOLERANCE = 1.2
NODE_FEATURES = 11
EDGE_FEATURES = 5


def molecule_graph(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The graph of padded molecules ``x [B, N, 4]``: ``(node_features [M, 11], batch [M],
    edge_index [2, E], edge_features [E, 5])`` over the ``M`` real atoms (row order: molecule,
    then atom), ``edge_index[0]`` the source atom ``j`` and ``edge_index[1]`` the target ``i``
    of every ordered pair ``i != j`` of the same molecule.

    Raises:
        MtlkitError: on a shape other than ``[B, N, 4]`` or an atomic number not in QM9's.
    """
    if x.dim() != 3 or x.shape[-1] != 4:
        raise MtlkitError(f"MPNNEncoder: expected molecules [B, N, 4], got {tuple(x.shape)}")
    z = x[..., 0].round().long()
    mask = z > 0
    allowed = torch.tensor((0, *ELEMENTS), device=x.device)
    bad = ~torch.isin(z, allowed)
    if bool(bad.any()):
        raise MtlkitError(
            f"MPNNEncoder: atomic numbers must be QM9's {list(ELEMENTS)} (0 = padding), got "
            f"{sorted(set(z[bad].tolist()))}"
        )
    batch, atom = mask.nonzero(as_tuple=True)
    number = torch.full_like(z, -1)
    number[batch, atom] = torch.arange(len(batch), device=x.device)
    zs = z[batch, atom]
    positions = x[..., 1:]
    distance = torch.cdist(positions, positions)  # [B, N, N]
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    pairs = mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye  # [B, target i, source j]
    b, i, j = pairs.nonzero(as_tuple=True)
    edge_index = torch.stack([number[b, j], number[b, i]])
    d = distance[b, i, j]
    edge_features = torch.cat([d.new_zeros(len(d), EDGE_FEATURES - 1), d.unsqueeze(1)], dim=1)
    radius = torch.zeros(max(ELEMENTS) + 1, dtype=x.dtype, device=x.device)
    for element, r in COVALENT_RADIUS.items():
        radius[element] = r
    bonded_h = (z[b, j] == 1) & (d < BOND_TOLERANCE * (radius[z[b, i]] + radius[1]))
    num_hs = torch.zeros(len(zs), dtype=x.dtype, device=x.device)
    num_hs.index_add_(0, edge_index[1], bonded_h.to(x.dtype))
    one_hot = (zs.unsqueeze(1) == allowed[1:]).to(x.dtype)
    flags = x.new_zeros(len(zs), 4)  # aromatic, sp, sp2, sp3: unknown without bonds
    nodes = torch.cat([one_hot, zs.to(x.dtype).unsqueeze(1), flags, num_hs.unsqueeze(1)], dim=1)
    return nodes, batch, edge_index, edge_features


class NNConv(nn.Module):
    """The edge-conditioned convolution of Gilmer et al. (PyTorch Geometric's ``NNConv``, mean
    aggregation): ``out_i = mean_{(j, i) in E} x_j @ W(e_ji) + x_i @ root + bias``, ``W(e)`` the
    ``nn`` network's output seen as an ``in x out`` matrix; atoms without edges get only the root
    term."""

    def __init__(self, in_channels: int, out_channels: int, edge_network: nn.Module) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.nn = edge_network
        self.root = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, edge_index: Tensor, edge_features: Tensor) -> Tensor:
        source, target = edge_index
        weight = self.nn(edge_features).view(-1, self.in_channels, self.out_channels)
        messages = torch.bmm(x[source].unsqueeze(1), weight).squeeze(1)
        total = x.new_zeros(len(x), self.out_channels).index_add_(0, target, messages)
        count = x.new_zeros(len(x)).index_add_(0, target, torch.ones_like(target, dtype=x.dtype))
        return total / count.clamp(min=1).unsqueeze(1) + self.root(x) + self.bias


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al., 2016; PyTorch Geometric's): ``processing_steps`` rounds
    of ``q = LSTM(q*)``, ``a = softmax over the molecule's atoms of <x_i, q>``,
    ``q* = [q, sum_i a_i x_i]``; output ``[B, 2 dim]`` (zeros' readout for a molecule without
    atoms)."""

    def __init__(self, dim: int, processing_steps: int = 3) -> None:
        super().__init__()
        self.dim = dim
        self.processing_steps = processing_steps
        self.lstm = nn.LSTM(2 * dim, dim)

    def forward(self, x: Tensor, batch: Tensor, size: int) -> Tensor:
        q_star = x.new_zeros(size, 2 * self.dim)
        state = (x.new_zeros(1, size, self.dim), x.new_zeros(1, size, self.dim))
        for _ in range(self.processing_steps):
            q, state = self.lstm(q_star.unsqueeze(0), state)
            q = q.squeeze(0)
            score = (x * q[batch]).sum(-1)
            top = score.new_full((size,), float("-inf")).scatter_reduce(
                0, batch, score, "amax", include_self=True
            )
            weight = torch.exp(score - top[batch])
            norm = weight.new_zeros(size).index_add_(0, batch, weight)
            attention = weight / (norm[batch] + 1e-16)
            readout = x.new_zeros(size, self.dim).index_add_(0, batch, attention.unsqueeze(1) * x)
            q_star = torch.cat([q, readout], dim=-1)
        return q_star


class MPNNEncoder(nn.Module):
    """Nash-MTL's QM9 encoder (``Net`` without its heads): padded molecules ``[B, N, 4]`` ->
    ``[B, dim]``; see the module docstring.

    Args:
        dim: the width of the atom states (64 in Nash-MTL).
        steps: the message-passing rounds (3).
        edge_hidden: the hidden width of the edge network (128).
        set2set_steps: the processing steps of the readout (3).
    """

    def __init__(
        self, dim: int = 64, steps: int = 3, edge_hidden: int = 128, set2set_steps: int = 3
    ) -> None:
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("steps", steps),
            ("edge_hidden", edge_hidden),
            ("set2set_steps", set2set_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.dim, self.steps = dim, steps
        self.lin0 = nn.Linear(NODE_FEATURES, dim)
        edge_network = nn.Sequential(
            nn.Linear(EDGE_FEATURES, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, dim * dim)
        )
        self.conv = NNConv(dim, dim, edge_network)
        self.gru = nn.GRU(dim, dim)
        self.set2set = Set2Set(dim, set2set_steps)
        self.lin1 = nn.Linear(2 * dim, dim)
        self.out_features = dim

    def forward(self, x: Tensor) -> Tensor:
        nodes, batch, edge_index, edge_features = molecule_graph(x)
        out = torch.relu(self.lin0(nodes))
        h = out.unsqueeze(0)
        for _ in range(self.steps):
            m = torch.relu(self.conv(out, edge_index, edge_features))
            out, h = self.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        return torch.relu(self.lin1(self.set2set(out, batch, x.shape[0])))


@ARCHITECTURES.register("mpnn")
def build_mpnn(
    input_shape: Sequence[int],
    task_outputs: Mapping[str, int],
    multi_input: bool = False,
    dim: int = 64,
    steps: int = 3,
    edge_hidden: int = 128,
    set2set_steps: int = 3,
) -> HPS:
    """Nash-MTL's QM9 network: an :class:`MPNNEncoder` shared by all tasks and a linear head per
    task (617,675 parameters for the 11 targets at ``dim=64``).

    Raises:
        ValueError: if ``input_shape`` is not ``(N, 4)`` or an argument is out of range.
    """
    if len(input_shape) != 2 or input_shape[1] != 4:
        raise ValueError(
            f"mpnn needs padded molecules of shape (atoms, 4), got input_shape {tuple(input_shape)}"
        )
    encoder = MPNNEncoder(dim, steps, edge_hidden, set2set_steps)
    heads = {task: nn.Linear(dim, size) for task, size in task_outputs.items()}
    return HPS(encoder, heads, multi_input=multi_input)
