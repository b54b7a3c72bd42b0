"""QM9 from the release's .xyz files; the pure-PyTorch message-passing network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dataset_fixtures import METHANE, write_qm9, write_qm9_archive

from mtlkit.architectures import build
from mtlkit.data import qm9 as qm9_module
from mtlkit.data.benchmarks import DATASETS
from mtlkit.data.qm9 import TARGETS, parse_xyz, read_molecules
from mtlkit.errors import ConfigError, DatasetError

HA_MEV = 27211.386246


def test_parse_methane_verbatim():
    index, z, pos, props = parse_xyz(METHANE)
    assert index == 1 and z.tolist() == [6, 1, 1, 1, 1]
    assert pos[1].tolist() == pytest.approx([0.002150416, -0.0060313176, 0.0019761204])
    # A B C mu alpha homo lumo gap r2 zpve U0 U H G Cv
    assert props[[3, 4, 5, 8, 10, 14]].tolist() == pytest.approx(
        [0.0, 13.21, -0.3877, 35.3641, -40.47893, 6.469]
    )


def test_mathematica_exponents():
    text = METHANE.replace("0.002150416\t", "2.150416*^-3\t").replace("-0.535689", "-5.35689*^-1")
    text = text.replace("13.21", "1.321*^1")
    _, _, pos, props = parse_xyz(text)
    assert pos[1, 0] == pytest.approx(2.150416e-3) and props[4] == pytest.approx(13.21)


def test_malformed_files_are_named():
    bad = METHANE.replace("gdb 1\t157.7118", "gdb 1")
    with pytest.raises(DatasetError, match=r"m\.xyz line 2: expected 'gdb <index>' and 15"):
        parse_xyz(bad, "m.xyz")
    with pytest.raises(DatasetError, match="line 3: expected"):
        parse_xyz(METHANE.replace("C\t-0.0126981359", "Cl\t-0.0126981359"), "m.xyz")
    with pytest.raises(DatasetError, match="line 1"):
        parse_xyz("five\n", "m.xyz")
    with pytest.raises(DatasetError, match="bad number"):
        parse_xyz(METHANE.replace("1.0858041578", "1.08x"), "m.xyz")


@pytest.fixture
def qm9_root(tmp_path):
    written = write_qm9(tmp_path / "qm9", n=40)
    return tmp_path / "qm9", written


def test_targets_units_and_atomization(qm9_root):
    root, written = qm9_root
    molecules = read_molecules(root)
    assert len(molecules) == 40 and molecules.index.tolist() == list(range(1, 41))
    targets = molecules.targets()
    methane = dict(zip(TARGETS, targets[0]))
    u0_atom = -40.47893 - (-37.846772 + 4 * -0.500273)  # Ha, from the atomref table
    assert methane["U0"] == pytest.approx(u0_atom * HA_MEV)
    assert methane["U0"] == pytest.approx(-17172.18, abs=0.01)  # about -17.17 eV
    assert methane["G"] == pytest.approx((-40.498597 - (-37.861317 + 4 * -0.510927)) * HA_MEV)
    assert methane["homo"] == pytest.approx(-0.3877 * HA_MEV)
    assert methane["alpha"] == pytest.approx(13.21) and methane["Cv"] == pytest.approx(6.469)
    total = dict(zip(TARGETS, molecules.targets("total")[0]))
    assert total["U0"] == pytest.approx(-40.47893 * HA_MEV)
    elements, positions, props = written[7]
    row = molecules.numbers[6]
    assert row[: len(elements)].tolist() == [qm9_module.ELEMENTS[e] for e in elements]
    assert (row[len(elements) :] == 0).all()
    assert molecules.positions[6, 0].tolist() == pytest.approx(positions[0].tolist(), abs=1e-5)
    assert molecules.properties[6].tolist() == pytest.approx(props.tolist(), abs=1e-6)


def test_split_normalisation_loss_and_metric(qm9_root):
    root, _ = qm9_root
    problem = DATASETS.get("qm9", root=str(root), n_val=5, n_test=6, seed=1)
    train, val, test = (problem.splits[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (29, 5, 6)
    every = torch.cat([train.index, val.index, test.index]).sort().values
    assert every.tolist() == list(range(1, 41))
    assert problem.input_shape == (29, 4) and problem.task_outputs == dict.fromkeys(TARGETS, 1)
    x, y = test[0]
    assert x.shape == (29, 4) and set(y) == set(TARGETS) and y["mu"].shape == (1,)
    # normalisation statistics come from the training split
    mu = train.targets[:, 0].double()
    task = problem.tasks[0]
    assert task.loss.mean == pytest.approx(float(mu.mean()))
    assert task.loss.std == pytest.approx(float(mu.std(unbiased=False)))
    target = test.targets[:, :1]
    perfect = (target.double() - task.loss.mean) / task.loss.std
    assert float(task.loss(perfect.float(), target)) == pytest.approx(0.0, abs=1e-10)
    mae = task.new_metrics()["mae"]
    mae.update(perfect.float(), target)
    assert mae.compute() == pytest.approx(0.0, abs=1e-5)
    zero = task.new_metrics()["mae"]
    zero.update(torch.zeros_like(target), target)  # predicts the training mean
    assert zero.compute() == pytest.approx(float((target.double() - mu.mean()).abs().mean()))
    again = DATASETS.get("qm9", root=str(root), n_val=5, n_test=6, seed=1)
    assert torch.equal(again.splits["test"].index, test.index)
    with pytest.raises(ConfigError, match="40 molecules"):
        DATASETS.get("qm9", root=str(root))  # the default 10000 + 10000


def test_archive_cache_and_uncharacterized(qm9_root, tmp_path, monkeypatch):
    root, _ = qm9_root
    archive_dir = tmp_path / "archive"
    write_qm9_archive(archive_dir / "dsgdb9nsd.xyz.tar.bz2", root)
    direct, packed = read_molecules(root), read_molecules(archive_dir, str(tmp_path / "cache"))
    assert np.array_equal(direct.numbers, packed.numbers)
    assert np.array_equal(direct.properties, packed.properties)
    assert len(list((tmp_path / "cache").glob("qm9-*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("parsed again instead of reading the cache")

    monkeypatch.setattr(qm9_module, "parse_xyz", fail)
    cached = read_molecules(archive_dir, str(tmp_path / "cache"))
    assert np.array_equal(cached.positions, direct.positions)
    monkeypatch.undo()
    (root / "uncharacterized.txt").write_text(
        " Uncharacterized molecules\n Index  SMILES\n     3   CC   x\n    17   CO   y\n"
    )
    problem = DATASETS.get("qm9", root=str(root), n_val=4, n_test=4)
    kept = torch.cat([problem.splits[s].index for s in ("train", "val", "test")])
    assert len(kept) == 38 and 3 not in kept.tolist() and 17 not in kept.tolist()


def test_missing_root_shows_the_layout(tmp_path):
    with pytest.raises(DatasetError) as error:
        DATASETS.get("qm9", root=str(tmp_path))
    assert "no .xyz files" in str(error.value) and "'*^' = 'e'" in str(error.value)


def test_mpnn_is_invariant_and_trains(qm9_root):
    root, _ = qm9_root
    problem = DATASETS.get("qm9", root=str(root), n_val=4, n_test=4)
    torch.manual_seed(0)
    model = build("mpnn", problem.input_shape, problem.task_outputs, dim=16, edge_hidden=16)
    x = problem.splits["train"].inputs[:8]
    out = model(x)
    assert set(out) == set(TARGETS) and out["mu"].shape == (8, 1)
    # atom order, padding, rotation and translation do not matter
    n = int((x[0, :, 0] > 0).sum())
    permuted = x.clone()
    order = torch.randperm(n)
    permuted[0, :n] = x[0, order]
    q, _ = torch.linalg.qr(torch.randn(3, 3))
    moved = x.clone()
    moved[..., 1:] = (x[..., 1:] @ q.T + torch.tensor([1.0, -2.0, 0.5])) * (x[..., :1] > 0)
    padded = torch.cat([x, torch.zeros(8, 5, 4)], dim=1)
    for variant in (permuted, moved, padded):
        assert torch.allclose(model(variant)["U0"], out["U0"], atol=1e-4)
    _outputs, features = model(x, return_features=True)
    assert features.shape == (8, 16)
    tasks = {t.name: t for t in problem.tasks}
    loader = torch.utils.data.DataLoader(problem.splits["train"], batch_size=8)
    params = list(model.parameters())
    first = None
    for _ in range(12):
        for xb, yb in loader:
            out = model(xb)
            loss = sum(tasks[t].loss(out[t], yb[t]) for t in TARGETS)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= 0.02 * g
            first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.7 * first
    with pytest.raises(ConfigError, match="atoms, 4"):
        build("mpnn", (3, 8, 8), {"a": 1})
