"""GFN2-xTB reference data (equiforce.data.datagen): real tiny runs of tblite, checked independently.

References and tolerances:
- File format: read back with ASE's own extxyz reader (``ase.io.read``); labels must equal a fresh
  tblite single point at the stored positions to 1e-6 eV and 1e-6 eV/Å (the file stores 8 decimals).
- Forces vs central finite differences of the xTB energy, h = 1e-4 Å, every Cartesian component of
  one frame: max |F - F_fd| / max |F| < 1e-5. Measured on this machine over three frames: 2.5e-7 to
  5.5e-7 (4e-7 to 1.8e-6 eV/Å absolute) with the tight label SCF; tblite's default accuracy gives
  ~4e-5, which this test rejects.
- Periodic stress vs central finite strain differences (ASE convention, stress = (1/V) dE/dstrain),
  h = 1e-4, water in a 6 Å box: max abs error < 1e-7 eV/Å^3 (measured 4.7e-10; |stress| ~ 2e-3).
- Determinism: two runs with the same seed give byte-identical files; another seed does not.
"""
import os
import time

import ase
import numpy as np
import pytest
from ase.build import molecule
from ase.io import read

from equiforce.data import datagen
from equiforce.data.datagen import DatagenError, label_structure, make_md_dataset, split_dataset

TINY = dict(molecule="CH3CH2OH", n_frames=3, temperature_K=800.0, stride=5, equilibration_steps=10)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_md_dataset(seed=0, out=str(tmp_path_factory.mktemp("xtb") / "tiny.extxyz"), **TINY)


def xtb_energy(atoms) -> float:
    return label_structure(atoms, periodic=bool(atoms.pbc.any())).info["energy"]


def test_file_readable_by_ase_with_energy_and_forces(tiny_path):
    frames = read(tiny_path, index=":")
    assert len(frames) == TINY["n_frames"]
    ref = molecule("CH3CH2OH")
    for atoms in frames:
        assert atoms.get_chemical_symbols() == ref.get_chemical_symbols()
        assert not atoms.pbc.any()
        # ASE's reader moves the standard keys into a SinglePointCalculator
        assert set(atoms.calc.results) >= {"energy", "forces"}
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        assert np.isfinite(energy) and -320.0 < energy < -300.0  # ethanol in GFN2-xTB: about -310 eV
        assert forces.shape == (9, 3) and np.isfinite(forces).all()
    # frames are distinct MD snapshots, not copies
    assert np.abs(frames[0].positions - frames[1].positions).max() > 1e-3
    # the raw file carries the documented key names
    with open(tiny_path) as fh:
        fh.readline()
        header = fh.readline()
    assert "energy=" in header and "forces:R:3" in header


def test_labels_equal_fresh_single_point(tiny_path):
    for atoms in read(tiny_path, index=":"):
        fresh = label_structure(atoms, periodic=False)
        assert abs(fresh.info["energy"] - atoms.get_potential_energy()) < 1e-6
        assert np.abs(fresh.arrays["forces"] - atoms.get_forces()).max() < 1e-6
        # an isolated molecule feels no net force (translation invariance of xTB)
        assert np.abs(atoms.get_forces().sum(axis=0)).max() < 1e-6


def test_forces_equal_finite_differences_of_energy(tiny_path):
    atoms = read(tiny_path, index=1)
    forces = atoms.get_forces()
    h = 1e-4
    fd = np.zeros_like(forces)
    for i in range(len(atoms)):
        for d in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, d] += h
            minus.positions[i, d] -= h
            fd[i, d] = -(xtb_energy(plus) - xtb_energy(minus)) / (2 * h)
    rel = np.abs(fd - forces).max() / np.abs(forces).max()
    assert rel < 1e-5, f"xTB forces vs finite differences: relative error {rel:.2e}"


def test_periodic_stress_equals_finite_strain_differences(tmp_path):
    path = make_md_dataset(seed=0, out=str(tmp_path / "box.extxyz"), molecule="H2O", n_frames=1,
                           temperature_K=500.0, stride=2, equilibration_steps=0, box_A=6.0)
    atoms = read(path, index=0)
    assert atoms.pbc.all() and "stress" in atoms.calc.results
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    h = 1e-4
    fd = np.zeros((3, 3))
    for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]:
        energies = []
        for sign in (1.0, -1.0):
            eps = np.eye(3)  # symmetric strain: off-diagonal h/2 on both sides, so dE/dh = V stress_ab
            eps[a, b] += sign * h / (1 if a == b else 2)
            eps[b, a] += 0 if a == b else sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ eps, scale_atoms=True)
            energies.append(xtb_energy(strained))
        fd[a, b] = fd[b, a] = (energies[0] - energies[1]) / (2 * h) / volume
    assert np.abs(stress).max() > 1e-4  # a non-trivial stress
    assert np.abs(fd - stress).max() < 1e-7, f"stress vs finite strain: {np.abs(fd - stress).max():.2e}"


def test_deterministic_with_seed(tmp_path, tiny_path):
    again = make_md_dataset(seed=0, out=str(tmp_path / "again.extxyz"), **TINY)
    other = make_md_dataset(seed=1, out=str(tmp_path / "other.extxyz"), **TINY)
    with open(tiny_path, "rb") as a, open(again, "rb") as b, open(other, "rb") as c:
        first, second, third = a.read(), b.read(), c.read()
    assert first == second
    assert first != third


def test_cache_reused_and_invalidated(tmp_path):
    out = str(tmp_path / "cached.extxyz")
    params = dict(TINY, n_frames=1)
    make_md_dataset(seed=3, out=out, **params)
    mtime = os.stat(out).st_mtime_ns
    t0 = time.perf_counter()
    assert make_md_dataset(seed=3, out=out, **params) == out
    assert time.perf_counter() - t0 < 0.5
    assert os.stat(out).st_mtime_ns == mtime  # not rewritten
    make_md_dataset(seed=4, out=out, **params)  # other parameters: regenerated in place
    assert os.stat(out).st_mtime_ns != mtime
    default = make_md_dataset(seed=3, cache_dir=str(tmp_path / "cache"), **params)
    assert default.startswith(str(tmp_path / "cache")) and default.endswith(".extxyz")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_split_is_disjoint_and_complete(tmp_path, tiny_path):
    train, test = split_dataset(tiny_path, test_fraction=0.34, seed=0, out_dir=str(tmp_path))
    all_e = sorted(a.get_potential_energy() for a in read(tiny_path, index=":"))
    tr = [a.get_potential_energy() for a in read(train, index=":")]
    te = [a.get_potential_energy() for a in read(test, index=":")]
    assert len(te) == 1 and len(tr) == 2
    assert sorted(tr + te) == all_e


@pytest.mark.parametrize("kwargs, words", [
    (dict(molecule="NotAMolecule"), ["unknown molecule", "NotAMolecule"]),
    (dict(n_frames=0), ["n_frames"]),
    (dict(temperature_K=-5.0), ["temperature_K"]),
    (dict(stride=0), ["stride"]),
    (dict(molecule="CH3CH2OH", box_A=2.0), ["box_A", "larger box"]),
])
def test_bad_arguments_name_the_problem(tmp_path, kwargs, words):
    args = dict(TINY, **kwargs)
    with pytest.raises(DatagenError) as err:
        make_md_dataset(out=str(tmp_path / "x.extxyz"), **args)
    for word in words:
        assert word in str(err.value)


def test_split_rejects_bad_fraction(tiny_path):
    with pytest.raises(DatagenError, match="test_fraction"):
        split_dataset(tiny_path, test_fraction=1.5)


def test_main_cli(tmp_path, capsys):
    out = str(tmp_path / "cli.extxyz")
    rc = datagen.main(["--frames", "1", "--stride", "2", "--equilibration", "0", "--quiet", "-o", out])
    assert rc == 0 and capsys.readouterr().out.strip() == out
    assert len(read(out, index=":")) == 1
    rc = datagen.main(["--molecule", "Unobtainium", "--quiet", "-o", out])
    assert rc == 2 and "unknown molecule" in capsys.readouterr().err


def test_isolated_atom_references_and_split(tmp_path):
    """Isolated-atom frames carry the xTB single-atom energy and always land in the training file."""
    from ase.io import read, write
    from tblite.ase import TBLite

    from equiforce.data.datagen import ISOLATED_ATOM, isolated_atom_frames, split_dataset

    frames = isolated_atom_frames(["O", "H", "O"])
    assert [a.get_chemical_symbols()[0] for a in frames] == ["H", "O"]
    assert all(a.info["config_type"] == ISOLATED_ATOM for a in frames)
    for a in frames:
        ref = ase.Atoms(a.get_chemical_symbols(), positions=[[1.0, 2.0, 3.0]])
        ref.calc = TBLite(method="GFN2-xTB", verbosity=0, accuracy=datagen.LABEL_ACCURACY)
        assert abs(a.info["energy"] - ref.get_potential_energy()) < 1e-8
        assert np.all(a.arrays["forces"] == 0.0)
    mols = [ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74 + 0.01 * k]]) for k in range(6)]
    for k, m in enumerate(mols):
        m.info["energy"] = -1.0 - 0.01 * k
        m.arrays["forces"] = np.zeros((2, 3))
    path = str(tmp_path / "all.extxyz")
    write(path, mols + frames, format="extxyz")
    train, test = split_dataset(path, 0.5, seed=0)
    tr, te = read(train, index=":"), read(test, index=":")
    assert len(te) == 3 and len(tr) == 3 + 2
    assert sum(a.info.get("config_type") == ISOLATED_ATOM for a in tr) == 2
