"""Per-layer entry points of exported files (``embed`` / ``layer`` / ``readout``,
:class:`equiforce.deploy.export.LayerEntryPoints`) and the C++ stepper behind LAMMPS'
``path exchange`` (cpp/equiforce_layers.h, through ``equiforce._runtime.LayerStepper``).

References: the exported file's own one-call ``forward`` (itself checked against the PyTorch
path, e3nn and LAMMPS elsewhere), float64. Tolerances: energy, forces and virial 1e-12 relative
to the largest value (the same arithmetic in a different order).
"""
import json

import numpy as np
import pytest
import torch

from equiforce.data.neighbors import neighbor_list
from equiforce.deploy.export import METADATA_FILE, export_model, load_exported
from equiforce.model.forces import forces_virial_from_edge_grad
from helpers import layered_model as make_model, step_layers as stepped

F64 = torch.float64
SPECIES = ["Si", "C"]
REL = 1e-12


def periodic_structure(seed=1, n=24):
    rng = np.random.default_rng(seed)
    cell = torch.tensor([[6.1, 0.0, 0.0], [0.6, 6.3, 0.0], [-0.4, 0.5, 6.6]], dtype=F64)
    pos = torch.tensor(rng.random((n, 3)), dtype=F64) @ cell
    species = torch.tensor(rng.integers(0, 2, n), dtype=torch.long)
    return pos, species, cell


@pytest.fixture(scope="module", params=["fused", "portable"])
def exported(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("exchange") / f"model_{request.param}.pt")
    model = make_model().for_export(fused=request.param == "fused")
    export_model(model, path, dtype=F64, symmetry="O3")
    module, meta = load_exported(path)
    return path, module, meta


def test_metadata_describes_the_entry_points(exported):
    _, module, meta = exported
    assert meta["exchange"] is True
    assert meta["layer_dims"] == [6, 6 * (1 + 3 + 5), 6 * (1 + 3 + 5), 6]
    assert set(meta["methods"]) >= {"embed", "layer", "readout"}
    x = module.embed(torch.tensor([0, 1, 1]))
    assert tuple(x.shape) == (3, meta["layer_dims"][0])


def test_layer_by_layer_equals_forward(exported):
    _, module, meta = exported
    pos, species, cell = periodic_structure()
    idx, shift, _ = neighbor_list(pos, meta["r_max"], cell, torch.tensor([True] * 3))
    edge_shift = shift @ cell
    n = len(pos)
    e_ref, ea_ref, f_ref, w_ref = module(pos, species, idx, edge_shift, cell, n)
    ev = pos[idx[1]] - pos[idx[0]] + edge_shift
    energy, ea, g = stepped(module, meta, species, idx, ev, n)
    f, w = forces_virial_from_edge_grad(g, ev, idx, n, torch.zeros(idx.shape[1], dtype=torch.long), 1)
    assert abs(float(energy - e_ref)) <= REL * abs(float(e_ref))
    assert float((ea - ea_ref).abs().max()) <= REL * float(ea_ref.abs().max())
    assert float((f - f_ref).abs().max()) <= REL * float(f_ref.abs().max())
    assert float((w[0] - w_ref).abs().max()) <= REL * float(w_ref.abs().max())


def test_layer_rows_need_only_their_incoming_edges(exported):
    """Rows < n_update of a layer are exact with only the edges into those atoms (the other rows
    only send messages), fused and portable alike."""
    _, module, meta = exported
    pos, species, cell = periodic_structure(seed=4)
    idx, shift, _ = neighbor_list(pos, meta["r_max"], cell, torch.tensor([True] * 3))
    ev = pos[idx[1]] - pos[idx[0]] + shift @ cell
    x = module.embed(species).to(F64)
    full = module.layer(0, x, species, idx, ev, len(pos))
    keep = idx[0] < 10
    part = module.layer(0, x, species, idx[:, keep], ev[keep], 10)
    assert part.shape == (10, meta["layer_dims"][1])
    assert float((part - full[:10]).abs().max()) <= REL * float(full.abs().max())


def test_layer_index_out_of_range_is_a_clear_error(exported):
    _, module, meta = exported
    species = torch.tensor([0, 1])
    x = module.embed(species)
    with pytest.raises(Exception, match=r"layer index 3 outside \[0, 3\)"):
        module.layer(3, x, species, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=F64), 2)


@pytest.mark.parametrize("kind", ["direct_forces", "long_range"])
def test_direct_force_and_long_range_files_have_no_entry_points(tmp_path, kind):
    kw = {"direct_forces": True} if kind == "direct_forces" else {"long_range": "ewald"}
    model = make_model(num_layers=2, lmax=1, **kw).for_export(fused=False)
    path = str(tmp_path / "m.pt")
    export_model(model, path, dtype=F64, symmetry="O3")
    module, meta = load_exported(path)
    assert meta["exchange"] is False and "layer_dims" not in meta
    assert not hasattr(module, "layer")


# ---- the C++ stepper (equiforce._runtime.LayerStepper), ghosts as copies of local rows ------------

def images_as_ghosts(pos, cell, pbc, r_max):
    """Edges with a local receiver and explicit ghost rows for periodic images: (pos_all [n_all, 3],
    edge_index [2, E] into pos_all, owner [n_all - n], images-form (i, j, shift) of the same edges)."""
    from ase.neighborlist import primitive_neighbor_list

    i, j, S = primitive_neighbor_list("ijS", pbc, cell, pos, r_max, self_interaction=False)
    n = len(pos)
    ghost_row, extra, owner = {}, [], []
    col = np.empty(len(i), dtype=np.int64)
    for e, (jj, s) in enumerate(zip(j, map(tuple, S))):
        if s == (0, 0, 0):
            col[e] = jj
            continue
        key = (int(jj), s)
        if key not in ghost_row:
            ghost_row[key] = n + len(extra)
            extra.append(pos[jj] + np.array(s) @ cell)
            owner.append(int(jj))
        col[e] = ghost_row[key]
    pos_all = np.vstack([pos] + ([np.array(extra)] if extra else []))
    return pos_all, np.stack([i, col]), np.array(owner, dtype=np.int64), (i, j, S @ cell)


@pytest.fixture(scope="module")
def runtime():
    from equiforce import _runtime

    return _runtime


def test_cpp_stepper_equals_forward(exported, runtime):
    path, module, meta = exported
    pos, species, cell = periodic_structure(seed=2)
    n = len(pos)
    pos_all, ei, owner, (i, j, shift) = images_as_ghosts(pos.numpy(), cell.numpy(), [True] * 3, meta["r_max"])
    species_all = np.concatenate([species.numpy(), species.numpy()[owner]])
    stepper = runtime.LayerStepper(runtime.Model(path))
    assert list(stepper.layer_dims) == meta["layer_dims"] and stepper.widest == max(meta["layer_dims"][1:-1])
    energy, atom_energy, g, n_fwd, n_rev = stepper.compute(pos_all, species_all, ei, n, owner)
    assert (n_fwd, n_rev) == (meta["num_layers"] - 1,) * 2
    e_ref, ea_ref, f_ref, w_ref = module(pos, species, torch.tensor(np.stack([i, j])), torch.tensor(shift), cell, n)
    f = np.zeros((n, 3))
    owner_all = np.concatenate([np.arange(n), owner])
    np.add.at(f, ei[0], g)
    np.add.at(f, owner_all[ei[1]], -g)
    r = pos_all[ei[1]] - pos_all[ei[0]]
    w = -(r[:, :, None] * g[:, None, :]).sum(0)
    assert abs(energy - float(e_ref)) <= REL * abs(float(e_ref))
    assert np.abs(atom_energy - ea_ref.numpy()).max() <= REL * np.abs(ea_ref.numpy()).max()
    assert np.abs(f - f_ref.numpy()).max() <= REL * np.abs(f_ref.numpy()).max()
    assert np.abs(w - w_ref.numpy()).max() <= REL * np.abs(w_ref.numpy()).max()


def test_cpp_stepper_without_local_atoms_still_exchanges(exported, runtime):
    """A rank that owns no atoms makes the same L-1 + L-1 exchanges (so no partner waits)."""
    path, _, meta = exported
    stepper = runtime.LayerStepper(runtime.Model(path))
    energy, ea, g, n_fwd, n_rev = stepper.compute(np.zeros((0, 3)), np.zeros(0, dtype=np.int64),
                                                  np.zeros((2, 0), dtype=np.int64), 0, np.zeros(0, dtype=np.int64))
    assert energy == 0.0 and ea.shape == (0,) and g.shape == (0, 3)
    assert (n_fwd, n_rev) == (meta["num_layers"] - 1,) * 2


def test_cpp_stepper_refuses_a_file_without_entry_points(tmp_path, runtime):
    from equiforce.model.analytic import AnalyticMessageModel

    path = str(tmp_path / "analytic.pt")
    export_model(AnalyticMessageModel(SPECIES, r_max=3.0, num_layers=2), path, dtype=F64)
    with pytest.raises(ValueError, match=r"cannot be evaluated layer by layer: it has no per-layer entry points"):
        runtime.LayerStepper(runtime.Model(path))
