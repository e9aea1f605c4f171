"""ASE calculator around an exported equiforce file (the same TorchScript file LAMMPS and OpenMM run).

    from equiforce.ase import EquiforceCalculator
    atoms.calc = EquiforceCalculator("model.pt")
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

Units are ASE's: energy eV, forces eV/Å, stress eV/Å^3 (Voigt order xx, yy, zz, yz, xz, xy, sign
``stress = (1/V) dE/dstrain = -virial / V``). The cutoff, species and dtype come from the file's
metadata; edges come from :func:`equiforce.data.neighbors.neighbor_list`.
"""
from typing import List, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ..deploy.export import load_exported
from ..data.neighbors import neighbor_list


class EquiforceCalculator(Calculator):
    """Energy, per-atom energies, forces and (fully periodic cells only) stress from an exported model.

    Args:
        model_path: file written by ``equiforce export`` / :func:`equiforce.deploy.export.export_model`.
        device: torch device to run on ("cpu", "cuda", "cuda:1", ...).

    Raises :class:`equiforce.deploy.export.ModelFileError` for a missing file or a file that is not an
    equiforce export, ``ValueError`` for structures the model cannot evaluate.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model_path: str, device: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"EquiforceCalculator: unknown torch device {device!r} ({exc}); "
                             "use e.g. 'cpu' or 'cuda'") from None
        self.model_path = str(model_path)
        self.module, self.metadata = load_exported(self.model_path, map_location=str(self.device))
        self.species: List[str] = list(self.metadata["species"])
        self.r_max = float(self.metadata["r_max"])
        dtype_name = self.metadata.get("dtype", "float64")
        if dtype_name not in ("float32", "float64"):
            raise ValueError(f"EquiforceCalculator: '{self.model_path}' declares dtype {dtype_name!r}; "
                             "expected 'float32' or 'float64' (re-export the model)")
        self.dtype = torch.float64 if dtype_name == "float64" else torch.float32
        self._index = {name: k for k, name in enumerate(self.species)}

    def species_indices(self, symbols: Sequence[str]) -> torch.Tensor:
        """Model species index of every atom [N] int64; ValueError naming any unknown element."""
        unknown = sorted({s for s in symbols if s not in self._index})
        if unknown:
            first = next(k for k, s in enumerate(symbols) if s in unknown)
            raise ValueError(
                f"EquiforceCalculator: element(s) {', '.join(unknown)} (first at atom index {first}) not in "
                f"the model's species {self.species} ('{self.model_path}'); use a model trained on these "
                "elements or remove those atoms")
        return torch.tensor([self._index[s] for s in symbols], dtype=torch.long, device=self.device)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        n = len(atoms)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if "stress" in properties and not pbc.all():
            raise PropertyNotImplementedError(
                f"EquiforceCalculator: stress needs a fully periodic cell, these Atoms have pbc={pbc.tolist()}; "
                "set pbc=True with a 3D cell or do not ask for stress")
        species = self.species_indices(atoms.get_chemical_symbols())
        pos = torch.tensor(atoms.positions, dtype=self.dtype, device=self.device)
        cell_np = atoms.cell.array if pbc.any() else np.zeros((3, 3))
        cell = torch.tensor(cell_np, dtype=self.dtype, device=self.device)
        # the exported convention: lattice rows for a fully periodic system, zeros otherwise (only
        # long-range models read it; they cover 3D-periodic cells and molecules, not slabs)
        if "long_range" in self.metadata and pbc.any() and not pbc.all():
            raise ValueError(f"EquiforceCalculator: '{self.model_path}' has long-range electrostatics, which need "
                             f"pbc=True in all directions or none; these Atoms have pbc={pbc.tolist()}")
        model_cell = cell if pbc.all() else torch.zeros_like(cell)
        if "long_range" in self.metadata and atoms.info.get("charge") is not None:
            q_file = float(self.metadata["long_range"].get("total_charge", 0.0))
            if abs(float(atoms.info["charge"]) - q_file) > 1e-9:
                raise ValueError(f"EquiforceCalculator: these Atoms have total charge {atoms.info['charge']} e "
                                 f"(atoms.info['charge']) but '{self.model_path}' was exported for total charge "
                                 f"{q_file:g} e; export it with `equiforce export --total-charge ...`")
        try:
            edge_index, edge_shift, _ = neighbor_list(pos, self.r_max, cell, torch.tensor(pbc, device=self.device))
        except ValueError as exc:
            raise ValueError(f"EquiforceCalculator: cannot build neighbours for these Atoms: {exc}") from None
        with torch.jit.optimized_execution(False):  # see export.py: no re-optimisation per new size
            energy, per_atom, forces, virial = self.module(pos, species, edge_index, edge_shift, model_cell, n)
        e = float(energy)
        self.results = {
            "energy": e,
            "free_energy": e,
            "energies": per_atom.detach().cpu().double().numpy().copy(),
            "forces": forces.detach().cpu().double().numpy().copy(),
        }
        if pbc.all():
            volume = abs(float(np.linalg.det(atoms.cell.array)))
            stress = -virial.detach().cpu().double().numpy() / volume
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
