"""EquiforceCalculator on an exported analytic model, against independent references.

The reference energy is a numpy re-implementation of AnalyticMessageModel's closed form over
ASE's own neighbour list; forces and stress are checked against central finite differences of the
calculator's energy (float64 model, relative error < 1e-6).
"""
import ase
import numpy as np
import pytest
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.neighborlist import neighbor_list as ase_neighbor_list

from equiforce.model.analytic import AnalyticMessageModel
from equiforce.ase import EquiforceCalculator
from equiforce.deploy.export import ModelFileError, export_model
from helpers import central_difference, periodic_structure, random_rotation, rel_err

SPECIES = ["H", "C", "O"]
R_MAX = 3.5
LAYERS = 3
# AnalyticMessageModel parameters used below (passed explicitly, so the reference does not rely on defaults)
PARAMS = dict(depth=0.3, a=1.6, r0=2.2, coupling=1e-3)


def reference_energies(atoms: ase.Atoms) -> np.ndarray:
    """Per-atom energies of AnalyticMessageModel (eV), written from its docstring formula in numpy:
    E_i = 1/2 sum_j D_ij [(1 - exp(-a (r_ij - r0)))^2 - 1] fc(r_ij) + c (h_i^L)^2,
    h^0_i = w[s_i], h^{t+1}_i = sum_j fc(r_ij) h^t_j, D_ij = sqrt(d[s_i] d[s_j]),
    d[k] = depth (1 + k/4), w[k] = 1 + k/2, fc the p = 6 polynomial envelope."""
    n = len(atoms)
    s = np.array([SPECIES.index(x) for x in atoms.get_chemical_symbols()])
    i, j, r = ase_neighbor_list("ijd", atoms, R_MAX)
    x = r / R_MAX
    p = 6
    fc = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    depth = PARAMS["depth"] * (1 + 0.25 * np.arange(len(SPECIES)))
    weight = 1 + 0.5 * np.arange(len(SPECIES))
    d_ij = np.sqrt(depth[s[i]] * depth[s[j]])
    morse = d_ij * ((1 - np.exp(-PARAMS["a"] * (r - PARAMS["r0"]))) ** 2 - 1) * fc
    e = 0.5 * np.bincount(i, morse, minlength=n)
    h = weight[s]
    for _ in range(LAYERS - 1):
        h = np.bincount(i, fc * h[j], minlength=n)
    return e + PARAMS["coupling"] * h * h


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    out = {}
    for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        path = str(tmp_path_factory.mktemp("model") / f"analytic_{name}.pt")
        export_model(AnalyticMessageModel(SPECIES, r_max=R_MAX, num_layers=LAYERS, **PARAMS), path, dtype=dtype)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def calc(model_files):
    return EquiforceCalculator(model_files["f64"])


def crystal(seed=0, n=8):
    rng = np.random.default_rng(seed)
    symbols = [SPECIES[k % 3] for k in range(n)]
    return periodic_structure(rng, symbols, length=5.0, skew=0.25, min_dist=1.0)


def molecule(seed=1, n=9):
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n, 3)) * 1.3
    return ase.Atoms([SPECIES[k % 3] for k in range(n)], positions=pos)


def energy_of(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy()


def test_metadata_read_from_file(calc):
    assert calc.species == SPECIES and calc.r_max == R_MAX and calc.dtype == torch.float64


@pytest.mark.parametrize("make", [crystal, molecule])
def test_energy_matches_numpy_reference(calc, make):
    atoms = make()
    atoms.calc = calc
    ref = reference_energies(atoms)
    assert abs(ref).max() > 1e-3  # the structure has interactions
    e = atoms.get_potential_energy()
    assert rel_err(e, ref.sum()) < 1e-12
    assert rel_err(atoms.get_potential_energies(), ref) < 1e-12
    assert atoms.get_potential_energy(force_consistent=True) == e  # free_energy
    assert abs(atoms.get_potential_energies().sum() - e) < 1e-12 * max(1.0, abs(e))


def test_mixed_pbc_and_rotation(calc):
    atoms = crystal(seed=4)
    atoms.pbc = [True, False, True]
    atoms.calc = calc
    assert rel_err(atoms.get_potential_energy(), reference_energies(atoms).sum()) < 1e-12
    # a rotated copy (cell and positions) has the same energy and rotated forces
    rot = random_rotation(np.random.default_rng(0))
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rot.T
    rotated.calc = calc
    assert rel_err(rotated.get_potential_energy(), atoms.get_potential_energy()) < 1e-12
    assert rel_err(rotated.get_forces(), atoms.get_forces() @ rot.T) < 1e-10


@pytest.mark.parametrize("make", [crystal, molecule])
def test_forces_are_finite_differences(calc, make):
    atoms = make()
    atoms.calc = calc
    forces = atoms.get_forces()

    def energy(flat_pos):
        trial = atoms.copy()
        trial.positions = flat_pos
        return energy_of(calc, trial)

    fd = -central_difference(energy, atoms.positions, h=1e-5)
    assert np.abs(forces).max() > 1e-2
    assert rel_err(forces, fd) < 1e-6


def test_stress_is_finite_strain_difference(calc):
    atoms = crystal(seed=2)
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()

    def energy(strain):
        trial = atoms.copy()
        deform = np.eye(3) + strain
        trial.set_cell(atoms.cell.array @ deform, scale_atoms=False)
        trial.positions = atoms.positions @ deform
        return energy_of(calc, trial)

    fd = central_difference(energy, np.zeros((3, 3)), h=1e-5) / volume
    assert np.abs(stress).max() > 1e-4
    assert rel_err(stress, fd) < 1e-6
    assert atoms.get_stress().shape == (6,)


def test_atoms_outside_cell(calc):
    """Moving atoms by lattice vectors (unwrapped input) changes nothing."""
    atoms = crystal(seed=5)
    atoms.calc = calc
    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    moved = atoms.copy()
    steps = np.random.default_rng(0).integers(-3, 4, size=(len(atoms), 3))
    moved.positions += steps @ atoms.cell.array
    moved.calc = calc
    assert rel_err(moved.get_potential_energy(), e) < 1e-12
    assert rel_err(moved.get_forces(), f) < 1e-10
    assert rel_err(moved.get_stress(), s) < 1e-10


def test_periodic_without_cell_is_an_error(calc):
    atoms = molecule()
    atoms.pbc = True  # but the cell is all zeros
    atoms.calc = calc
    with pytest.raises(ValueError, match="zero length"):
        atoms.get_potential_energy()


def test_stress_needs_full_pbc(calc):
    atoms = molecule()
    atoms.calc = calc
    with pytest.raises(PropertyNotImplementedError, match="fully periodic"):
        atoms.get_stress()


def test_float32_model_close_to_reference(model_files):
    calc32 = EquiforceCalculator(model_files["f32"])
    assert calc32.dtype == torch.float32
    atoms = crystal(seed=3)
    atoms.calc = calc32
    assert rel_err(atoms.get_potential_energy(), reference_energies(atoms).sum()) < 1e-5


def test_unknown_element_is_named(calc):
    atoms = molecule()
    atoms.symbols[4] = "Fe"
    atoms.calc = calc
    with pytest.raises(ValueError, match=r"Fe.*atom index 4.*\['H', 'C', 'O'\]"):
        atoms.get_potential_energy()


def test_bad_model_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        EquiforceCalculator(str(tmp_path / "missing.pt"))
    other = str(tmp_path / "linear.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), other)
    with pytest.raises(ModelFileError, match="not an equiforce export"):
        EquiforceCalculator(other)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(ModelFileError, match="not a TorchScript file"):
        EquiforceCalculator(str(junk))
