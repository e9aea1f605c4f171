"""Structures and a fallback model shared by the OpenMM example scripts (units: Å unless stated).

``demo_model_path(path)`` returns ``path`` when given; otherwise it exports the analytic test
model (``equiforce.model.analytic.AnalyticMessageModel``, species H, C, O, float64) to a temporary file
so the scripts run before a trained model exists. Pass ``--model model.pt`` for a real model.
"""
import os
import tempfile
from typing import List, Optional, Tuple

import numpy as np
import openmm
from openmm import app, unit

# A C2H6O cluster near a minimum of the analytic model (the tests use the same geometry).
DEMO_SYMBOLS = ["C", "C", "O", "H", "H", "H", "H", "H", "H"]
DEMO_POS = np.array([
    [0.000, 0.000, 0.000], [2.250, 0.000, 0.000], [1.120, 1.950, 0.000],
    [-1.100, -1.300, 1.250], [-1.100, -1.300, -1.250], [3.350, -1.300, 1.250],
    [3.350, -1.300, -1.250], [1.120, 0.650, 2.150], [1.120, 0.650, -2.150],
])


def demo_model_path(path: Optional[str], dtype: str = "float64") -> str:
    if path:
        return path
    from equiforce.model.analytic import AnalyticMessageModel
    from equiforce.deploy.export import export_model
    from equiforce.units import dtype_from_name
    out = os.path.join(tempfile.mkdtemp(prefix="equiforce_demo_"), f"analytic_{dtype}.pt")
    export_model(AnalyticMessageModel(["H", "C", "O"], r_max=4.0, num_layers=2), out,
                 dtype=dtype_from_name(dtype))
    print(f"no --model given: using the analytic test model exported to {out}")
    return out


def make_topology(symbols: List[str], box_angstrom: Optional[np.ndarray] = None) -> app.Topology:
    """One residue holding ``symbols``; periodic box vectors (rows, Å) when given."""
    top = app.Topology()
    res = top.addResidue("MOL", top.addChain())
    for s in symbols:
        top.addAtom(s, app.Element.getBySymbol(s), res)
    if box_angstrom is not None:
        top.setPeriodicBoxVectors([openmm.Vec3(*row) for row in np.asarray(box_angstrom) / 10.0] * unit.nanometer)
    return top


def periodic_lattice(n_side: int, spacing: float = 2.2, triclinic: bool = False,
                     seed: int = 0) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``n_side**3`` atoms (random H/C/O) on a jittered simple-cubic lattice; (symbols, pos Å, cell Å).

    ``triclinic=True`` tilts the b and c vectors (OpenMM reduced form)."""
    rng = np.random.default_rng(seed)
    length = n_side * spacing
    cell = np.diag([length] * 3)
    if triclinic:
        cell[1, 0] = 0.25 * length
        cell[2, 0] = -0.2 * length
        cell[2, 1] = 0.15 * length
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = (grid + 0.5 + rng.normal(scale=0.05, size=grid.shape)) / n_side
    pos = frac @ cell
    symbols = [["H", "C", "O"][k] for k in rng.integers(0, 3, len(pos))]
    return symbols, pos, cell
