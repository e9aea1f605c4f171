"""Errors of an EXPORTED model file on an extxyz data set (what `equiforce eval` prints).

The exported TorchScript module is run exactly as the engines run it (one structure at a time,
the signature of :mod:`equiforce.deploy.export`); nothing from the training code is reused for the
predictions, so these numbers test the deployed file.

Metrics (keys of the returned dict):

* ``energy_mae_mev_per_atom``: mean over structures of ``|E - E_ref| / n_atoms`` (meV/atom)
* ``force_mae_mev_per_a``, ``force_rmse_mev_per_a``: over all Cartesian force components (meV/Å)
* ``stress_mae_mev_per_a3``: over the 9 components of the structures that carry a stress label
  (meV/Å^3, ASE sign convention), ``None`` when no structure has one
* ``n_structures``
* ``dipole_mae_e_a``: mean over the Cartesian components of the structures with a dipole label
  (e·Å), only when the model has a dipole head (``metadata["outputs"]``) and the data dipoles
* ``polarizability_mae_e_a2_per_v``: mean over the 9 components of the structures with a
  polarizability label (e·Å²/V), only when the model has a polarizability head and the data labels
"""

from typing import Dict, Optional

import numpy as np

from ..data.dataset import (extract_dipole, extract_labels, extract_polarizability, extract_total_charge,
                            read_structures)
from ..training.metrics import ErrorAccumulator, nan_to_none
from .runner import ExportedRunner


def evaluate_exported(model_path: str, data_path: str, energy_key: str = "energy", forces_key: str = "forces",
                      stress_key: str = "stress", dipole_key: str = "dipole",
                      charge_key: str = "charge",
                      polarizability_key: str = "polarizability") -> Dict[str, Optional[float]]:
    """Run the exported file ``model_path`` on every structure of ``data_path``; see the module docstring."""
    runner = ExportedRunner(model_path, owner="equiforce eval")
    frames = read_structures(data_path)
    acc = ErrorAccumulator()
    for k, atoms in enumerate(frames):
        where = f"'{data_path}' structure {k}"
        energy, forces, stress = extract_labels(atoms, k, data_path, energy_key, forces_key, stress_key)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        q = extract_total_charge(atoms, k, data_path, charge_key) if runner.long_range is not None else None
        runner.check_long_range(pbc, q, where, charge_hint=f"'{charge_key}'")
        x = runner.inputs(atoms.positions, atoms.get_chemical_symbols(), atoms.cell.array, pbc, where)
        res = runner.run_inputs(x)
        ds = None
        if stress is not None and pbc.all():
            volume = abs(float(np.linalg.det(atoms.cell.array)))
            ds = -res.virial / volume - stress
        ref_dipole = extract_dipole(atoms, k, data_path, dipole_key) if runner.has_dipole else None
        dd = None
        if ref_dipole is not None:
            q = extract_total_charge(atoms, k, data_path, charge_key)
            dd = runner.dipole(atoms.positions, atoms.get_chemical_symbols(), atoms.cell.array, pbc, q, where) \
                - ref_dipole
        ref_alpha = extract_polarizability(atoms, k, data_path, polarizability_key) \
            if runner.has_polarizability else None
        da = None
        if ref_alpha is not None:
            da = runner.polarizability(atoms.positions, atoms.get_chemical_symbols(), atoms.cell.array, pbc, where) \
                - ref_alpha
        acc.add_errors(np.array([(res.energy - energy) / len(atoms)]), res.forces - forces, ds, dd, da)
    out = nan_to_none(acc.metrics())
    for key in ("dipole_mae_e_a", "polarizability_mae_e_a2_per_v"):
        if out[key] is None:
            del out[key]
    out["n_structures"] = len(frames)
    return out


def format_metrics(metrics: Dict[str, Optional[float]]) -> str:
    """Human-readable lines for :func:`evaluate_exported`'s result."""
    lines = [f"structures        {metrics['n_structures']}",
             f"energy MAE        {metrics['energy_mae_mev_per_atom']:.4g} meV/atom",
             f"force MAE         {metrics['force_mae_mev_per_a']:.4g} meV/Å",
             f"force RMSE        {metrics['force_rmse_mev_per_a']:.4g} meV/Å"]
    if metrics.get("stress_mae_mev_per_a3") is not None:
        lines.append(f"stress MAE        {metrics['stress_mae_mev_per_a3']:.4g} meV/Å^3")
    if metrics.get("dipole_mae_e_a") is not None:
        lines.append(f"dipole MAE        {metrics['dipole_mae_e_a']:.4g} e·Å")
    if metrics.get("polarizability_mae_e_a2_per_v") is not None:
        lines.append(f"polarizability MAE {metrics['polarizability_mae_e_a2_per_v']:.4g} e·Å²/V")
    return "\n".join(lines)
