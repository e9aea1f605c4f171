"""Symmetry audit of any exported model file (``equiforce check model.pt``).

Runs the exported TorchScript module on random structures made of the model's own species and
checks, with the worst error of each:

* rotation: energy invariant, forces and virial rotate with the structure;
* reflection: energy invariant (O(3) models only; SE(3) models may tell mirror images apart);
* translation and permutation of atoms: energy invariant, forces follow;
* periodic images: moving an atom by a lattice vector changes nothing;
* conservative forces: forces equal finite differences of the energy along random displacements;
* polarizability (files with that head): ``alpha(R x + t) = R alpha(x) R^T`` for rotations and
  translations, and for reflections too in O(3) models (a true tensor).

A model that breaks a symmetry (a bug, or a hand-made module) fails the corresponding line.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..o3.rotations import random_rotation
from .runner import ExportedRunner


@dataclass
class CheckResult:
    name: str
    worst: float          # worst relative error found
    tolerance: float
    applicable: bool = True
    note: str = ""

    @property
    def passed(self) -> bool:
        return (not self.applicable) or self.worst <= self.tolerance


def _random_molecule(rng: np.random.Generator, n: int, r_max: float) -> np.ndarray:
    """A connected random cluster [n, 3] (Å): each atom 0.9-1.6 Å from an earlier one, none closer than 0.8 Å."""
    pos = [np.zeros(3)]
    while len(pos) < n:
        base = pos[rng.integers(len(pos))]
        d = rng.normal(size=3)
        cand = base + d / np.linalg.norm(d) * rng.uniform(0.9, min(1.6, 0.9 * r_max))
        if min(np.linalg.norm(cand - p) for p in pos) > 0.8:
            pos.append(cand)
    return np.array(pos)


def _random_periodic(rng: np.random.Generator, n: int, cell: np.ndarray, min_dist: float = 0.8) -> np.ndarray:
    """Random positions [n, 3] (Å) in ``cell``, no two (periodic images included) closer than ``min_dist``."""
    inv = np.linalg.inv(cell)
    pos: List[np.ndarray] = []
    for _ in range(100000):
        cand = rng.uniform(size=3) @ cell
        ok = True
        for p in pos:
            d = (cand - p) @ inv
            d -= np.round(d)
            # nearest image over the 27 neighbouring shifts (the cell may be skewed)
            shifts = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T
            if np.linalg.norm((d + shifts) @ cell, axis=1).min() < min_dist:
                ok = False
                break
        if ok:
            pos.append(cand)
            if len(pos) == n:
                return np.array(pos)
    raise RuntimeError("equiforce check: could not place the test atoms in the cell")


class Auditor:
    """Evaluates (energy, forces, virial) of a structure with the exported file, through
    :class:`equiforce.deploy.runner.ExportedRunner` without centring (the file sees the positions given)."""

    def __init__(self, path: str):
        self.runner = ExportedRunner(path, owner="equiforce check", centre=False)
        self.module, self.meta = self.runner.module, self.runner.metadata
        self.dtype = self.runner.dtype
        self.r_max = self.runner.r_max

    def __call__(self, pos: np.ndarray, species: np.ndarray, cell: Optional[np.ndarray]) -> Tuple[float, np.ndarray, np.ndarray]:
        res = self.runner.run(pos, self.runner.symbols(species), cell, [cell is not None] * 3)
        return res.energy, res.forces, res.virial


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def run_checks(path: str, seed: int = 0, n_atoms: int = 8) -> Tuple[dict, List[CheckResult]]:
    aud = Auditor(path)
    rng = np.random.default_rng(seed)
    s = len(aud.meta["species"])
    tol = 1e-8 if aud.dtype == torch.float64 else 2e-4
    species = np.arange(n_atoms) % s
    pos = _random_molecule(rng, n_atoms, aud.r_max)
    cell = np.diag([1.0, 1.0, 1.0]) * max(2.0 * aud.r_max / 3, 3.0) + rng.uniform(-0.3, 0.3, size=(3, 3))
    pos_pbc = _random_periodic(rng, n_atoms, cell)
    e, f, v = aud(pos, species, None)
    ep, fp, vp = aud(pos_pbc, species, cell)
    results: List[CheckResult] = []

    worst = 0.0
    for _ in range(3):
        R = random_rotation(rng)
        e2, f2, _ = aud(pos @ R.T, species, None)
        e3, f3, v3 = aud(pos_pbc @ R.T, species, cell @ R.T)
        worst = max(worst, _rel(e2, e), _rel(f2, f @ R.T), _rel(e3, ep), _rel(f3, fp @ R.T), _rel(v3, R @ vp @ R.T))
    results.append(CheckResult("rotation", worst, tol))

    o3 = aud.meta.get("symmetry") == "O3"
    worst = 0.0
    for _ in range(2):
        R = -random_rotation(rng)
        e2, f2, _ = aud(pos @ R.T, species, None)
        e3, f3, v3 = aud(pos_pbc @ R.T, species, cell @ R.T)
        worst = max(worst, _rel(e2, e), _rel(f2, f @ R.T), _rel(e3, ep), _rel(f3, fp @ R.T))
    results.append(CheckResult("reflection", worst, tol, applicable=o3,
                               note="" if o3 else f"not required ({aud.meta.get('symmetry')} model)"))

    t = rng.normal(size=3) * 5.0
    e2, f2, _ = aud(pos + t, species, None)
    perm = rng.permutation(n_atoms)
    e3, f3, _ = aud(pos[perm], species[perm], None)
    results.append(CheckResult("translation", max(_rel(e2, e), _rel(f2, f)), tol))
    results.append(CheckResult("permutation", max(_rel(e3, e), _rel(f3, f[perm])), tol))

    moved = pos_pbc.copy()
    moved[0] += cell[0] - 2 * cell[2]
    e2, f2, v2 = aud(moved, species, cell)
    results.append(CheckResult("periodic image", max(_rel(e2, ep), _rel(f2, fp), _rel(v2, vp)), tol))

    # conservative forces: -F.d equals the derivative of E along random whole-structure
    # displacements d (5-point stencil, truncation error O(h^4)); a force field with curl fails
    h = 1e-3 if aud.dtype == torch.float64 else 2e-2
    worst = 0.0
    for _ in range(6):
        d = rng.normal(size=pos.shape)
        d /= np.linalg.norm(d)
        e_at = [aud(pos + k * h * d, species, None)[0] for k in (-2, -1, 1, 2)]
        slope = (e_at[0] - 8.0 * e_at[1] + 8.0 * e_at[2] - e_at[3]) / (12.0 * h)
        worst = max(worst, abs(slope + float((f * d).sum())) / max(np.abs(f).max(), 1e-12))
    conservative = bool(aud.meta.get("conservative", True))
    results.append(CheckResult("finite-difference forces", worst, 1e-7 if aud.dtype == torch.float64 else 5e-2,
                               applicable=conservative,
                               note="" if conservative else "not required (direct-force model: forces are not -dE/dr "
                                                            "by design; the error shows by how much)"))
    if aud.runner.has_polarizability:
        def alpha(x: np.ndarray) -> np.ndarray:
            return aud.runner.polarizability(x, aud.runner.symbols(species))

        a0 = alpha(pos)
        mats = [random_rotation(rng) for _ in range(2)] + ([-random_rotation(rng)] if o3 else [])
        worst = max(_rel(alpha(pos @ R.T + rng.normal(size=3)), R @ a0 @ R.T) for R in mats)
        results.append(CheckResult("polarizability R a R^T", worst, tol,
                                   note="" if o3 else "rotations only (SE3 model)"))
    return aud.meta, results


def format_table(meta: dict, results: List[CheckResult]) -> str:
    lines = [f"model: species {meta['species']}, r_max {meta['r_max']} Å, {meta['num_layers']} layers, "
             f"{meta['dtype']}, symmetry {meta.get('symmetry')}",
             f"{'check':<26}{'worst rel. error':>18}{'tolerance':>12}  result"]
    for r in results:
        status = "PASS" if r.passed and r.applicable else ("n/a" if not r.applicable else "FAIL")
        lines.append(f"{r.name:<26}{r.worst:>18.3e}{r.tolerance:>12.1e}  {status} {r.note}".rstrip())
    ok = all(r.passed for r in results)
    lines.append("all checks passed" if ok else "SOME CHECKS FAILED")
    return "\n".join(lines)
