"""Small helpers shared by the tests: random rotations and cells, finite differences, structures.

Import from a test file as ``from helpers import ...`` (pytest puts tests/ on sys.path).
"""
from typing import Callable, Sequence

import ase
import numpy as np

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
