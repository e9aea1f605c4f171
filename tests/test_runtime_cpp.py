"""The C++ model runtime (equiforce._runtime, the engine of the LAMMPS pair style) against the
Python exported module on identical inputs, plus its metadata checks and error messages."""
import json

import numpy as np
import pytest
import torch
from ase.neighborlist import primitive_neighbor_list

from equiforce import FORMAT_VERSION
from equiforce.model.analytic import AnalyticMessageModel
from equiforce.deploy.export import METADATA_FILE, export_model, load_exported

from equiforce import _runtime  # noqa: E402  (compiled module: pip install --no-build-isolation -e .)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("runtime")
    paths = {}
    for dtype, name in ((torch.float64, "f64"), (torch.float32, "f32")):
        m = AnalyticMessageModel(["H", "C", "O"], r_max=3.5, num_layers=3)
        paths[name] = str(d / f"model_{name}.pt")
        export_model(m, paths[name], dtype=dtype)
    return paths


def periodic_structure(seed=0, n=24):
    rng = np.random.default_rng(seed)
    cell = np.array([[6.0, 0.0, 0.0], [0.7, 5.5, 0.0], [-0.4, 0.9, 6.3]])
    pos = rng.random((n, 3)) @ cell
    species = rng.integers(0, 3, n)
    i, j, S = primitive_neighbor_list("ijS", [True] * 3, cell, pos, 3.5, self_interaction=False)
    return pos, species, np.stack([i, j]), S @ cell, cell


def python_eval(path, pos, species, ei, shift, cell, n_local):
    module, _ = load_exported(path)
    dt = torch.float64 if "f64" in path else torch.float32
    out = module(torch.tensor(pos, dtype=dt), torch.tensor(species), torch.tensor(ei),
                 torch.tensor(shift, dtype=dt), torch.tensor(cell, dtype=dt), n_local)
    return [float(out[0])] + [t.double().numpy() for t in out[1:]]


def test_metadata_matches_python(model_files):
    rt = _runtime.Model(model_files["f64"])
    _, meta = load_exported(model_files["f64"])
    md = rt.metadata
    assert md["species"] == meta["species"] == ["H", "C", "O"]
    assert md["r_max"] == meta["r_max"] == 3.5
    assert md["num_layers"] == 3 and md["receptive_field"] == pytest.approx(10.5)
    assert md["format_version"] == FORMAT_VERSION and md["dtype"] == "float64"
    assert rt.species_index("O") == 2 and rt.species_index("Xx") == -1
    assert rt.device == "cpu"


@pytest.mark.parametrize("n_local", [24, 10, 0])
def test_periodic_float64_matches_python(model_files, n_local):
    pos, species, ei, shift, cell = periodic_structure()
    assert ei.shape[1] > 100  # a real multi-neighbour structure
    ref = python_eval(model_files["f64"], pos, species, ei, shift, cell, n_local)
    got = _runtime.Model(model_files["f64"]).compute(pos, species, ei, shift, cell, n_local)
    assert abs(got[0] - ref[0]) < 1e-12 * max(1.0, abs(ref[0]))
    for k in (1, 2, 3):
        assert got[k].shape == ref[k].shape
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-12)
    # energy counts the first n_local atoms only
    assert got[0] == pytest.approx(got[1][:n_local].sum(), abs=1e-12)


def test_ghost_images_reproduce_periodic_energy(model_files):
    """Explicit image atoms with zero shifts (what LAMMPS passes) give the periodic energy and,
    summed back onto their owners, the periodic forces; the virial is unchanged."""
    pos, species, ei, shift, cell = periodic_structure(seed=3, n=12)
    rt = _runtime.Model(model_files["f64"])
    e_p, ea_p, f_p, w_p = rt.compute(pos, species, ei, shift, cell)
    # images within 3 cells in every direction (receptive field 10.5 Å > 3 layers of cutoff)
    reps = [(a, b, c) for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)]
    reps.sort(key=lambda r: r != (0, 0, 0))  # originals (local atoms) first
    owner = np.concatenate([np.arange(len(pos))] * len(reps))
    big = np.concatenate([pos + np.array(r) @ cell for r in reps])
    sp = species[owner]
    big = big - big.min(0) + 1.0  # a uniform translation changes nothing; keeps ASE's bins small
    i, j = primitive_neighbor_list("ij", [False] * 3, np.diag(big.max(0) + 2.0), big, 3.5,
                                   self_interaction=False)
    e, ea, f, w = rt.compute(big, sp, np.stack([i, j]), None, None, len(pos))
    assert e == pytest.approx(e_p, abs=1e-11)
    np.testing.assert_allclose(ea[: len(pos)], ea_p, atol=1e-12)
    folded = np.zeros_like(f_p)
    np.add.at(folded, owner, f)
    np.testing.assert_allclose(folded, f_p, atol=1e-11)
    np.testing.assert_allclose(w, w_p, atol=1e-10)


def test_float32_model_matches_python(model_files):
    pos, species, ei, shift, cell = periodic_structure(seed=1)
    ref = python_eval(model_files["f32"], pos, species, ei, shift, cell, len(pos))
    got = _runtime.Model(model_files["f32"]).compute(pos, species, ei, shift, cell)
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    np.testing.assert_allclose(got[2], ref[2], atol=1e-5)


def test_no_edges_gives_zero_forces(model_files):
    pos = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    species = np.array([0, 2])
    e, ea, f, w = _runtime.Model(model_files["f64"]).compute(pos, species, np.zeros((2, 0), dtype=np.int64))
    assert np.all(f == 0) and np.all(w == 0)
    # isolated atom: only the message term c*h^2 with h = 0 after one message round -> 0
    ref = python_eval(model_files["f64"], pos, species, np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3)),
                      np.zeros((3, 3)), 2)
    assert e == pytest.approx(ref[0], abs=1e-15)


def test_repeated_calls_with_changing_sizes_are_stable(model_files):
    rt = _runtime.Model(model_files["f64"])
    results = []
    for n in (24, 9, 24, 17, 24):
        pos, species, ei, shift, cell = periodic_structure(seed=5, n=n)
        results.append(rt.compute(pos, species, ei, shift, cell)[0])
    assert results[0] == results[2] == results[4]


# ---- errors ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(_runtime.ModelError, match="does not exist"):
        _runtime.Model(str(tmp_path / "nope.pt"))


def test_corrupt_file(tmp_path):
    p = tmp_path / "corrupt.pt"
    p.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(_runtime.ModelError, match="not a TorchScript file"):
        _runtime.Model(str(p))


def test_torchscript_without_metadata(tmp_path):
    p = str(tmp_path / "plain.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p)
    with pytest.raises(_runtime.ModelError, match="not an equiforce export"):
        _runtime.Model(p)


def test_unsupported_format_version(model_files, tmp_path):
    module, meta = load_exported(model_files["f64"])
    meta["format_version"] = FORMAT_VERSION + 98
    p = str(tmp_path / "future.pt")
    torch.jit.save(module, p, _extra_files={METADATA_FILE: json.dumps(meta)})
    with pytest.raises(_runtime.ModelError, match=f"format_version {FORMAT_VERSION + 98}.*re-export"):
        _runtime.Model(p)


def test_cuda_request(model_files):
    if torch.cuda.is_available():
        assert _runtime.Model(model_files["f64"], "cuda").device.startswith("cuda")
        with pytest.raises(_runtime.ModelError, match="does not exist"):
            _runtime.select_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(_runtime.ModelError, match="no CUDA GPU"):
            _runtime.Model(model_files["f64"], "cuda")
        assert _runtime.select_device("auto") == "cpu"
    with pytest.raises(_runtime.ModelError, match="unknown device"):
        _runtime.select_device("tpu")


def test_bad_edge_index(model_files):
    rt = _runtime.Model(model_files["f64"])
    with pytest.raises(_runtime.ModelError, match="edge_index refers to atom 5"):
        rt.compute(np.zeros((2, 3)), np.array([0, 1]), np.array([[0], [5]]))
    with pytest.raises(_runtime.ModelError, match="species index out of range"):
        rt.compute(np.zeros((2, 3)), np.array([0, 7]), np.zeros((2, 0), dtype=np.int64))
