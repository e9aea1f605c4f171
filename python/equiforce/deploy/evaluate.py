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
"""

import math
from typing import Dict, Optional

import numpy as np
import torch

from ..errors import DataError
from ..data.dataset import atoms_to_graph, extract_dipole, extract_labels, extract_total_charge, read_structures
from .export import load_exported


def evaluate_exported(model_path: str, data_path: str, energy_key: str = "energy", forces_key: str = "forces",
                      stress_key: str = "stress", dipole_key: str = "dipole",
                      charge_key: str = "charge") -> Dict[str, Optional[float]]:
    """Run the exported file ``model_path`` on every structure of ``data_path``; see the module docstring."""
    module, meta = load_exported(model_path)
    dtype = {"float32": torch.float32, "float64": torch.float64}[meta["dtype"]]
    species, r_max = list(meta["species"]), float(meta["r_max"])
    frames = read_structures(data_path)
    e_abs = f_abs = f_sq = s_abs = 0.0
    n_comp = n_stress = n_dipole = 0
    d_abs = 0.0
    has_dipole_head = "dipole" in meta.get("outputs", [])
    for k, atoms in enumerate(frames):
        where = f"'{data_path}' structure {k}"
        energy, forces, stress = extract_labels(atoms, k, data_path, energy_key, forces_key, stress_key)
        g = atoms_to_graph(atoms, species, r_max, where=where)
        n = len(atoms)
        # the exported convention: lattice rows for a fully periodic structure, zeros otherwise
        if "long_range" in meta and bool(g["pbc"].any()) and not bool(g["pbc"].all()):
            raise DataError(f"{where} is partly periodic (pbc={g['pbc'].tolist()}); the long-range model in "
                            f"'{model_path}' covers 3D-periodic structures and molecules only")
        if "long_range" in meta:
            q_file = float(meta["long_range"].get("total_charge", 0.0))
            q = extract_total_charge(atoms, k, data_path, charge_key)
            if abs(q - q_file) > 1e-9:
                raise DataError(f"{where} has total charge {q:g} e ('{charge_key}') but '{model_path}' was exported "
                                f"for total charge {q_file:g} e; export it again with `equiforce export "
                                f"--total-charge {q:g}` for these structures")
        cell = g["cell"] if bool(g["pbc"].all()) else torch.zeros_like(g["cell"])
        with torch.jit.optimized_execution(False):  # see export.py: no re-optimisation per new size
            e, _, f, virial = module(g["pos"].to(dtype), g["species"], g["edge_index"], g["edge_shift"].to(dtype),
                                     cell.to(dtype), n)
        e_abs += abs(float(e) - energy) / n
        df = f.double().numpy() - forces
        f_abs += float(np.abs(df).sum())
        f_sq += float((df * df).sum())
        n_comp += df.size
        if stress is not None and bool(g["pbc"].all()):
            volume = abs(float(torch.det(g["cell"])))
            pred = -virial.double().numpy() / volume
            s_abs += float(np.abs(pred - stress).sum())
            n_stress += 9
        ref_dipole = extract_dipole(atoms, k, data_path, dipole_key) if has_dipole_head else None
        if ref_dipole is not None:
            q = extract_total_charge(atoms, k, data_path, charge_key)
            with torch.jit.optimized_execution(False):
                mu = module.dipole(g["pos"].to(dtype), g["species"], g["edge_index"], g["edge_shift"].to(dtype),
                                   cell.to(dtype), q)
            d_abs += float(np.abs(mu.double().numpy() - ref_dipole).sum())
            n_dipole += 3
    n = len(frames)
    out: Dict[str, Optional[float]] = {
        "energy_mae_mev_per_atom": 1000.0 * e_abs / n,
        "force_mae_mev_per_a": 1000.0 * f_abs / n_comp if n_comp else None,
        "force_rmse_mev_per_a": 1000.0 * math.sqrt(f_sq / n_comp) if n_comp else None,
        "stress_mae_mev_per_a3": 1000.0 * s_abs / n_stress if n_stress else None,
        "n_structures": n,
    }
    if n_dipole:
        out["dipole_mae_e_a"] = d_abs / n_dipole
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
    return "\n".join(lines)
