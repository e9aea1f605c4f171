"""Data pipeline: label keys, clear errors, reproducible splits, batching (float64).

Reference labels come from :class:`equiforce.model.analytic.AnalyticMessageModel` evaluated on edges from
ASE's ``neighbor_list`` (independent of equiforce.data.neighbors); the labelled frames come from
``helpers.make_frames`` / ``helpers.write_dataset`` (shared with test_train.py and test_cli.py).
"""

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list as ase_neighbor_list

from equiforce.training.config import DataError
from equiforce.data.dataset import (atoms_to_graph, average_num_neighbors, collate, load_dataset, split_indices,
                            species_from_structures)
from equiforce.model.forces import energy_forces_virial
from equiforce.model.network import EquiforceModel, ModelConfig
from helpers import LABEL_SPECIES, R_MAX, make_frames, reference_labels, write_dataset  # noqa: F401

F64 = torch.float64


def test_default_keys_read_from_ase_calculator(tmp_path):
    frames = make_frames(n=3, periodic=2)
    path = str(tmp_path / "d.extxyz")
    ase.io.write(path, frames, format="extxyz")
    graphs, species = load_dataset(path, R_MAX)
    assert species == ["H", "O"]
    assert len(graphs) == 5
    for atoms, g in zip(frames, graphs):
        ref_e, ref_f, ref_s = reference_labels(atoms)
        # extxyz stores forces with 8 decimals
        assert abs(float(g["energy"]) - ref_e) < 1e-9
        assert np.abs(g["forces"].numpy() - ref_f).max() < 1e-7
        assert bool(g["has_stress"]) == (ref_s is not None)
        if ref_s is not None:
            # Voigt (xx yy zz yz xz xy) in the file -> symmetric 3x3
            assert np.abs(g["stress"].numpy() - ref_s).max() < 1e-9
        assert [species[k] for k in g["species"].tolist()] == atoms.get_chemical_symbols()


def test_custom_keys_in_info_and_arrays(tmp_path):
    frames = make_frames(n=2, periodic=1)
    for atoms in frames:
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        s = atoms.calc.results.get("stress")
        atoms.calc = None
        atoms.info["REF_energy"] = e
        atoms.arrays["REF_forces"] = f
        if s is not None:
            atoms.info["REF_stress"] = s
    path = str(tmp_path / "custom.extxyz")
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(DataError, match="no energy under key 'energy'.*REF_energy"):
        load_dataset(path, R_MAX)
    graphs, _ = load_dataset(path, R_MAX, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    for atoms, g in zip(frames, graphs):
        assert abs(float(g["energy"]) - atoms.info["REF_energy"]) < 1e-9
        assert np.abs(g["forces"].numpy() - atoms.arrays["REF_forces"]).max() < 1e-7
    assert [bool(g["has_stress"]) for g in graphs] == [False, False, True]


def test_missing_forces_key_names_keys_found(tmp_path):
    atoms = ase.Atoms("OH", positions=[[0, 0, 0], [1, 0, 0]])
    atoms.info["energy"] = -1.0
    atoms.arrays["my_forces"] = np.zeros((2, 3))
    path = str(tmp_path / "noforces.extxyz")
    ase.io.write(path, [atoms], format="extxyz")
    with pytest.raises(DataError) as err:
        load_dataset(path, R_MAX)
    msg = str(err.value)
    assert "no forces under key 'forces'" in msg and "my_forces" in msg and "structure 0" in msg


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_dataset(str(empty), R_MAX)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nothere.extxyz"), R_MAX)
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("this is not\nan extxyz file\n")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(garbage), R_MAX)


def test_element_absent_from_model(tmp_path):
    frames = make_frames(n=2)
    frames[1][0].symbol = "C"
    path = str(tmp_path / "c.extxyz")
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"structure 1 contains element\(s\) \['C'\].*\['H', 'O'\]"):
        load_dataset(path, R_MAX, species_names=["H", "O"])
    # without a model species list, the species come from the data, sorted by atomic number
    _, species = load_dataset(path, R_MAX)
    assert species == ["H", "C", "O"]


def test_non_finite_labels(tmp_path):
    frames = make_frames(n=3)
    frames[2].calc.results["forces"][1, 2] = np.nan
    path = str(tmp_path / "nan.extxyz")
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(DataError, match="structure 2: forces contains non-finite"):
        load_dataset(path, R_MAX)


def test_species_sorted_by_atomic_number():
    frames = [ase.Atoms("OCH"), ase.Atoms("NaH")]
    assert species_from_structures(frames) == ["H", "C", "O", "Na"]


def test_split_reproducible_and_disjoint():
    a = split_indices(50, 0.2, 0.1, seed=3)
    b = split_indices(50, 0.2, 0.1, seed=3)
    c = split_indices(50, 0.2, 0.1, seed=4)
    assert a == b and a != c
    train, val, test = a
    assert (len(train), len(val), len(test)) == (35, 10, 5)
    assert sorted(train + val + test) == list(range(50))
    assert split_indices(3, 0.1, 0.0, 0)[1] != []  # a positive fraction keeps at least one structure
    with pytest.raises(DataError, match="training set would be empty"):
        split_indices(2, 0.5, 0.5, 0)


def test_graph_edges_match_ase_for_periodic_structure():
    atoms = make_frames(n=0, periodic=1, seed=5)[0]
    g = atoms_to_graph(atoms, LABEL_SPECIES, R_MAX)
    vec = (g["pos"][g["edge_index"][1]] - g["pos"][g["edge_index"][0]] + g["edge_shift"]).numpy()
    i, j, D = ase_neighbor_list("ijD", atoms, R_MAX)
    ours = sorted(zip(g["edge_index"][0].tolist(), g["edge_index"][1].tolist(), np.round(vec, 8).tolist()))
    ref = sorted(zip(i.tolist(), j.tolist(), np.round(D, 8).tolist()))
    assert len(ours) == len(ref) > 0
    assert ours == ref


def test_batched_evaluation_equals_per_structure(tmp_path):
    path = write_dataset(tmp_path / "d.extxyz", n=3, periodic=2, seed=1)
    graphs, species = load_dataset(path, R_MAX)
    torch.manual_seed(0)
    model = EquiforceModel(ModelConfig(r_max=R_MAX, channels=8, lmax=1, num_layers=2, radial_hidden=16,
                                       avg_num_neighbors=average_num_neighbors(graphs)), species).to(F64)
    model.set_scale_shift(torch.tensor([0.8, 1.2]), torch.tensor([-1.0, -3.0]))

    def run(gs):
        b = collate(gs, F64)
        e, _, f, v = energy_forces_virial(model, b["pos"], b["species"], b["edge_index"], b["edge_shift"],
                                          b["batch"], b["num_graphs"])
        return e.detach(), f.detach(), v.detach()

    order = [3, 0, 4, 1, 2]
    e_all, f_all, v_all = run([graphs[k] for k in order])
    batch = collate([graphs[k] for k in order], F64)
    assert batch["batch"].tolist() == sum(([b] * int(graphs[k]["natoms"]) for b, k in enumerate(order)), [])
    start = 0
    for b, k in enumerate(order):
        e, f, v = run([graphs[k]])
        n = int(graphs[k]["natoms"])
        assert abs(float(e_all[b] - e[0])) < 1e-12
        assert float((f_all[start:start + n] - f).abs().max()) < 1e-12
        assert float((v_all[b] - v[0]).abs().max()) < 1e-12
        # edge offsets: edges of graph b point at atoms of graph b only
        assert int(batch["edge_index"].max()) < batch["pos"].shape[0]
        start += n
    owner = batch["batch"][batch["edge_index"]]
    assert bool((owner[0] == owner[1]).all())
