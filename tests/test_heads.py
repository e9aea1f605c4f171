"""Output heads: dipole (direct and from conserved charges), direct forces, the invariant baseline.

References: exact symmetry relations (rotation, inversion), exact charge conservation, a closed-loop
work integral (zero for a gradient field), the eager model for the exported file. float64 throughout.
"""
import json

import numpy as np
import pytest
import torch

import helpers

from helpers import random_rotation

from equiforce.training.config import ConfigError, DataError, TrainConfig
from equiforce.data.dataset import collate
from equiforce.deploy.export import export_model, load_exported
from equiforce.model.forces import model_outputs
from equiforce.data.neighbors import neighbor_list
from equiforce.training.loop import predict, rotate_batch

R_MAX = 3.0
SPECIES = ["H", "C", "O"]


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def make_model(lmax=1, symmetry="O3", dipole="none", direct_forces=False, seed=0, channels=6, layers=2):
    # non-trivial scale/shift and dipole scale
    return helpers.make_model(SPECIES, seed, r_max=R_MAX, channels=channels, lmax=lmax, num_layers=layers,
                              radial_hidden=12, symmetry=symmetry, avg_num_neighbors=3.0, dipole=dipole,
                              direct_forces=direct_forces, scale=[0.7, 1.3, 0.9], shift=[-1.0, -2.0, -3.0],
                              dipole_scale=0.4)


def molecule(seed=1, n=6):
    """A random compact cluster (Å) with species indices."""
    rng = np.random.default_rng(seed)
    pos = [np.zeros(3)]
    while len(pos) < n:
        d = rng.normal(size=3)
        cand = pos[rng.integers(len(pos))] + d / np.linalg.norm(d) * rng.uniform(1.0, 1.5)
        if min(np.linalg.norm(cand - p) for p in pos) > 0.9:
            pos.append(cand)
    species = torch.tensor(rng.integers(0, 3, size=n))
    return torch.tensor(np.array(pos)), species


def outputs(model, pos, species, total_charge=None):
    ei, shift, _ = neighbor_list(pos, R_MAX, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool))
    batch = torch.zeros(len(species), dtype=torch.long)
    q = None if total_charge is None else torch.tensor([float(total_charge)])
    out = model_outputs(model, pos, species, ei, shift.to(pos.dtype), batch, 1, total_charge=q)
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("symmetry", ["O3", "SE3"])
@pytest.mark.parametrize("mode", ["direct", "charges", "both"])
def test_dipole_is_rotation_equivariant(symmetry, mode):
    model = make_model(symmetry=symmetry, dipole=mode)
    pos, species = molecule()
    rng = np.random.default_rng(3)
    mu = outputs(model, pos, species)["dipole"][0]
    assert float(mu.norm()) > 1e-3  # a non-trivial vector
    for _ in range(3):
        rot = torch.tensor(random_rotation(rng))
        shifted = pos @ rot.T + torch.tensor(rng.normal(size=3))  # rotation and translation
        mu_rot = outputs(model, shifted, species)["dipole"][0]
        assert float((mu_rot - rot @ mu).abs().max()) < 1e-10


def test_o3_dipole_is_a_polar_vector_and_se3_need_not_be():
    pos, species = molecule()
    for mode in ("direct", "charges", "both"):
        model = make_model(dipole=mode)
        mu = outputs(model, pos, species)["dipole"][0]
        mu_inv = outputs(model, -pos, species)["dipole"][0]
        assert float((mu_inv + mu).abs().max()) < 1e-10, mode
        # a mirror (det -1) acts on a polar vector like on positions
        mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
        mu_m = outputs(model, pos @ mirror, species)["dipole"][0]
        assert float((mu_m - mirror @ mu).abs().max()) < 1e-10, mode
    # SE(3) mode ignores parity: its l=1 output mixes in pseudovectors, so inversion is not -mu
    model = make_model(symmetry="SE3", dipole="direct")
    mu = outputs(model, pos, species)["dipole"][0]
    mu_inv = outputs(model, -pos, species)["dipole"][0]
    assert float((mu_inv + mu).abs().max()) > 1e-3 * float(mu.abs().max())


def test_charges_conserve_total_charge_exactly():
    model = make_model(dipole="charges")
    graphs = []
    for k, (n, q) in enumerate([(5, 0.0), (7, 1.0), (4, -2.0)]):
        pos, species = molecule(seed=10 + k, n=n)
        ei, shift, _ = neighbor_list(pos, R_MAX, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool))
        graphs.append({"pos": pos, "species": species, "edge_index": ei, "edge_shift": shift.double(),
                       "cell": torch.zeros(3, 3), "pbc": torch.zeros(3, dtype=torch.bool),
                       "natoms": torch.tensor(n), "energy": torch.tensor(0.0), "forces": torch.zeros(n, 3),
                       "stress": torch.zeros(3, 3), "has_stress": torch.tensor(False),
                       "total_charge": torch.tensor(q)})
    b = collate(graphs)
    out = model_outputs(model, b["pos"], b["species"], b["edge_index"], b["edge_shift"], b["batch"], 3,
                        total_charge=b["total_charge"])
    out = {k: v.detach() for k, v in out.items()}
    totals = torch.zeros(3).index_add_(0, b["batch"], out["charges"])
    assert torch.allclose(totals, torch.tensor([0.0, 1.0, -2.0]), rtol=0, atol=1e-12)
    assert float(out["charges"].abs().max()) > 1e-3
    # the batched dipole equals each structure's own dipole (mu = sum q (r - centroid))
    for k, g in enumerate(graphs):
        single = outputs(model, g["pos"], g["species"], float(g["total_charge"]))
        assert float((single["dipole"][0] - out["dipole"][k]).abs().max()) < 1e-12
        q, r = single["charges"], g["pos"]
        ref = (q.unsqueeze(-1) * (r - r.mean(0))).sum(0)
        assert float((ref - single["dipole"][0]).abs().max()) < 1e-12


def test_invariant_baseline_vectors_do_not_rotate():
    """The lmax=0 (distance-only) model's vector outputs are exactly rotation-INVARIANT: it cannot
    represent a dipole or a force that turns with the molecule. The equivariant one is not invariant."""
    pos, species = molecule()
    rot = torch.tensor(random_rotation(np.random.default_rng(5)))
    inv = make_model(lmax=0, dipole="direct", direct_forces=True)
    a, b = outputs(inv, pos, species), outputs(inv, pos @ rot.T, species)
    for key in ("dipole", "forces"):
        assert float(a[key].abs().max()) > 1e-3
        assert float((a[key] - b[key]).abs().max()) < 1e-10, key
    # its conservative forces, -dE/dr of an invariant energy, do rotate
    assert float((b["conservative_forces"] - a["conservative_forces"] @ rot.T).abs().max()) < 1e-10
    eq = make_model(lmax=1, dipole="direct", direct_forces=True)
    a, b = outputs(eq, pos, species), outputs(eq, pos @ rot.T, species)
    for key in ("dipole", "forces"):
        assert float((a[key] - b[key]).abs().max()) > 1e-3, key
        assert float((b[key] - a[key] @ rot.T).abs().max()) < 1e-10, key


def loop_work(model, pos, species, key, steps=400, radius=0.15):
    """Closed-loop integral of F . dr as atom 0 moves once around a circle (trapezoid rule)."""
    rng = np.random.default_rng(7)
    u, v = np.linalg.qr(rng.normal(size=(3, 2)))[0].T
    t = np.linspace(0.0, 2 * np.pi, steps + 1)
    path = pos[0].numpy() + radius * (np.outer(np.cos(t) - 1.0, u) + np.outer(np.sin(t), v))
    forces = []
    for point in path:
        p = pos.clone()
        p[0] = torch.tensor(point)
        forces.append(outputs(model, p, species)[key][0].detach().numpy())
    forces = np.array(forces)
    dr = np.diff(path, axis=0)
    return float((0.5 * (forces[1:] + forces[:-1]) * dr).sum())


@pytest.mark.slow
def test_direct_forces_are_equivariant_but_not_conservative():
    pos, species = molecule(n=5)
    model = make_model(direct_forces=True)
    rng = np.random.default_rng(11)
    f = outputs(model, pos, species)["forces"]
    for _ in range(2):
        rot = torch.tensor(random_rotation(rng))
        f_rot = outputs(model, pos @ rot.T, species)["forces"]
        assert float((f_rot - f @ rot.T).abs().max()) < 1e-10
    w_direct = loop_work(model, pos, species, "forces")
    w_conservative = loop_work(model, pos, species, "conservative_forces")
    typical = float(f[0].norm()) * 2 * np.pi * 0.15  # |F| x loop length: the scale of the integral
    assert abs(w_conservative) < 1e-8
    assert abs(w_direct) > 1e-3 * typical, (w_direct, typical)


def test_export_round_trip_dipole_and_direct_forces(tmp_path):
    model = make_model(dipole="both", direct_forces=True)
    pos, species = molecule(n=6)
    ei, shift, _ = neighbor_list(pos, R_MAX, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool))
    check = (pos, species, ei, shift.double(), torch.zeros(3, 3))
    path = str(tmp_path / "heads.pt")
    meta = export_model(model.for_export(), path, torch.float64, symmetry="O3", check_structure=check)
    module, meta2 = load_exported(path)
    assert meta2 == json.loads(json.dumps(meta))
    assert meta["conservative"] is False and "dipole" in meta["outputs"] and "dipole" in meta["methods"]
    eager = outputs(model, pos, species, total_charge=1.0)
    with torch.jit.optimized_execution(False):
        e, atom_e, f, virial = module(pos, species, ei, shift.double(), torch.zeros(3, 3), len(species))
        mu = module.dipole(pos, species, ei, shift.double(), torch.zeros(3, 3), 1.0)
    assert abs(float(e) - float(eager["energy"][0])) < 1e-12
    assert float((f - eager["forces"]).abs().max()) < 1e-12           # the head's forces
    assert float((f - eager["conservative_forces"]).abs().max()) > 1e-3
    assert float((virial - eager["virial"][0]).abs().max()) < 1e-12
    assert float((mu - eager["dipole"][0]).abs().max()) < 1e-12
    # LAMMPS ghosts: only local atoms get direct forces; energy counts local atoms only
    with torch.jit.optimized_execution(False):
        e2, atom_e2, f2, _ = module(pos, species, ei, shift.double(), torch.zeros(3, 3), 4)
    assert float(f2[4:].abs().max()) == 0.0 and float((f2[:4] - f[:4]).abs().max()) < 1e-12
    assert abs(float(e2) - float(atom_e[:4].sum())) < 1e-12
    # a conservative model without a dipole head: no dipole in its metadata, the method refuses
    plain = make_model(direct_forces=False, dipole="none")
    meta = export_model(plain.for_export(), str(tmp_path / "plain.pt"), torch.float64, symmetry="O3")
    assert meta["conservative"] is True and "dipole" not in meta["outputs"]


def test_dipole_model_without_dipole_head_raises_in_exported_method(tmp_path):
    model = make_model(direct_forces=True)  # heads but no dipole
    pos, species = molecule(n=4)
    path = str(tmp_path / "df.pt")
    export_model(model.for_export(), path, torch.float64, symmetry="O3")
    module, meta = load_exported(path)
    ei, shift, _ = neighbor_list(pos, R_MAX, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(Exception, match="no dipole head"):
        module.dipole(pos, species, ei, shift.double(), torch.zeros(3, 3), 0.0)


def test_rotate_batch_matches_rotated_predictions():
    """Rotation augmentation rotates every label consistently (periodic cell and stress included)."""
    from helpers import periodic_structure
    from equiforce.data.dataset import atoms_to_graph

    rng = np.random.default_rng(2)
    atoms = periodic_structure(rng, ["C", "O", "H", "H"], length=4.0)
    g = atoms_to_graph(atoms, SPECIES, R_MAX)
    g["dipole"], g["has_dipole"] = torch.tensor([0.1, -0.2, 0.3]), torch.tensor(True)
    batch = collate([g, g])
    model = make_model(lmax=1)
    pred = {k: v.detach() for k, v in predict(model, batch, create_graph=False).items()}
    rots = torch.tensor(np.stack([random_rotation(rng), random_rotation(rng)]))
    rb = rotate_batch(batch, rots)
    rpred = {k: v.detach() for k, v in predict(model, rb, create_graph=False).items()}
    assert float((rpred["energy"] - pred["energy"]).abs().max()) < 1e-10
    atom_rot = rots[batch["batch"]]
    assert float((rpred["forces"] - torch.einsum("nij,nj->ni", atom_rot, pred["forces"])).abs().max()) < 1e-10
    ref_stress = rots @ pred["stress"] @ rots.transpose(1, 2)
    assert float((rpred["stress"] - ref_stress).abs().max()) < 1e-10
    assert float((rb["dipole"][1] - rots[1] @ batch["dipole"][1]).abs().max()) < 1e-14


def test_bad_settings_and_missing_labels(tmp_path):
    with pytest.raises(ConfigError, match="dipole must be one of"):
        TrainConfig.from_dict({"model": {"dipole": "quadrupole"}})
    with pytest.raises(ConfigError, match="direct_forces"):
        TrainConfig.from_dict({"model": {"direct_forces": "yes"}})
    data = helpers.write_water_without_extra_labels(tmp_path / "nodipole.extxyz")
    from equiforce.training.loop import train

    cfg = TrainConfig.from_dict({"data": data, "out": str(tmp_path / "run"), "epochs": 1,
                                 "model": {"r_max": 3.0, "channels": 4, "lmax": 1, "num_layers": 1,
                                           "dipole": "direct"}})
    with pytest.raises(DataError, match="no training structure has a dipole label"):
        train(cfg, progress=False, log=lambda s: None)
