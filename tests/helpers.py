"""Small helpers shared by the tests: random rotations and cells, finite differences, structures.

Import from a test file as ``from helpers import ...`` (pytest puts tests/ on sys.path).
"""
from typing import Callable, Sequence

import ase
import ase.io
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list as ase_neighbor_list

from equiforce.model.analytic import AnalyticMessageModel
from equiforce.model.forces import energy_forces_virial
from equiforce.o3.rotations import random_rotation  # noqa: F401  (re-exported for the tests)


def random_triclinic_cell(rng: np.random.Generator, length: float = 6.0, skew: float = 0.3) -> np.ndarray:
    """Lattice vectors as rows [3, 3] (Å): ``length * (I + skew * Gaussian)``, re-drawn until the
    cell is well conditioned (volume at least 20% of the product of the vector lengths)."""
    while True:
        cell = length * (np.eye(3) + skew * rng.normal(size=(3, 3)))
        vol = abs(np.linalg.det(cell))
        if vol > 0.2 * np.prod(np.linalg.norm(cell, axis=1)):
            return cell


def central_difference(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Gradient of the scalar ``f`` at ``x`` (any shape) by central differences, same shape as x."""
    x = np.array(x, dtype=float)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        grad[idx] = (f(xp) - f(xm)) / (2.0 * h)
    return grad


def periodic_structure(rng: np.random.Generator, symbols: Sequence[str], length: float = 6.0,
                       skew: float = 0.3, min_dist: float = 0.9) -> ase.Atoms:
    """Atoms at random positions in a random triclinic cell, no two (images included) closer than
    ``min_dist`` Å (rejection sampling), fully periodic."""
    cell = random_triclinic_cell(rng, length, skew)
    atoms = ase.Atoms(cell=cell, pbc=True)
    for sym in symbols:
        for _ in range(1000):
            trial = ase.Atoms(list(atoms.get_chemical_symbols()) + [sym],
                              positions=np.vstack([atoms.positions, rng.random(3) @ cell]), cell=cell, pbc=True)
            if len(trial) == 1 or trial.get_distances(len(trial) - 1, range(len(trial) - 1), mic=True).min() > min_dist:
                atoms = trial
                break
        else:
            raise RuntimeError("periodic_structure: could not place atoms; use a larger cell or fewer atoms")
    return atoms


def rel_err(a, b) -> float:
    """max |a - b| / max(|b|, tiny): relative error of ``a`` against the reference ``b``."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ---------------------------------------------------------------------------------------------
# labelled data sets: H/O clusters (and small periodic cells) labelled by the analytic model
# ---------------------------------------------------------------------------------------------
LABEL_SPECIES = ["H", "O"]
R_MAX = 4.0


def reference_labels(atoms: ase.Atoms, model=None):
    """(energy eV, forces [n, 3], stress [3, 3] or None) of the analytic model, with ASE's edges."""
    model = model or AnalyticMessageModel(LABEL_SPECIES, r_max=R_MAX, num_layers=2)
    i, j, S = ase_neighbor_list("ijS", atoms, model.r_max)
    species = torch.tensor([model.species_names.index(s) for s in atoms.get_chemical_symbols()])
    e, _, f, v = energy_forces_virial(
        model, torch.tensor(atoms.positions, dtype=torch.float64), species, torch.tensor(np.stack([i, j]), dtype=torch.long),
        torch.tensor(S @ atoms.cell.array, dtype=torch.float64), torch.zeros(len(atoms), dtype=torch.long), 1)
    stress = -v[0].detach().numpy() / atoms.get_volume() if atoms.pbc.all() else None
    return float(e.detach()[0]), f.detach().numpy(), stress


def make_frames(n: int = 20, seed: int = 0, periodic: int = 0):
    """``n`` distorted 5-atom H/O clusters (plus ``periodic`` small periodic H/O cells with stress),
    labelled by the analytic model; labels are attached as ASE's extxyz reader would (calculator)."""
    rng = np.random.default_rng(seed)
    base = np.array([[0, 0, 0], [2.2, 0, 0], [0, 2.2, 0], [0, 0, 2.2], [2.0, 2.0, 0.3]], float)
    frames = []
    for _ in range(n):
        frames.append(ase.Atoms("OHHOH", positions=base + rng.normal(scale=0.15, size=base.shape)))
    for _ in range(periodic):
        cell = np.diag([4.4, 4.6, 4.8]) + rng.uniform(-0.3, 0.3, size=(3, 3))
        while True:  # random positions, no pair (images included) closer than 0.9 Å
            atoms = ase.Atoms("OHHO", scaled_positions=rng.uniform(size=(4, 3)), cell=cell, pbc=True)
            if ase_neighbor_list("d", atoms, 0.9).size == 0:
                break
        frames.append(atoms)
    for atoms in frames:
        e, f, s = reference_labels(atoms)
        results = {"energy": e, "forces": f}
        if s is not None:
            results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        atoms.calc = SinglePointCalculator(atoms, **results)
    return frames


def write_dataset(path, n: int = 20, seed: int = 0, periodic: int = 0) -> str:
    ase.io.write(str(path), make_frames(n, seed, periodic), format="extxyz")
    return str(path)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def make_model(species: Sequence[str], seed: int = 0, dtype=torch.float64, scale=None, shift=None,
               dipole_scale=None, **settings):
    """The one model factory of the tests: a seeded ``EquiforceModel(ModelConfig(**settings), species)``
    in ``dtype``, with per-species ``scale`` / ``shift`` (eV; lists) and the dipole scale set when given.
    Test modules keep their defaults in a dict and call this with them."""
    from equiforce.model.network import EquiforceModel, ModelConfig

    torch.manual_seed(seed)
    model = EquiforceModel(ModelConfig(**settings), list(species)).to(dtype)
    with torch.no_grad():
        if scale is not None or shift is not None:
            n = len(species)
            model.set_scale_shift(torch.tensor(scale if scale is not None else [1.0] * n),
                                  torch.tensor(shift if shift is not None else [0.0] * n))
        if dipole_scale is not None and model.has_dipole:
            model.set_dipole_scale(dipole_scale)
    return model


# settings of the small model the per-layer (LAMMPS `path exchange`) tests step through
LAYERED_MODEL = dict(r_max=3.5, channels=6, lmax=2, num_layers=3, num_bessel=6, radial_hidden=12,
                     avg_num_neighbors=12.0)


def layered_model(seed: int = 0, **kw):
    """float64 Si/C EquiforceModel (LAYERED_MODEL settings, overridden by ``kw``) with scale/shift set."""
    return make_model(["Si", "C"], seed, scale=[1.5, 0.7], shift=[-3.0, -1.0], **{**LAYERED_MODEL, **kw})


def step_layers(module, meta, species, edge_index, edge_vec, n_local):
    """Energy of the first n_local atoms, and dE/d edge_vec, stepping layer by layer with autograd
    (each layer's input a fresh leaf, gradients chained backwards by hand as LAMMPS does)."""
    x = module.embed(species)
    n = species.shape[0]
    ev = edge_vec.detach().requires_grad_(True)
    pairs = []
    for k in range(meta["num_layers"]):
        xin = x.detach().requires_grad_(True)
        out = module.layer(k, xin, species, edge_index, ev, n)
        pairs.append((xin, out))
        x = out
    xl = x.detach().requires_grad_(True)
    ea = module.readout(xl, species)
    energy = ea[:n_local].sum()
    g, = torch.autograd.grad(energy, xl)
    g_ev = torch.zeros_like(ev)
    for xin, out in reversed(pairs):
        gx, gv = torch.autograd.grad(out, [xin, ev], g, allow_unused=True)
        g_ev = g_ev + (gv if gv is not None else 0.0)
        g = gx
    return energy.detach(), ea.detach(), g_ev


def write_water_without_extra_labels(path: str, n: int = 4) -> str:
    """``n`` water molecules (energy -1 eV, zero forces, nothing else: no dipole or polarizability
    label) written as extxyz to ``path``; returns the path (for the "head without labels" refusals)."""
    frames = []
    for k in range(n):
        a = ase.Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93 + 0.01 * k, 0]])
        a.info["energy"] = -1.0
        a.arrays["forces"] = np.zeros((3, 3))
        frames.append(a)
    ase.io.write(str(path), frames, format="extxyz")
    return str(path)
