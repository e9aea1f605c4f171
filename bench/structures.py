"""Benchmark structures: rattled fcc Cu supercells with an ASE neighbour list (built outside any timer).

Each structure is written once to ``bench/results/structures/cu_<N>_a<a>_rattle<s>_r<r_max>.npz`` with ``pos`` [N, 3] (Å),
``cell`` [3, 3] (rows), ``numbers`` [N], ``edge_index`` [2, E] (i centre, j neighbour) and
``shift`` [E, 3] Cartesian (Å) such that ``r_ij = pos[j] - pos[i] + shift``, every ordered pair
with |r_ij| < r_max (both directions), as all three codes expect.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Tuple

import numpy as np

A_CU = 3.61        # fcc lattice constant (Å)
RATTLE = 0.03      # Gaussian displacement (Å), fixed seed: breaks the perfect-lattice symmetry


def supercell_repeats(num_atoms: int) -> Tuple[int, int, int]:
    """The most cube-like (a, b, c) with 4*a*b*c == num_atoms (4 atoms per cubic fcc cell)."""
    if num_atoms < 4 or num_atoms % 4:
        raise ValueError(f"structure size {num_atoms} is not 4*a*b*c (fcc cubic cells hold 4 atoms); "
                         "use e.g. 64, 256, 512, 2048, 4096, 32768")
    m = num_atoms // 4
    best = None
    for a in range(1, m + 1):
        if m % a:
            continue
        for b in range(a, m // a + 1):
            if (m // a) % b:
                continue
            c = m // (a * b)
            if c < b:
                continue
            key = c / a
            if best is None or key < best[0]:
                best = (key, (a, b, c))
    return best[1]


def make_structure(num_atoms: int, r_max: float, out_dir: Path) -> dict:
    """Create (or reuse) the npz for ``num_atoms``; returns {path, num_atoms, num_edges, ...}."""
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cu_{num_atoms}_a{A_CU:g}_rattle{RATTLE:g}_r{r_max:g}.npz"
    reps = supercell_repeats(num_atoms)
    if not path.exists():
        atoms = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat(reps)
        atoms.rattle(stdev=RATTLE, seed=1234)
        i, j, s = neighbor_list("ijS", atoms, r_max)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        shift = s.astype(np.float64) @ cell
        order = np.lexsort((j, i))
        tmp = str(path) + ".tmp.npz"
        np.savez(tmp, pos=atoms.positions.astype(np.float64), cell=cell, numbers=atoms.numbers,
                 edge_index=np.stack([i[order], j[order]]).astype(np.int64), shift=shift[order],
                 cell_shift=s[order].astype(np.int64))
        os.replace(tmp, path)
    with np.load(path) as z:
        n, e = z["pos"].shape[0], z["edge_index"].shape[1]
    return {"path": str(path), "num_atoms": int(n), "num_edges": int(e), "supercell": list(reps),
            "neighbors_per_atom": e / n, "a": A_CU, "rattle": RATTLE, "r_max": r_max}


if __name__ == "__main__":
    for n in (64, 512):
        print(make_structure(n, 5.0, Path("/tmp/equiforce-bench-structures")))
    assert supercell_repeats(32768) == (16, 16, 32)
    assert list(itertools.islice((supercell_repeats(x) for x in (64, 4096)), 2)) == [(2, 2, 4), (8, 8, 16)]
