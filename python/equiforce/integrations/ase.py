"""ASE calculator around an exported equiforce file (the same TorchScript file LAMMPS and OpenMM run).

    from equiforce.ase import EquiforceCalculator
    atoms.calc = EquiforceCalculator("model.pt")
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

Units are ASE's: energy eV, forces eV/Å, stress eV/Å^3 (Voigt order xx, yy, zz, yz, xz, xy, sign
``stress = (1/V) dE/dstrain = -virial / V``). The cutoff, species and dtype come from the file's
metadata; edges come from :func:`equiforce.data.neighbors.neighbor_list`.

A file with a polarizability head also fills ``calc.results["polarizability"]`` ([3, 3], e·Å²/V,
symmetric; times :data:`equiforce.units.POLARIZABILITY_VOLUME_A3` for Å^3) in every calculation
(``calc.get_property("polarizability", atoms)``); it is one extra pass without gradients, on the
same neighbour list as the energy.
"""
from typing import List, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ..deploy.runner import ExportedRunner

# results of a committee file (equiforce.deploy.committee): eV, [N] eV/Å, eV/Å, [M] eV, [M, N, 3] eV/Å
COMMITTEE_PROPERTIES = ["energy_uncertainty", "force_uncertainty", "max_force_uncertainty",
                        "committee_energies", "committee_forces"]


class EquiforceCalculator(Calculator):
    """Energy, per-atom energies, forces and (fully periodic cells only) stress from an exported model.

    Args:
        model_path: file written by ``equiforce export`` / :func:`equiforce.deploy.export.export_model`.
        device: torch device to run on ("cpu", "cuda", "cuda:1", ...).

    Raises :class:`equiforce.errors.ModelFileError` for a missing file or a file that is not an
    equiforce export, ``ValueError`` (:class:`equiforce.errors.DataError`) for structures the model
    cannot evaluate: no atoms, unknown elements, two atoms closer than the file's minimum distance
    (:data:`equiforce.units.MIN_DISTANCE`), see :class:`equiforce.deploy.runner.ExportedRunner`.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]
    # A committee file (`equiforce export RUN_A RUN_B ... -o committee.pt`) gives the members' mean as
    # energy/forces/stress and adds COMMITTEE_PROPERTIES: results["energy_uncertainty"] (eV, standard
    # deviation of the members' energies), results["force_uncertainty"] ([N] eV/Å, per atom the RMS
    # deviation of the members' force vectors from their mean), "max_force_uncertainty" (eV/Å),
    # "committee_energies" [M] and "committee_forces" [M, N, 3].

    def __init__(self, model_path: str, device: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.runner = ExportedRunner(model_path, device=device, owner="EquiforceCalculator")
        self.device = self.runner.device
        self.model_path = self.runner.path
        self.module, self.metadata = self.runner.module, self.runner.metadata
        self.species: List[str] = self.runner.species
        self.r_max = self.runner.r_max
        self.dtype = self.runner.dtype
        if self.runner.has_polarizability:
            # per instance: files without the head keep the class list
            self.implemented_properties = list(self.implemented_properties) + ["polarizability"]
        self.committee_size = self.runner.committee_size
        if self.committee_size:  # a committee file: the spread of its members as well
            self.implemented_properties = list(self.implemented_properties) + COMMITTEE_PROPERTIES

    def species_indices(self, symbols: Sequence[str]) -> torch.Tensor:
        """Model species index of every atom [N] int64; ValueError naming any unknown element."""
        return self.runner.species_indices(symbols)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if "stress" in properties and not pbc.all():
            raise PropertyNotImplementedError(
                f"EquiforceCalculator: stress needs a fully periodic cell, these Atoms have pbc={pbc.tolist()}; "
                "set pbc=True with a 3D cell or do not ask for stress")
        charge = atoms.info.get("charge")
        total_charge = None if charge is None else float(charge)
        self.runner.check_long_range(pbc, total_charge)
        # one set of inputs (neighbour list) for every output of this calculation
        x = self.runner.inputs(atoms.positions, atoms.get_chemical_symbols(), atoms.cell.array, atoms.pbc)
        members = None
        if self.committee_size:
            res, members = self.runner.run_committee(x)
        else:
            res = self.runner.run_inputs(x)
        self.results = {
            "energy": res.energy,
            "free_energy": res.energy,
            "energies": res.energies,
            "forces": res.forces,
        }
        if self.runner.has_polarizability:
            self.results["polarizability"] = self.runner.run_polarizability(x)
        if members is not None:
            self.results.update({
                "energy_uncertainty": members.energy_uncertainty,
                "force_uncertainty": members.force_uncertainty,
                "max_force_uncertainty": members.max_force_uncertainty,
                "committee_energies": members.energies,
                "committee_forces": members.forces,
            })
        if pbc.all():
            volume = abs(float(np.linalg.det(atoms.cell.array)))
            self.results["stress"] = full_3x3_to_voigt_6_stress(-res.virial / volume)
