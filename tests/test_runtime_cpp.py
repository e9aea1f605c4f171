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


# ---- metadata read by nlohmann/json: every bad or missing key named --------------------------------

class _Plain(torch.nn.Module):
    """An exported module wrapped with no top-level ``equiforce_metadata`` attribute (a file as
    exported before the tamper check), whether or not export_model sets one on the inner module."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, pos: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor, edge_shift: torch.Tensor,
                cell: torch.Tensor, n_local: int):
        return self.inner(pos, species, edge_index, edge_shift, cell, n_local)


def _resave(model_files, tmp_path, name, text):
    """The float64 model, without the tamper-check attribute, saved with ``text`` as its metadata."""
    module, _ = load_exported(model_files["f64"])
    p = str(tmp_path / name)
    torch.jit.save(torch.jit.script(_Plain(module)), p, _extra_files={METADATA_FILE: text})
    return p


@pytest.mark.parametrize("key", ["format_version", "species", "r_max", "num_layers", "receptive_field", "dtype"])
def test_metadata_missing_key(model_files, tmp_path, key):
    _, meta = load_exported(model_files["f64"])
    del meta[key]
    p = _resave(model_files, tmp_path, f"no_{key}.pt", json.dumps(meta))
    with pytest.raises(_runtime.ModelError, match=f"metadata has no '{key}'; re-export the model with `equiforce export`"):
        _runtime.Model(p)


@pytest.mark.parametrize("key, value, expected", [
    ("r_max", "3.5", "a number"), ("species", "HCO", "a list of element names"), ("dtype", 64, "a string"),
    ("num_layers", None, "a number"), ("format_version", [1], "a number")])
def test_metadata_wrong_type(model_files, tmp_path, key, value, expected):
    _, meta = load_exported(model_files["f64"])
    meta[key] = value
    p = _resave(model_files, tmp_path, f"bad_{key}.pt", json.dumps(meta))
    with pytest.raises(_runtime.ModelError, match=f"metadata key '{key}' has the wrong type \\(expected {expected}"):
        _runtime.Model(p)


def test_metadata_bad_values(model_files, tmp_path):
    _, meta = load_exported(model_files["f64"])
    cases = [({"species": ["H", 6, "O"]}, "species must be strings"), ({"species": []}, "lists no species"),
             ({"dtype": "float16"}, "unsupported dtype 'float16'"), ({"r_max": -1.0}, "inconsistent metadata"),
             ({"receptive_field": 1.0}, "inconsistent metadata")]
    for k, (change, message) in enumerate(cases):
        p = _resave(model_files, tmp_path, f"value_{k}.pt", json.dumps({**meta, **change}))
        with pytest.raises(_runtime.ModelError, match=message):
            _runtime.Model(p)


def test_metadata_not_json(model_files, tmp_path):
    _, meta = load_exported(model_files["f64"])
    text = json.dumps(meta)
    for k, bad in enumerate([text[:-1], text + " x", "[1, 2]", "{'species': ['H']}"]):
        p = _resave(model_files, tmp_path, f"notjson_{k}.pt", bad)
        with pytest.raises(_runtime.ModelError, match="metadata is not (valid JSON|a JSON object)"):
            _runtime.Model(p)


def test_metadata_unicode_and_extra_keys(model_files, tmp_path):
    """Keys the runtime does not read, unicode escapes and nesting do not disturb the ones it does."""
    _, meta = load_exported(model_files["f64"])
    meta = {**meta, "note": "r\u00e9f\u00e9rence \\ \"quoted\"", "nested": {"a": [1, {"b": None}], "r_max": 99}}
    p = _resave(model_files, tmp_path, "extra.pt", json.dumps(meta, ensure_ascii=True))
    md = _runtime.Model(p).metadata
    assert md["species"] == ["H", "C", "O"] and md["r_max"] == 3.5 and md["num_layers"] == 3


# ---- metadata tamper check (contract: export.py's `equiforce_metadata` attribute) ----------------------

class _WithMetadataAttribute(torch.nn.Module):
    """An exported module wrapped with the top-level str attribute ``equiforce_metadata`` (built here,
    independently of export_model, so this tests the C++ side of the contract alone)."""

    def __init__(self, inner, text):
        super().__init__()
        self.inner = inner
        self.equiforce_metadata = text

    def forward(self, pos: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor, edge_shift: torch.Tensor,
                cell: torch.Tensor, n_local: int):
        return self.inner(pos, species, edge_index, edge_shift, cell, n_local)


def _with_attribute(model_files, tmp_path, name, attribute_text, file_text):
    module, _ = load_exported(model_files["f64"])
    p = str(tmp_path / name)
    torch.jit.save(torch.jit.script(_WithMetadataAttribute(module, attribute_text)), p,
                   _extra_files={METADATA_FILE: file_text})
    return p


def test_metadata_attribute_matching_loads_and_computes(model_files, tmp_path):
    _, meta = load_exported(model_files["f64"])
    text = json.dumps(meta)
    p = _with_attribute(model_files, tmp_path, "signed.pt", text, text)
    pos, species, ei, shift, cell = periodic_structure()
    got = _runtime.Model(p).compute(pos, species, ei, shift, cell)
    ref = _runtime.Model(model_files["f64"]).compute(pos, species, ei, shift, cell)
    assert got[0] == ref[0]
    np.testing.assert_array_equal(got[2], ref[2])


@pytest.mark.parametrize("change", [{"species": ["O", "C", "H"]}, {"r_max": 3.0, "receptive_field": 9.0},
                                    {"note": "only a key added"}])
def test_metadata_changed_after_export_is_refused(model_files, tmp_path, change):
    _, meta = load_exported(model_files["f64"])
    p = _with_attribute(model_files, tmp_path, "tampered.pt", json.dumps(meta), json.dumps({**meta, **change}))
    with pytest.raises(_runtime.ModelError) as err:
        _runtime.Model(p)
    assert str(err.value) == (f"metadata of '{p}' was changed after export (species / r_max / ... no longer match "
                              "the model); re-export it with `equiforce export`")


def test_metadata_whitespace_change_is_refused(model_files, tmp_path):
    """The comparison is on the exact text (the contract), not on the parsed values."""
    _, meta = load_exported(model_files["f64"])
    p = _with_attribute(model_files, tmp_path, "spaced.pt", json.dumps(meta), json.dumps(meta, indent=1))
    with pytest.raises(_runtime.ModelError, match="was changed after export"):
        _runtime.Model(p)


def test_file_without_attribute_still_loads(model_files, tmp_path):
    """Files exported before the check (no top-level ``equiforce_metadata``) load unchecked."""
    _, meta = load_exported(model_files["f64"])
    p = _resave(model_files, tmp_path, "old.pt", json.dumps(meta, indent=2))
    assert not torch.jit.load(p)._c.hasattr("equiforce_metadata")
    rt = _runtime.Model(p)
    assert rt.metadata["species"] == ["H", "C", "O"]
    pos, species, ei, shift, cell = periodic_structure()
    ref = _runtime.Model(model_files["f64"]).compute(pos, species, ei, shift, cell)
    assert rt.compute(pos, species, ei, shift, cell)[0] == ref[0]


# ---- float32 far from the origin ---------------------------------------------------------------------

@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_float32_far_from_origin(model_files, offset):
    """Positions are taken relative to their mean in float64 before the cast to float32: a structure
    translated by ``offset`` Å gives the forces of the untranslated one within 1e-4 relative (without
    the centring, float32 coordinates near 1e6 Å carry errors of ~0.06 Å)."""
    pos, species, ei, shift, cell = periodic_structure(seed=2)
    rt = _runtime.Model(model_files["f32"])
    e0, ea0, f0, w0 = rt.compute(pos, species, ei, shift, cell)
    e1, ea1, f1, w1 = rt.compute(pos + np.array([offset, -0.7 * offset, 0.3 * offset]), species, ei, shift, cell)
    scale = np.abs(f0).max()
    assert scale > 0.1  # real forces
    assert np.abs(f1 - f0).max() < 1e-4 * scale
    assert abs(e1 - e0) < 1e-6 * max(1.0, abs(e0))
    np.testing.assert_allclose(w1, w0, rtol=0, atol=1e-4 * np.abs(w0).max())
    # and the float32 result is the float64 model's within float32 precision
    ref = _runtime.Model(model_files["f64"]).compute(pos, species, ei, shift, cell)
    assert np.abs(f1 - ref[2]).max() < 1e-4 * scale
