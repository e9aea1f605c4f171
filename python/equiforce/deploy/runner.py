"""One way to run an exported file on a structure from Python (ASE, ``equiforce eval``, the audit, examples).

:class:`ExportedRunner` does, once, what every Python engine boundary needs:

* load the file (:func:`equiforce.deploy.export.load_exported`: format and metadata checks) and
  read its species, cutoff, dtype and minimum distance;
* apply the glibc allocator tuning (:func:`equiforce.deploy.allocator.tune_malloc`; opt out with
  ``EQUIFORCE_MALLOC_TUNING=0``, exactly as the LAMMPS plugin);
* refuse structures the model cannot evaluate, in one line naming the fix: no atoms, unknown
  elements, two atoms closer than ``metadata["min_distance"]`` (default
  :data:`equiforce.units.MIN_DISTANCE`, 0.5 Å), slabs or a wrong total charge for long-range models;
* build the edges with :func:`equiforce.data.neighbors.neighbor_list` in float64;
* form positions RELATIVE TO A REFERENCE POINT (the centroid) in float64 before casting to the
  model dtype, so a float32 model far from the origin is as accurate as near it (energy, forces,
  virial and the centred dipole are translation invariant);
* pass the cell by the exported convention: lattice rows for a fully periodic structure, zeros
  otherwise;
* call the module with TorchScript's graph optimiser off (see :mod:`equiforce.deploy.export`).

Units: positions and cell in Å, energy eV, forces eV/Å, virial eV (``stress = -virial / volume``),
dipole e·Å, polarizability e·Å²/V. Errors are :class:`equiforce.errors.DataError` (a ``ValueError``), prefixed with
``owner`` (e.g. ``"EquiforceCalculator"``) so a user sees which entry point refused.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.dataset import closest_pair, min_distance_message
from ..data.neighbors import neighbor_list
from ..errors import DataError
from ..units import MIN_DISTANCE, dtype_from_name
from .allocator import tune_malloc
from .committee import CommitteeResult, committee_size, committee_uncertainty
from .export import load_exported


@dataclass
class RunResult:
    """Outputs of one structure (float64 numpy): energy (eV), per-atom energies [N] (eV), forces
    [N, 3] (eV/Å), virial [3, 3] (eV)."""
    energy: float
    energies: np.ndarray
    forces: np.ndarray
    virial: np.ndarray


@dataclass
class ModelInputs:
    """The exported signature's arguments for one structure, plus the reference point (Å, float64)
    that was subtracted from the positions."""
    pos: torch.Tensor
    species: torch.Tensor
    edge_index: torch.Tensor
    edge_shift: torch.Tensor
    cell: torch.Tensor
    n: int
    reference: np.ndarray


class ExportedRunner:
    """An exported model file, ready to evaluate structures one at a time (see the module docstring).

    Args:
        path: file written by ``equiforce export`` / :func:`equiforce.deploy.export.export_model`.
        device: torch device ("cpu", "cuda", ...).
        owner: name put in front of every error message.
        centre: subtract the centroid before the cast to the model dtype (default). The symmetry
            audit turns it off, so that its translation check sees what the file itself does.
    """

    def __init__(self, path: str, device: str = "cpu", owner: str = "equiforce", centre: bool = True):
        self.owner = owner
        self.centre = centre
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"{owner}: unknown torch device {device!r} ({exc}); use e.g. 'cpu' or 'cuda'") from None
        self.path = str(path)
        self.malloc_tuned = tune_malloc()  # process-wide; opt out with EQUIFORCE_MALLOC_TUNING=0
        self.module, self.metadata = load_exported(self.path, map_location=str(self.device))
        meta = self.metadata
        self.species: List[str] = list(meta["species"])
        self.r_max = float(meta["r_max"])
        try:
            self.dtype = dtype_from_name(meta.get("dtype", "float64"))
        except ValueError:
            raise ValueError(f"{owner}: '{self.path}' declares dtype {meta.get('dtype')!r}; expected 'float32' or "
                             "'float64' (re-export the model)") from None
        self.min_distance = float(meta.get("min_distance", MIN_DISTANCE))
        self.long_range: Optional[Dict] = meta.get("long_range")
        self.has_dipole = "dipole" in meta.get("outputs", [])
        self.has_polarizability = "polarizability" in meta.get("outputs", [])
        self.committee_size = committee_size(meta)  # members of a committee file, 0 for a single model
        self._index = {name: k for k, name in enumerate(self.species)}

    # ------------------------------------------------------------------ checks and inputs
    def species_indices(self, symbols: Sequence[str]) -> torch.Tensor:
        """Model species index of every atom [N] int64; DataError naming any unknown element."""
        unknown = sorted({s for s in symbols if s not in self._index})
        if unknown:
            first = next(k for k, s in enumerate(symbols) if s in unknown)
            raise DataError(
                f"{self.owner}: element(s) {unknown} (first at atom index {first}) not in the model's "
                f"species {self.species} ('{self.path}'); use a model trained on these elements or remove those atoms")
        return torch.tensor([self._index[s] for s in symbols], dtype=torch.long, device=self.device)

    def check_long_range(self, pbc: np.ndarray, total_charge: Optional[float], where: str = "this structure",
                         charge_hint: str = "atoms.info['charge']") -> None:
        """Long-range files cover 3D-periodic structures and molecules only, for the total charge
        fixed at export; DataError otherwise (no-op for short-range files)."""
        if self.long_range is None:
            return
        if pbc.any() and not pbc.all():
            raise DataError(f"{self.owner}: '{self.path}' has long-range electrostatics, which need pbc=True in all "
                            f"directions or none (3D-periodic structures and molecules, not slabs); {where} has "
                            f"pbc={pbc.tolist()}")
        if total_charge is not None:
            q_file = float(self.long_range.get("total_charge", 0.0))
            if abs(float(total_charge) - q_file) > 1e-9:
                raise DataError(f"{self.owner}: {where} has total charge {float(total_charge):g} e ({charge_hint}) but "
                                f"'{self.path}' was exported for total charge {q_file:g} e; export it again with "
                                f"`equiforce export --total-charge {float(total_charge):g}` for these structures")

    def _check_min_distance(self, pos64: torch.Tensor, edge_index: torch.Tensor, shift64: torch.Tensor,
                            where: str) -> None:
        pair = closest_pair(pos64, edge_index, shift64)
        if pair is not None and pair[2] < self.min_distance:
            raise DataError(f"{self.owner}: in {where}, {min_distance_message(pair, self.min_distance)} of "
                            f"'{self.path}' (equiforce.units.MIN_DISTANCE); the model is not valid there: move the "
                            "atoms apart or remove the duplicate")

    def symbols(self, species_index) -> List[str]:
        """Element symbols of model species indices (any integer sequence)."""
        return [self.species[int(k)] for k in species_index]

    def inputs(self, positions, symbols: Sequence[str], cell=None, pbc=(False, False, False),
               where: str = "this structure") -> ModelInputs:
        """Checked model inputs for one structure.

        Args:
            positions: [N, 3] Å (anything numpy converts; used in float64).
            symbols: N element symbols.
            cell: [3, 3] lattice rows (Å) or None; only read along periodic directions.
            pbc: 3 bools.
        """
        pos64 = torch.as_tensor(np.asarray(positions, dtype=np.float64).reshape(-1, 3), device=self.device)
        n = int(pos64.shape[0])
        if n == 0:
            raise DataError(f"{self.owner}: {where} has no atoms; give a structure with at least one atom")
        pbc_np = np.asarray(pbc, dtype=bool).reshape(3)
        species = self.species_indices(list(symbols))
        cell_np = np.zeros((3, 3)) if cell is None or not pbc_np.any() else np.asarray(cell, dtype=np.float64)
        cell64 = torch.as_tensor(cell_np, dtype=torch.float64, device=self.device)
        try:
            edge_index, shift64, _ = neighbor_list(pos64, self.r_max, cell64,
                                                   torch.tensor(pbc_np.tolist(), device=self.device))
        except ValueError as exc:
            raise DataError(f"{self.owner}: cannot build neighbours for {where}: {exc}") from None
        self._check_min_distance(pos64, edge_index, shift64, where)
        reference = pos64.mean(dim=0) if self.centre else torch.zeros(3, dtype=torch.float64, device=self.device)
        model_cell = cell64 if pbc_np.all() else torch.zeros_like(cell64)
        return ModelInputs(pos=(pos64 - reference).to(self.dtype), species=species, edge_index=edge_index,
                           edge_shift=shift64.to(self.dtype), cell=model_cell.to(self.dtype), n=n,
                           reference=reference.cpu().numpy())

    # ------------------------------------------------------------------ evaluation
    def run_inputs(self, x: ModelInputs) -> RunResult:
        """Evaluate prepared inputs (graph optimiser off)."""
        with torch.jit.optimized_execution(False):  # see export.py: no re-optimisation per new size
            energy, per_atom, forces, virial = self.module(x.pos, x.species, x.edge_index, x.edge_shift, x.cell, x.n)
        return RunResult(energy=float(energy), energies=per_atom.detach().cpu().double().numpy().copy(),
                         forces=forces.detach().cpu().double().numpy().copy(),
                         virial=virial.detach().cpu().double().numpy().copy())

    def run(self, positions, symbols: Sequence[str], cell=None, pbc=(False, False, False),
            total_charge: Optional[float] = None, where: str = "this structure") -> RunResult:
        """Energy, per-atom energies, forces and virial of one structure (see :meth:`inputs`)."""
        self.check_long_range(np.asarray(pbc, dtype=bool).reshape(3), total_charge, where)
        return self.run_inputs(self.inputs(positions, symbols, cell, pbc, where))

    def run_atoms(self, atoms, total_charge: Optional[float] = None, where: str = "this structure") -> RunResult:
        """:meth:`run` on an ``ase.Atoms``."""
        return self.run(atoms.positions, atoms.get_chemical_symbols(), atoms.cell.array, atoms.pbc,
                        total_charge, where)

    def run_committee(self, x: ModelInputs) -> Tuple[RunResult, CommitteeResult]:
        """A committee file's mean outputs (exactly what ``forward`` returns) and its members' energies,
        forces and spread (:func:`equiforce.deploy.committee.committee_uncertainty`), from one call of
        the file's ``committee`` method. DataError for a file that is not a committee."""
        if not self.committee_size:
            raise DataError(f"{self.owner}: '{self.path}' is a single model, not a committee, so it has no "
                            "uncertainty; export several runs into one file: `equiforce export RUN_A RUN_B RUN_C "
                            "-o committee.pt`")
        with torch.jit.optimized_execution(False):
            e, ea, f, w = self.module.committee(x.pos, x.species, x.edge_index, x.edge_shift, x.cell, x.n)
        mean = RunResult(energy=float(e.mean(dim=0)), energies=ea.mean(dim=0).detach().cpu().double().numpy().copy(),
                         forces=f.mean(dim=0).detach().cpu().double().numpy().copy(),
                         virial=w.mean(dim=0).detach().cpu().double().numpy().copy())
        energies = e.detach().cpu().double().numpy().copy()
        forces = f.detach().cpu().double().numpy().copy()
        e_unc, f_unc = committee_uncertainty(energies, forces)
        return mean, CommitteeResult(energies=energies, forces=forces, energy_uncertainty=e_unc,
                                     force_uncertainty=f_unc)

    def dipole(self, positions, symbols: Sequence[str], cell=None, pbc=(False, False, False),
               total_charge: float = 0.0, where: str = "this structure") -> np.ndarray:
        """Dipole [3] (e·Å) of a file with a dipole head (the model's dipole is centred, so the
        reference point does not change it)."""
        if not self.has_dipole:
            raise DataError(f"{self.owner}: '{self.path}' has no dipole head (metadata outputs "
                            f"{self.metadata.get('outputs')}); train with --dipole to predict dipoles")
        x = self.inputs(positions, symbols, cell, pbc, where)
        with torch.jit.optimized_execution(False):
            mu = self.module.dipole(x.pos, x.species, x.edge_index, x.edge_shift, x.cell, float(total_charge))
        return mu.detach().cpu().double().numpy().copy()

    def polarizability(self, positions, symbols: Sequence[str], cell=None, pbc=(False, False, False),
                       where: str = "this structure") -> np.ndarray:
        """Polarizability [3, 3] (e·Å²/V, symmetric) of a file with a polarizability head
        (translation invariant, so the reference point does not change it)."""
        self._require_polarizability()
        return self.run_polarizability(self.inputs(positions, symbols, cell, pbc, where))

    def _require_polarizability(self) -> None:
        if not self.has_polarizability:
            raise DataError(f"{self.owner}: '{self.path}' has no polarizability head (metadata outputs "
                            f"{self.metadata.get('outputs')}); train with --polarizability to predict polarizabilities")

    def run_polarizability(self, x: ModelInputs) -> np.ndarray:
        """:meth:`polarizability` of prepared inputs (the ASE calculator reuses those of its energy call)."""
        self._require_polarizability()
        with torch.jit.optimized_execution(False):
            alpha = self.module.polarizability(x.pos, x.species, x.edge_index, x.edge_shift, x.cell)
        return alpha.detach().cpu().double().numpy().copy()
